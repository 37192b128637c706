"""CVXQ's sensitivity backward with fewer blocks loaded than the stage holds: the blocks that
do not fit its budget are read again for every chunk, and the statistics and the input
gradients are exactly those of the pass that keeps them all loaded."""
import pytest
import torch

from pipeline.block_pass import ResidentBlocks, embed_stream
from pipeline.cvxq.sensitivity import stage_backward
from pipeline.plan import open_model
from pipeline.streams import MemoryStore

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_a_stage_wider_than_its_budget_gives_the_same_statistics(tiny_model, arch):
    parts = open_model(tiny_model(arch), "float32")
    store = MemoryStore()
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 100, (2, 16), generator=generator) for _ in range(3)]
    x_stream = embed_stream(parts, ids, store)
    g_stream = [torch.randn(x.shape, generator=generator) for x in x_stream]
    blocks = (0, parts.num_blocks)

    def run(budget_bytes):
        resident = ResidentBlocks(parts, budget_bytes)
        grads, stats = stage_backward(parts, blocks, x_stream, g_stream, store, True, resident)
        return grads, stats, resident.loads

    all_grads, all_stats, all_loads = run(1 << 40)
    one_grads, one_stats, one_loads = run(1)  # one block loaded at a time
    assert all_loads == parts.num_blocks
    # per chunk each block forward and back, but the one just loaded is reused: the last going
    # forward starts the backward, the first going back starts the next chunk's forward
    n = parts.num_blocks
    assert one_loads == (2 * n - 1) + (len(ids) - 1) * (2 * n - 2)
    assert list(one_stats) == list(all_stats)  # block by block
    assert one_stats == all_stats
    for a, b in zip(one_grads, all_grads, strict=True):
        assert torch.equal(a, b)
    assert all(s["grad_sq_sum"] > 0 and s["chunks"] == 3 for s in all_stats.values())


def test_the_resident_budget_is_the_gpus_free_memory_on_cuda(monkeypatch, tiny_model):
    """Blocks on a GPU live in its memory: the default budget is a quarter of what the GPU has
    free (was the host's, which on a GPU node can be many times the GPU's)."""
    import dataclasses

    import psutil

    from pipeline import block_pass

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 << 30, 80 << 30))
    assert block_pass.available_bytes("cuda") == 8 << 30
    assert block_pass.available_bytes("cuda:0") == 8 << 30
    assert block_pass.available_bytes("cpu") == pytest.approx(
        psutil.virtual_memory().available, rel=0.05)
    parts = dataclasses.replace(open_model(tiny_model("llama"), "float32"), device="cuda")
    assert ResidentBlocks(parts).budget == 2 << 30
