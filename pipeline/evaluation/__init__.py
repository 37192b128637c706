"""What the pipeline measures of a model besides quantizing it: each block's error at the
output depth (`depth_errors`), the FP perplexity's user cache (`perplexity_cache`), and
lm-eval-harness tasks (`tasks`)."""
