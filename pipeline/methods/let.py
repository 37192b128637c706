"""Learnable equivalent transformation (OmniQuant LET): per-channel scales (and shifts) that move
quantization difficulty between activations and weights without changing the block's function.

- norm -> consumers (q/k/v; gate/up; OPT fc1): norm weight / s, norm bias (b - d) / s, consumer
  columns * s, consumer bias + W d.
- v -> o: v rows / s (bias (b - d) / s), o columns * s (bias + W_o d); exact because attention
  rows sum to 1. Under GQA, s is sized to the key-value heads and expanded over the query heads
  that share each one (as `repeat_kv` does), so it works for Llama-2/3-70B.
- q/k: q rows / s, k rows * s (biases likewise), so Q K^T is unchanged. With rotary positions s is
  tied within each rotary pair (channels i and i + head_dim/2, `rotate_half`), which keeps the
  product exact after RoPE; sized to the key-value heads under GQA. Blocks with a q/k norm
  (Qwen3) get no q/k scale: the norm would undo it.
Shifts are used only where every touched module has a bias to absorb them (OPT) and activations
are quantized (as the reference). Init: SmoothQuant, s = max|x|^alpha / max|W|^(1-alpha);
q/k scales start at one.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from pipeline.adapters import Adapter, Positions

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ActStats:
    """Per-channel statistics of a linear's input over the calibration tokens."""

    absmax: torch.Tensor
    minimum: torch.Tensor
    maximum: torch.Tensor

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        self.minimum = torch.minimum(self.minimum, x.amin(0))
        self.maximum = torch.maximum(self.maximum, x.amax(0))

    @classmethod
    def empty(cls, channels: int, device: torch.device | str) -> ActStats:
        return cls(torch.zeros(channels, device=device),
                   torch.full((channels,), float("inf"), device=device),
                   torch.full((channels,), float("-inf"), device=device))


@dataclasses.dataclass(frozen=True)
class Heads:
    query: int
    key_value: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.query // self.key_value

    def expand(self, kv_vector: torch.Tensor) -> torch.Tensor:
        """[key_value * head_dim] -> [query * head_dim], each kv head over its query heads."""
        v = kv_vector.reshape(self.key_value, 1, self.head_dim)
        return v.expand(self.key_value, self.group, self.head_dim).reshape(-1)

    def reduce_max(self, query_vector: torch.Tensor) -> torch.Tensor:
        """[query * head_dim] -> [key_value * head_dim], max over the query heads of a group."""
        return query_vector.reshape(self.key_value, self.group, self.head_dim).amax(1).reshape(-1)


def heads_of(hf_config: Any) -> Heads:
    query = int(hf_config.num_attention_heads)
    kv = int(getattr(hf_config, "num_key_value_heads", None) or query)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // query
    return Heads(query, kv, int(head_dim))


def _truncate(s: torch.Tensor, floor: float = 1e-2) -> torch.Tensor:
    """|s| >= floor (the reference's overflow guard), identity gradient."""
    guarded = torch.where(s.abs() < floor, torch.where(s < 0, -floor, floor), s)
    return (guarded - s).detach() + s


def smooth_init(xmax: torch.Tensor, wmax: torch.Tensor, alpha: float) -> torch.Tensor:
    return (xmax.clamp(min=1e-5).pow(alpha) / wmax.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)


def _has_bias(block: nn.Module, name: str) -> bool:
    return getattr(block.get_submodule(name), "bias", None) is not None


