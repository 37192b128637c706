"""How a block's learnable parameters are trained: the optimizer (the reference's AdamW or
AutoRound's sign gradient with a linear decay) and the precision (fp16 autocast on CUDA)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pipeline.config import OmniQuantConfig, Optimizer
from pipeline.formats import AffineFormat


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


def use_amp(device: str, formats: dict[str, AffineFormat | None], abits: int) -> bool:
    """fp16 autocast with loss scaling on CUDA, except where 8-bit fake-quant overflows fp16
    gradients (the reference's rule: 8 <= bits < 16 trains in fp32)."""
    bits = [f.bits for f in formats.values() if f is not None] + [abits]
    return device.startswith("cuda") and all(b < 8 or b >= 16 for b in bits)
