"""Block passes: a pipelined forward pass keeps a stage's blocks loaded only within its memory
budget; GPTQ needs no FP stream."""
import pytest
import torch

from pipeline import block_pass
from pipeline.plan import open_model


@pytest.mark.unit
def test_resident_blocks_within_a_budget_give_the_same_output(tiny_model):
    parts = open_model(tiny_model("llama"))
    ids = torch.randint(0, parts.hf_config.vocab_size, (2, 16),
                        generator=torch.Generator().manual_seed(0))
    roomy = block_pass.ResidentBlocks(parts, budget_bytes=2**40)
    tight = block_pass.ResidentBlocks(parts, budget_bytes=0)  # one block at a time
    outs = []
    for resident in (roomy, tight):
        h = resident.embed(ids)
        for _ in range(2):  # two chunks through every block
            out = resident.forward(0, parts.num_blocks, h)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert roomy.loads == parts.num_blocks and len(roomy.blocks) == parts.num_blocks
    assert tight.loads == 2 * parts.num_blocks and len(tight.blocks) == 1


def test_gptq_without_the_fp_stream_gives_the_same_block(tiny_model, tmp_path):
    """GPTQ reads the quantized stream only: without an FP stream (fp_in None) the codes and
    the quantized stream out are those of the run that carries one, the FP pass and the output
    error are skipped; a learned method refuses; a boundary saves and loads the missing FP
    stream as missing."""
    from block_helpers import quantization, stream

    from pipeline.config import ExportFormat

    parts = open_model(tiny_model("llama"), "float32")
    store, fp = stream(parts, n=4)
    q = quantization(bits=3, group_size=16, method="gptq")
    layouts = [ExportFormat.COMPRESSED_TENSORS]
    both = block_pass.quantize_block(parts, 0, fp, list(fp), q, layouts, store)
    alone = block_pass.quantize_block(parts, 0, None, list(fp), q, layouts, store)
    assert alone.fp_out is None and len(both.fp_out) == 2
    for name, t in both.exports[ExportFormat.COMPRESSED_TENSORS].items():
        assert torch.equal(alone.exports[ExportFormat.COMPRESSED_TENSORS][name], t), name
    for a, b in zip(alone.q_out, both.q_out, strict=True):
        assert torch.equal(store.get(a), store.get(b))
    assert "output_relative_error" in both.metrics
    assert "output_relative_error" not in alone.metrics
    with pytest.raises(ValueError, match="needs the FP stream"):
        block_pass.quantize_block(parts, 0, None, list(fp), quantization(
            bits=3, group_size=16, method="omniquant", omniquant={"epochs": 1}), layouts, store)
    from pipeline.checkpoint import latest_boundary, load_boundary, save_boundary

    save_boundary(str(tmp_path), 1, None, alone.q_out, store)
    loaded_fp, loaded_q = load_boundary(latest_boundary(str(tmp_path)), store)
    assert loaded_fp is None
    assert all(torch.equal(store.get(a), store.get(b))
               for a, b in zip(loaded_q, alone.q_out, strict=True))


@pytest.mark.unit
def test_the_hessian_pass_stops_after_the_last_linear_reads_its_input(tiny_model):
    """collect_hessians stops each window's forward once every watched linear has read its
    input (the down projection is not computed); the Hessians are those of full forwards."""
    from block_helpers import stream

    from pipeline.methods import gptq
    from pipeline.methods.gptq_block import collect_hessians
    from pipeline.methods.hooks import input_hooks
    from pipeline.model_parts import run_block

    parts = open_model(tiny_model("llama"), "float32")
    store, fp = stream(parts, n=4)
    block = parts.load_block(0)
    names = list(parts.adapter.linears)
    calls = []
    down = block.get_submodule(names[-1])
    counter = down.register_forward_hook(lambda *_: calls.append(1))
    got = collect_hessians(parts, block, names, list(fp), store, 16)
    counter.remove()
    assert not calls  # stopped at its input: the down projection never ran
    full = {n: gptq.Hessian(block.get_submodule(n).in_features) for n in names}
    with torch.no_grad(), input_hooks(block, names, lambda n, x: full[n].add(x)):
        for h in fp:
            run_block(parts, block, store.get(h))
    for n in names:
        assert torch.equal(got[n], full[n].value()), n