class EquivalentTransform(nn.Module):
    """The LET parameters of one block and the map from its tensors to transformed tensors."""

    def __init__(self, block: nn.Module, adapter: Adapter, hf_config: Any,
                 stats: dict[str, ActStats], alpha: float = 0.5, shift: bool = False):
        super().__init__()
        self.adapter = adapter
        self.heads = heads_of(hf_config)
        self.rotary = adapter.positions is Positions.ROTARY
        device = next(block.parameters()).device
        self.groups: list[tuple[str, tuple[str, ...], bool]] = []
        self.scales = nn.ParameterDict()
        self.shifts = nn.ParameterDict()
        for norm, linears in adapter.norm_to_linears:
            stat = stats[linears[0]]
            wmax = torch.stack([block.get_parameter(f"{n}.weight").detach().abs().amax(0)
                                for n in linears]).amax(0).float()
            use_shift = (shift and _has_bias(block, norm)
                         and all(_has_bias(block, n) for n in linears))
            self.groups.append((norm, linears, use_shift))
            key = _key(norm)
            self.scales[key] = nn.Parameter(smooth_init(stat.absmax, wmax, alpha).to(device))
            if use_shift:
                self.shifts[key] = nn.Parameter(((stat.maximum + stat.minimum) / 2).to(device))
        v, o = adapter.value_out
        kv_width = self.heads.key_value * self.heads.head_dim
        shapes_ok = (block.get_parameter(f"{v}.weight").shape[0] == kv_width
                     and block.get_parameter(f"{o}.weight").shape[1]
                     == self.heads.query * self.heads.head_dim
                     and self.heads.query % self.heads.key_value == 0)
        if not shapes_ok:
            log.warning("LET: attention shapes do not match the config's heads; v->o and q/k "
                        "transforms are off for this block")
        self.value_out = shapes_ok
        self.value_shift = False
        if shapes_ok:
            stat = stats[o]
            wmax = self.heads.reduce_max(block.get_parameter(f"{o}.weight").detach().abs()
                                         .amax(0).float())
            self.scales["value_out"] = nn.Parameter(
                smooth_init(self.heads.reduce_max(stat.absmax), wmax, alpha).to(device))
            self.value_shift = shift and _has_bias(block, v) and _has_bias(block, o)
            if self.value_shift:
                # the shift must be equal over the query heads sharing a kv head: use their mean
                mid = ((stat.maximum + stat.minimum) / 2).reshape(
                    self.heads.key_value, self.heads.group, self.heads.head_dim).mean(1)
                self.shifts["value_out"] = nn.Parameter(mid.reshape(-1).to(device))
        # a norm on q/k after the projection would undo a q/k scale
        has_qk_norm = any(name.endswith(("q_norm", "k_norm")) for name, _ in
                          block.named_modules())
        self.query_key = shapes_ok and not has_qk_norm
        if self.query_key:
            width = self.heads.head_dim // 2 if self.rotary else self.heads.head_dim
            self.scales["query_key"] = nn.Parameter(
                torch.ones(self.heads.key_value, width, device=device))

    def scale_parameters(self) -> list[nn.Parameter]:
        return [*self.scales.values(), *self.shifts.values()]

    def _qk_scale(self) -> torch.Tensor:
        s = _truncate(self.scales["query_key"])
        if self.rotary:
            s = torch.cat([s, s], dim=-1)  # rotate_half pairs channel i with i + head_dim/2
        return s.reshape(-1)

    def transform(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """New values for the block's tensors (relative names), differentiable in the scales."""
        t = dict(tensors)
        for norm, linears, use_shift in self.groups:
            key = _key(norm)
            s = _truncate(self.scales[key])
            d = self.shifts[key] if use_shift else None
            t[f"{norm}.weight"] = t[f"{norm}.weight"] / s
            if f"{norm}.bias" in t:  # LayerNorm: its bias is part of the output being scaled
                t[f"{norm}.bias"] = (t[f"{norm}.bias"] - (0 if d is None else d)) / s
            for n in linears:
                w = t[f"{n}.weight"]
                if d is not None:
                    t[f"{n}.bias"] = t[f"{n}.bias"] + w @ d
                t[f"{n}.weight"] = w * s.unsqueeze(0)
        if self.value_out:
            v, o = self.adapter.value_out
            s = _truncate(self.scales["value_out"])
            d = self.shifts["value_out"] if self.value_shift else None
            if d is not None:
                t[f"{v}.bias"] = (t[f"{v}.bias"] - d) / s
                t[f"{o}.bias"] = t[f"{o}.bias"] + t[f"{o}.weight"] @ self.heads.expand(d)
            elif f"{v}.bias" in t:
                t[f"{v}.bias"] = t[f"{v}.bias"] / s
            t[f"{v}.weight"] = t[f"{v}.weight"] / s.unsqueeze(1)
            t[f"{o}.weight"] = t[f"{o}.weight"] * self.heads.expand(s).unsqueeze(0)
        if self.query_key:
            q, k = self.adapter.query_key
            s = self._qk_scale()
            sq = self.heads.expand(s)
            t[f"{q}.weight"] = t[f"{q}.weight"] / sq.unsqueeze(1)
            t[f"{k}.weight"] = t[f"{k}.weight"] * s.unsqueeze(1)
            if f"{q}.bias" in t:
                t[f"{q}.bias"] = t[f"{q}.bias"] / sq
            if f"{k}.bias" in t:
                t[f"{k}.bias"] = t[f"{k}.bias"] * s
        return t


def _key(module_path: str) -> str:
    return module_path.replace(".", "__")
