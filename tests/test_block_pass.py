"""A pipelined forward pass keeps a stage's blocks loaded only within its memory budget."""
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
