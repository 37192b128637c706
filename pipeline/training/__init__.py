"""How a block's learnable parameters are trained: the optimizer (`optimizer`: the
reference's AdamW or AutoRound's sign gradient with a linear decay), the precision
(`precision`: autocast, float16 on CUDA by default, bfloat16 on request, on the CPU too), the
block's call compiled (`compiled`), and the minibatches over the streams and each step's
gradient, summed window by window and over the data-parallel workers (`steps`)."""
