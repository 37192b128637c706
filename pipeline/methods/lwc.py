"""Learnable weight clipping (OmniQuant LWC): the min-max range of every row (or row-group) is
shrunk by learnable factors through a sigmoid, x_max <- sigmoid(up) * max, x_min <- sigmoid(low)
* min. Rounding uses a straight-through estimator; the zero point gets no gradient (as in the
reference), so the factors learn through the scale only. Factors at +inf are plain RTN. With
`direct`, the factors themselves are the parameters (AutoRound's min/max scales), started at
sigmoid(init) and clamped to [0, 1] after every step.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline.formats import AffineFormat, QuantParams, dequantize, quantize
from pipeline.formats.affine import _MIN_SCALE

log = logging.getLogger(__name__)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def _range_grads(d_scale: torch.Tensor, raw: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor,
                 fmt: AffineFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale's gradient passed to the clipped range's ends (hi, lo): through the scale's
    floor, and for symmetric grids through the larger end (split evenly on a tie)."""
    d_raw = d_scale * (raw >= _MIN_SCALE)
    if fmt.symmetric:
        d_m = d_raw / fmt.scale_divisor
        tie = hi == -lo
        return (torch.where(tie, d_m / 2, d_m * (hi > -lo)),
                -torch.where(tie, d_m / 2, d_m * (-lo > hi)))
    return d_raw / fmt.qmax, -d_raw / fmt.qmax


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
        d_hi, d_lo = _range_grads(d_scale, raw, hi, lo, fmt)
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


# torch.compile's backend for the fused quantizer (the tests use "eager": the same graph
# capture without inductor's C++ code generation)
FUSED_BACKEND = "inductor"


def _fq_grid(x: torch.Tensor, up: torch.Tensor, low: torch.Tensor, offset: torch.Tensor | None,
             fmt: AffineFormat) -> tuple[torch.Tensor, ...]:
    """LearnedFakeQuant's forward as plain operations (the same ones, in the same order):
    (top, bottom, hi, lo, raw, scale, s, z, y) with y the rounded grid before the clamp."""
    top, bottom = x.amax(-1), x.amin(-1)
    hi, lo = top.clamp(min=0) * up, bottom.clamp(max=0) * low
    if fmt.symmetric:
        raw = torch.maximum(hi, -lo) / fmt.scale_divisor
    else:
        raw = (hi - lo) / fmt.qmax
    scale = raw.clamp(min=_MIN_SCALE)
    zero = torch.zeros_like(scale) if fmt.symmetric else torch.round(-lo / scale)
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    y = x / s
    if offset is not None:
        y = y + offset
    return top, bottom, hi, lo, raw, scale, s, z, torch.round(y) + z


def _fq_forward(x: torch.Tensor, up: torch.Tensor, low: torch.Tensor,
                offset: torch.Tensor | None, fmt: AffineFormat) -> torch.Tensor:
    *_, s, z, y = _fq_grid(x, up, low, offset, fmt)
    return (y.clamp(fmt.qmin, fmt.qmax) - z) * s


def _fq_backward(x: torch.Tensor, up: torch.Tensor, low: torch.Tensor,
                 offset: torch.Tensor | None, grad: torch.Tensor, fmt: AffineFormat,
                 weight_grad: bool) -> tuple[torch.Tensor | None, ...]:
    """(d_x, d_up, d_low, d_offset) of `_fq_forward`: LearnedFakeQuant.backward's formulas,
    the grid recomputed from the inputs instead of saved (one fused pass when compiled)."""
    top, bottom, hi, lo, raw, scale, s, z, y = _fq_grid(x, up, low, offset, fmt)
    hi_x, lo_x = top.clamp(min=0), bottom.clamp(max=0)
    inside = ((y >= fmt.qmin) & (y <= fmt.qmax)).to(x.dtype)
    codes = y.clamp(fmt.qmin, fmt.qmax) - z
    g_in = grad * inside
    d_offset = g_in * s if offset is not None else None
    d_scale = (grad * codes).sum(-1) - (g_in * x).sum(-1) / scale
    d_hi, d_lo = _range_grads(d_scale, raw, hi, lo, fmt)
    d_x = None
    if weight_grad:
        # the range's gradient shared by the group's extreme weights (as amax's and amin's)
        at_top = (x == top.unsqueeze(-1)).to(x.dtype)
        at_bottom = (x == bottom.unsqueeze(-1)).to(x.dtype)
        d_top = d_hi * up * (top >= 0) / at_top.sum(-1)
        d_bottom = d_lo * low * (bottom <= 0) / at_bottom.sum(-1)
        d_x = g_in + at_top * d_top.unsqueeze(-1) + at_bottom * d_bottom.unsqueeze(-1)
    return d_x, d_hi * hi_x, d_lo * lo_x, d_offset


