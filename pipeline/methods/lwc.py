"""Learnable weight clipping (OmniQuant LWC): the min-max range of every row (or row-group) is
shrunk by learnable factors through a sigmoid, x_max <- sigmoid(up) * max, x_min <- sigmoid(low)
* min. Rounding uses a straight-through estimator; the zero point gets no gradient (as in the
reference), so the factors learn through the scale only. Factors at +inf are plain RTN. With
`direct`, the factors themselves are the parameters (AutoRound's min/max scales), started at
sigmoid(init) and clamped to [0, 1] after every step.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.formats import AffineFormat, QuantParams, dequantize, quantize
from pipeline.formats.affine import _MIN_SCALE


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


class LearnedFakeQuant(torch.autograd.Function):
    """out = (clamp(round(x / s + v) + z, qmin, qmax) - z) * s per row group of x, where
    s = (max(x, 0) * up - min(x, 0) * low) / qmax (symmetric: max of the two over the
    divisor), z = round(-min(x, 0) * low / s) without gradient, v the learned rounding offset
    (or none). Gradients: the round is straight-through (zero outside the clamp), the scale's
    through the range to `up`, `low` and the group's extreme weights (shared among ties)."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, up: torch.Tensor, low: torch.Tensor,
                offset: torch.Tensor | None, fmt: AffineFormat) -> torch.Tensor:
        rows, groups = up.shape
        x = weight.reshape(rows, groups, -1)
        top, bottom = x.amax(-1), x.amin(-1)  # (amax is several times faster than max)
        hi_x, lo_x = top.clamp(min=0), bottom.clamp(max=0)
        hi, lo = hi_x * up, lo_x * low
        if fmt.symmetric:
            raw = torch.maximum(hi, -lo) / fmt.scale_divisor
        else:
            raw = (hi - lo) / fmt.qmax
        scale = raw.clamp(min=_MIN_SCALE)
        zero = (torch.zeros_like(scale) if fmt.symmetric else torch.round(-lo / scale))
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
        y = x / s
        if offset is not None:
            y += offset.reshape(y.shape)
        y.round_().add_(z)
        codes = y.clamp(fmt.qmin, fmt.qmax)
        # 1 inside the grid, 0 where clamped (float arithmetic: comparisons into bool are
        # several times slower on the CPU)
        inside = y.sub_(codes).abs_().clamp_(max=1).neg_().add_(1)
        codes.sub_(z)  # q - z
        ctx.fmt = fmt
        ctx.has_offset = offset is not None
        ctx.save_for_backward(x, up, low, top, bottom, hi, lo, raw, scale, inside, codes)
        return (codes * s).reshape(weight.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        x, up, low, top, bottom, hi, lo, raw, scale, inside, codes = ctx.saved_tensors
        fmt = ctx.fmt
        hi_x, lo_x = top.clamp(min=0), bottom.clamp(max=0)
        g = grad.reshape(x.shape)
        g_in = g * inside  # through the straight-through round (zero where clamped)
        s = scale.unsqueeze(-1)
        d_offset = (g_in * s).reshape(grad.shape) if ctx.has_offset else None
        # out = codes * s with codes = round(x / s + v) inside: d/ds = codes - x / s there
        d_scale = (g * codes).sum(-1) - (g_in * x).sum(-1) / scale
        d_raw = d_scale * (raw >= _MIN_SCALE)
        if fmt.symmetric:
            d_m = d_raw / fmt.scale_divisor
            tie = hi == -lo
            d_hi = torch.where(tie, d_m / 2, d_m * (hi > -lo))
            d_lo = -torch.where(tie, d_m / 2, d_m * (-lo > hi))
        else:
            d_hi, d_lo = d_raw / fmt.qmax, -d_raw / fmt.qmax
        d_up = d_hi * hi_x if ctx.needs_input_grad[1] else None
        d_low = d_lo * lo_x if ctx.needs_input_grad[2] else None
        d_weight = None
        if ctx.needs_input_grad[0]:
            d_x = g_in
            # the range's own gradient, shared by the group's extreme weights (as amax's and
            # amin's), through the clamps at 0; masks in float arithmetic as above
            for extreme, d_ext in ((top, d_hi * up * (top >= 0)),
                                   (bottom, d_lo * low * (bottom <= 0))):
                at = (x - extreme.unsqueeze(-1)).abs_().sign_().neg_().add_(1)
                d_x = d_x.addcmul_(at, (d_ext / at.sum(-1)).unsqueeze(-1))
            d_weight = d_x.reshape(grad.shape)
        return d_weight, d_up, d_low, d_offset, None


class ClippingFactors(nn.Module):
    """One pair of clipping parameters (logits, or with `direct` the factors) per row
    (per-channel) or per row-group, shape [out, groups]."""

    def __init__(self, weight_shape: torch.Size, fmt: AffineFormat, init: float,
                 device: torch.device | str = "cpu", learn_rounding: bool = False,
                 direct: bool = False):
        super().__init__()
        out_features, in_features = weight_shape
        shape = (out_features, fmt.groups(in_features))
        self.fmt = fmt
        self.direct = direct
        start = torch.sigmoid(torch.tensor(float(init))).item() if direct else float(init)
        self.up = nn.Parameter(torch.full(shape, start, device=device))
        self.low = nn.Parameter(torch.full(shape, start, device=device))
        # learned rounding: w/scale + offset is rounded, offset in [-0.5, 0.5] (AutoRound's V)
        self.offset = (nn.Parameter(torch.zeros(weight_shape, device=device))
                       if learn_rounding else None)

    def clamp_(self) -> None:
        """Back into range after an optimizer step: the rounding offset to [-0.5, 0.5], direct
        factors to [0, 1]."""
        with torch.no_grad():
            if self.offset is not None:
                self.offset.clamp_(-0.5, 0.5)
            if self.direct:
                self.up.clamp_(0, 1)
                self.low.clamp_(0, 1)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(factor on the max, factor on the min), each [out, groups], in [0, 1]."""
        if self.direct:
            return self.up, self.low
        return torch.sigmoid(self.up), torch.sigmoid(self.low)

    def _grid(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x / scale (+ the learned rounding offset), grouped like x."""
        y = x / scale.unsqueeze(-1)
        if self.offset is not None:
            y = y + self.offset.reshape(y.shape)
        return y

    @torch.no_grad()
    def start_rounding_at_(self, weight: torch.Tensor, codes: torch.Tensor) -> int:
        """Set the learned offset so that the current grid rounds `weight` to `codes` (e.g.
        GPTQ's), as far as [-0.5, 0.5] allows; returns how many codes it could not reach."""
        assert self.offset is not None
        scale, zero = self.qparams(weight)
        out_features = weight.shape[0]
        x = weight.reshape(out_features, scale.shape[1], -1)
        q = codes.reshape(x.shape).to(x.dtype)
        self.offset.copy_((q - zero.unsqueeze(-1) - x / scale.unsqueeze(-1))
                          .clamp(-0.5, 0.5).reshape(self.offset.shape))
        reached = (torch.round(self._grid(x, scale)) + zero.unsqueeze(-1)).clamp(
            self.fmt.qmin, self.fmt.qmax)
        return int((reached != q).sum())

    def qparams(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point), each [out, groups]; scale carries the gradient."""
        fmt = self.fmt
        out_features, in_features = weight.shape
        g = fmt.groups(in_features)
        x = weight.reshape(out_features, g, in_features // g)
        up, low = self.factors()
        hi = x.amax(-1).clamp(min=0) * up
        lo = x.amin(-1).clamp(max=0) * low
        if fmt.symmetric:
            scale = (torch.maximum(hi, -lo) / fmt.scale_divisor).clamp(min=_MIN_SCALE)
            return scale, torch.zeros_like(scale).detach()
        scale = ((hi - lo) / fmt.qmax).clamp(min=_MIN_SCALE)
        return scale, torch.round(-lo / scale).detach()

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """Differentiable fake-quant of `weight` (in the training dtype): `LearnedFakeQuant`,
        the same function as min-max clipping, a straight-through round and the learned
        offset written as autograd ops, in a handful of passes over the weight instead of
        some forty."""
        up, low = self.factors()
        return LearnedFakeQuant.apply(weight, up, low, self.offset, self.fmt)

    @torch.no_grad()
    def export(self, weight: torch.Tensor, scale_dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor, QuantParams]:
        """(dequantized weight in weight's dtype, integer codes, parameters) with the learned
        clipping; scales rounded to their stored dtype first, as RTN does."""
        scale, zero = self.qparams(weight.float())
        qparams = QuantParams(scale.to(scale_dtype).float(), zero.float())
        if self.offset is None:
            codes = quantize(weight, qparams, self.fmt)
        else:
            out_features = weight.shape[0]
            x = weight.float().reshape(out_features, qparams.scale.shape[1], -1)
            q = torch.round(self._grid(x, qparams.scale)) + qparams.zero_point.unsqueeze(-1)
            codes = q.clamp(self.fmt.qmin, self.fmt.qmax).reshape(weight.shape).to(torch.int32)
        return dequantize(codes, qparams, self.fmt, dtype=weight.dtype), codes, qparams
