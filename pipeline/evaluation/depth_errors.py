"""Each block's error where it matters: at the model's output depth. For block l, the FP input of
the block goes through the quantized block l, then through the FP blocks l+1 .. L-1; the
result is compared with the FP model's last hidden state (before the final norm):

    e_l = ||B_{L-1}(...B_{l+1}(B^_l(x_l))) - h_L||^2 / ||h_L||^2

so e_l is block l's own contribution, carried to the output, with the rest of the model exact
(the distribution over depth that cross-layer learning is meant to even out). All blocks are
followed at once: FP block j is read once and applied to every stream started before it, so a
pass reads each FP and each quantized block once and holds one stream per block begun.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.block_pass import stored_quantized
from pipeline.methods.hooks import activation_quant
from pipeline.model_parts import ModelParts, embed, run_block


def _quantized_forward(parts: ModelParts, index: int, h: torch.Tensor, abits: int
                       ) -> torch.Tensor:
    block = parts.load_block(index)
    with activation_quant(block, stored_quantized(parts, index), abits):
        return run_block(parts, block, h)


@torch.no_grad()
def output_depth_errors(fp: ModelParts, quantized: ModelParts, ids: torch.Tensor,
                        abits: int = 16,
                        progress: Callable[[int, int], None] | None = None) -> list[float]:
    """e_l for every block l on the windows `ids` ([windows, seq_len])."""
    if quantized.num_blocks != fp.num_blocks:
        raise ValueError(f"{quantized.num_blocks} quantized blocks for {fp.num_blocks} FP ones")
    x = embed(fp, fp.load_embedding(), ids.to(fp.device))
    started: list[torch.Tensor] = []
    for j in range(fp.num_blocks):
        block = fp.load_block(j)
        started = [run_block(fp, block, y) for y in started]
        started.append(_quantized_forward(quantized, j, x.to(quantized.device), abits)
                       .to(x.device))
        x = run_block(fp, block, x)
        del block
        if progress is not None:
            progress(j + 1, fp.num_blocks)
    reference = x.double().pow(2).sum().item()
    return [(y.double() - x.double()).pow(2).sum().item() / reference for y in started]