@functools.cache
def _fused_kernels(backend: str, fmt: AffineFormat, has_offset: bool, weight_grad: bool,
                   shape: tuple[int, ...], device: str
                   ) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The forward and the backward compiled for one format (its constants baked in), weight
    shape and device type (a model has a handful of shapes, CVXQ's mixed widths more formats).
    Dynamo counts compilations per code object, which all these pairs share: past its
    `recompile_limit` (8) it would run the new ones eagerly, saying so only in a log, so the
    limit is raised with every pair made."""
    made = _fused_kernels.cache_info().currsize + 1  # this pair among those compiled so far
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 8 + made)

    def forward(x: torch.Tensor, up: torch.Tensor, low: torch.Tensor,
                offset: torch.Tensor | None) -> torch.Tensor:
        return _fq_forward(x, up, low, offset, fmt)

    def backward(x: torch.Tensor, up: torch.Tensor, low: torch.Tensor,
                 offset: torch.Tensor | None, grad: torch.Tensor) -> tuple[Any, ...]:
        return _fq_backward(x, up, low, offset, grad, fmt, weight_grad)

    return (torch.compile(forward, backend=backend, dynamic=False),
            torch.compile(backward, backend=backend, dynamic=False))


_FUSED_FAILED: list[str] = []


def fused_quantizer_compiled() -> bool:
    """False once compiling the fused quantizer failed in this process (it runs eagerly)."""
    return not _FUSED_FAILED


def _run_fused(which: int, fmt: AffineFormat, has_offset: bool, weight_grad: bool,
               *args: Any) -> Any:
    """The compiled kernel `which` (0: forward, 1: backward); where compilation fails (no C++
    compiler, an unsupported device) the same operations eagerly, with one warning."""
    if not _FUSED_FAILED:
        try:
            x = args[0]
            return _fused_kernels(FUSED_BACKEND, fmt, has_offset, weight_grad, tuple(x.shape),
                                  x.device.type)[which](*args)
        except Exception as e:  # noqa: BLE001 (torch._dynamo and inductor raise many kinds)
            _FUSED_FAILED.append(repr(e))
            log.warning("quantization.omniquant.compile_quantizer: compiling the quantizer "
                        "failed (%s); it runs eagerly (slower, the same values)", e)
    if which == 0:
        x, up, low, offset = args
        return _fq_forward(x, up, low, offset, fmt)
    x, up, low, offset, grad = args
    return _fq_backward(x, up, low, offset, grad, fmt, weight_grad)


class FusedFakeQuant(torch.autograd.Function):
    """LearnedFakeQuant with its forward and backward each compiled into fused loops
    (`quantization.omniquant.compile_quantizer`): a few passes over the weight instead of
    some thirty, and only the inputs saved for the backward (the grid is recomputed). The
    same values forward; gradients equal to float rounding (the sums' order)."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, up: torch.Tensor, low: torch.Tensor,
                offset: torch.Tensor | None, fmt: AffineFormat) -> torch.Tensor:
        rows, groups = up.shape
        x = weight.reshape(rows, groups, -1)
        v = offset.reshape(x.shape) if offset is not None else None
        ctx.fmt = fmt
        ctx.save_for_backward(x, up, low, v)
        out = _run_fused(0, fmt, v is not None, False, x, up, low, v)
        return out.reshape(weight.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        x, up, low, v = ctx.saved_tensors
        d_x, d_up, d_low, d_v = _run_fused(1, ctx.fmt, v is not None, ctx.needs_input_grad[0],
                                           x, up, low, v, grad.reshape(x.shape).contiguous())
        return (d_x.reshape(grad.shape) if d_x is not None else None,
                d_up if ctx.needs_input_grad[1] else None,
                d_low if ctx.needs_input_grad[2] else None,
                d_v.reshape(grad.shape) if d_v is not None else None, None)


class ClippingFactors(nn.Module):
    """One pair of clipping parameters (logits, or with `direct` the factors) per row
    (per-channel) or per row-group, shape [out, groups]."""

    def __init__(self, weight_shape: torch.Size, fmt: AffineFormat, init: float,
                 device: torch.device | str = "cpu", learn_rounding: bool = False,
                 direct: bool = False, fused: bool = False):
        super().__init__()
        self.fused = fused  # FusedFakeQuant (compiled) in place of LearnedFakeQuant
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
        some forty (`fused`: compiled into a few)."""
        up, low = self.factors()
        function = FusedFakeQuant if self.fused else LearnedFakeQuant
        return function.apply(weight, up, low, self.offset, self.fmt)

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
