"""The optimizer of a block's learnable parameters: the reference's AdamW or AutoRound's sign
gradient with a linear learning-rate decay."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pipeline.config import OmniQuantConfig, Optimizer


class SignSGD(torch.optim.Optimizer):
    """p <- p - lr * sign(grad) (AutoRound's optimizer)."""

    def __init__(self, params: Any, lr: float = 5e-3):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


def make_optimizer(groups: list[dict[str, Any]], cfg: OmniQuantConfig, steps: Callable[[], int]
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """The configured optimizer over the parameter groups, and its learning-rate schedule
    (signsgd: linear decay to 0 over the `steps()` optimizer steps of the run)."""
    if cfg.optimizer is Optimizer.ADAMW:
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay), None
    optimizer = SignSGD(groups)
    total = max(steps(), 1)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / total)
