"""Cross-layer learning (CQE+'s "two-layer-ahead" loss): while block l trains, its output also
goes through the next blocks l+1 (and l+2 with depth 2) in full precision, frozen, and the loss
adds `weight` times the MSE there against their FP outputs, so block l's error is judged by
what it does downstream:

    L = MSE(B^_l(x^), y_l) + weight * sum_k MSE(B_{l+k}(...B_{l+1}(B^_l(x^))), y_{l+k})

y_{l+k} is the FP stream the run already carries (block l's targets) pushed through the next
blocks once per block, before training. The next blocks' weights are read from storage
read-only, by whichever worker trains block l: nothing travels back between stages, and
streams never move. The model's last block (or last two, at depth 2) uses the blocks that
exist: the last one its own loss only.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from pipeline.config import CrossLayerConfig
from pipeline.model_parts import ModelParts, run_block
from pipeline.streams import ChunkStore


@dataclasses.dataclass
class Downstream:
    """The FP blocks after the one being trained (frozen, float32) and their error's weight."""

    blocks: list[nn.Module]
    weight: float
    indices: list[int]

    @classmethod
    def load(cls, parts: ModelParts, index: int, cfg: CrossLayerConfig) -> Downstream:
        """Blocks index+1 .. index+depth that exist, read from the model's storage."""
        indices = list(range(index + 1, min(index + cfg.depth, parts.num_blocks - 1) + 1))
        blocks = [parts.load_block(i).float().requires_grad_(False) for i in indices]
        return cls(blocks, cfg.weight, indices)

    def loss(self, parts: ModelParts, out: torch.Tensor, targets: list[torch.Tensor]
             ) -> torch.Tensor | float:
        """weight * the sum over the downstream blocks of the MSE of `out` pushed through them
        against their FP outputs `targets` (one per block, in order)."""
        total: torch.Tensor | float = 0.0
        h = out
        for block, target in zip(self.blocks, targets, strict=True):
            h = run_block(parts, block, h).float()
            total = total + nn.functional.mse_loss(h, target.float())
        return total * self.weight


@torch.no_grad()
def downstream_targets(parts: ModelParts, downstream: Downstream, targets: list[Any],
                       store: ChunkStore) -> list[list[Any]]:
    """The FP stream after each downstream block: block l's FP outputs (`targets`) through
    l+1, then l+2; one list of chunk handles per downstream block."""
    out: list[list[Any]] = []
    stream = targets
    for block in downstream.blocks:
        following = []
        for handle in stream:
            h = store.get(handle)
            y = run_block(parts, block, h.to(parts.device).float())
            following.append(store.put(y.to(h.dtype).cpu()))
        out.append(stream := following)
    return out
