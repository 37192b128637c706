"""Forward hooks on a block's linears: per-token activation fake-quant (abits < 16) and
visitors of each linear's input (statistics, Hessians, means)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from pipeline.formats import AffineFormat
from pipeline.methods.let import ActStats
from pipeline.methods.lwc import round_ste


def fake_quant_tokens(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token dynamic asymmetric min-max fake-quant (straight-through rounding)."""
    qmax = 2**bits - 1
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / qmax).clamp(min=1e-8).detach()
    zero = torch.round(-lo / scale).detach()
    q = (round_ste(x / scale) + zero).clamp(0, qmax)
    return (q - zero) * scale


@contextlib.contextmanager
def activation_quant(block: nn.Module, names: list[str], abits: int) -> Iterator[None]:
    """Fake-quantize the inputs of the named linears while the context is open (no-op at 16)."""
    if abits >= 16:
        yield
        return
    hooks = [block.get_submodule(n).register_forward_pre_hook(
        lambda _m, args: (fake_quant_tokens(args[0], abits), *args[1:])) for n in names]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def input_hooks(block: nn.Module, names: list[str],
                visit: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    hooks = [block.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: visit(n, args[0])) for n in names]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def input_stats(block: nn.Module, names: list[str]) -> tuple[dict[str, ActStats], Callable]:
    """Stats dict filled by the visitor that `input_hooks` calls."""
    stats: dict[str, ActStats] = {}

    def visit(name: str, x: torch.Tensor) -> None:
        if name not in stats:
            stats[name] = ActStats.empty(x.shape[-1], x.device)
        stats[name].update(x)

    return stats, visit


def quantized_names(formats: dict[str, AffineFormat | None]) -> list[str]:
    return [n for n, f in formats.items() if f is not None]
