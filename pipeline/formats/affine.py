"""Affine integer format: `w ≈ (q - zero_point) * scale`, per output channel or per group of
`group_size` consecutive input columns.

Asymmetric: q in [0, 2^b - 1], scale = (max - min) / (2^b - 1) with min clamped to <= 0 and max
to >= 0 (so 0.0 is exact, as in the GPTQ reference quantizer), zero_point = round(-min / scale).
Symmetric: q in [-2^(b-1), 2^(b-1) - 1], zero_point = 0, and scale = absmax / (2^(b-1) - 1)
(the largest weight exact, code -2^(b-1) unused: llm-compressor's RTN grid) or, with
`full_range`, absmax / 2^(b-1) (every code used, the positive extreme clipped by one step:
AutoRound's grid). The scale is stored, so readers never need to know which.

Observers (how the range is chosen): `minmax` takes the group's extremes; `mse` shrinks them
by each factor 1, 0.99, ..., 0.21 in turn and keeps, per group, the one whose round trip has
the smallest sum of |error|^2.4 (the GPTQ reference quantizer's search: grid 100, shrink down to
0.2, norm 2.4). Min-max wins ties, so the search never does worse by that measure.
"""
from __future__ import annotations

import dataclasses

import torch

_MIN_SCALE = 1e-12
OBSERVERS = ("minmax", "mse")
# the mse search: factors 1 - k / GRID for k < MAX_SHRINK * GRID, error sum |e|^NORM
MSE_GRID, MSE_MAX_SHRINK, MSE_NORM = 100, 0.8, 2.4
# rows searched together: temporaries of at most this many elements (64 MB in float32)
_SEARCH_ELEMENTS = 2**24


@dataclasses.dataclass(frozen=True)
class AffineFormat:
    bits: int
    group_size: int | None = None  # None: one group per output channel
    symmetric: bool = False
    # symmetric only: scale = absmax / 2^(b-1) instead of absmax / (2^(b-1) - 1). Not part of
    # equality: the stored layout (codes, scales) is the same either way.
    full_range: bool = dataclasses.field(default=False, compare=False)
    # how the grid's range is chosen (see the module's docstring); not part of equality either
    observer: str = dataclasses.field(default="minmax", compare=False)

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits: {self.bits} is not allowed; choose an integer from 2 to 8")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size: {self.group_size}; must be positive or None")
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer: {self.observer!r} is not allowed; choose one of "
                             f"{', '.join(OBSERVERS)}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def scale_divisor(self) -> int:
        """What the clipping range (absmax when symmetric, max - min otherwise) is divided by."""
        if self.symmetric and self.full_range:
            return 2 ** (self.bits - 1)
        return self.qmax

    def groups(self, in_features: int) -> int:
        if self.group_size is None:
            return 1
        if in_features % self.group_size:
            raise ValueError(f"group_size {self.group_size} does not divide in_features {in_features}")
        return in_features // self.group_size


@dataclasses.dataclass(frozen=True)
class QuantParams:
    """scale and zero_point, shape [out_features, groups]; zero_point is integer-valued."""

    scale: torch.Tensor
    zero_point: torch.Tensor


def _grouped(w: torch.Tensor, fmt: AffineFormat) -> torch.Tensor:
    out_features, in_features = w.shape
    g = fmt.groups(in_features)
    return w.float().reshape(out_features, g, in_features // g)


def choose_qparams(w: torch.Tensor, fmt: AffineFormat) -> QuantParams:
    """Parameters for a [out, in] weight from the format's observer (min-max or the mse
    search over shrunk ranges)."""
    x = _grouped(w, fmt)
    if fmt.observer == "minmax":
        return _range_qparams(_extremes(x, fmt), fmt, 1.0)
    step = max(1, _SEARCH_ELEMENTS // max(x[0].numel(), 1))
    found = [_searched_qparams(x[r:r + step], fmt) for r in range(0, x.shape[0], step)]
    return QuantParams(torch.cat([p.scale for p in found]),
                       torch.cat([p.zero_point for p in found]))


def _extremes(x: torch.Tensor, fmt: AffineFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of `x` [out, groups, size]: (min clamped to <= 0, max clamped to >= 0), or
    (absmax, absmax) when symmetric."""
    if fmt.symmetric:
        top = x.abs().amax(-1)
        return top, top
    return x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)


def _range_qparams(extremes: tuple[torch.Tensor, torch.Tensor], fmt: AffineFormat,
                   shrink: float) -> QuantParams:
    """Parameters for a range of the extremes times `shrink` (1: min-max)."""
    lo, hi = extremes
    if fmt.symmetric:
        scale = (hi * shrink / fmt.scale_divisor).clamp(min=_MIN_SCALE)
        return QuantParams(scale, torch.zeros_like(scale))
    scale = ((hi * shrink - lo * shrink) / fmt.qmax).clamp(min=_MIN_SCALE)
    return QuantParams(scale, torch.round(-(lo * shrink) / scale))


def _searched_qparams(x: torch.Tensor, fmt: AffineFormat) -> QuantParams:
    """Per group, the shrunk range whose round trip errs least (sum of |error|^MSE_NORM);
    the earliest (widest) factor wins ties."""
    extremes = _extremes(x, fmt)
    work = torch.empty_like(x)
    best = _range_qparams(extremes, fmt, 1.0)
    best_error = _round_trip_error(x, best, fmt, work)
    for k in range(1, int(MSE_MAX_SHRINK * MSE_GRID)):
        p = _range_qparams(extremes, fmt, 1 - k / MSE_GRID)
        error = _round_trip_error(x, p, fmt, work)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = QuantParams(torch.where(better, p.scale, best.scale),
                           torch.where(better, p.zero_point, best.zero_point))
    return best


def _round_trip_error(x: torch.Tensor, p: QuantParams, fmt: AffineFormat,
                      work: torch.Tensor) -> torch.Tensor:
    """Per group, the sum of |dequantize(quantize(x)) - x|^MSE_NORM (computed in `work`)."""
    scale, zero = p.scale.unsqueeze(-1), p.zero_point.unsqueeze(-1)
    torch.div(x, scale, out=work)
    work.round_().add_(zero).clamp_(fmt.qmin, fmt.qmax).sub_(zero).mul_(scale)
    return work.sub_(x).abs_().pow_(MSE_NORM).sum(-1)


def quantize(w: torch.Tensor, qparams: QuantParams, fmt: AffineFormat) -> torch.Tensor:
    """Integer codes (int32, shape of `w`) on the grid [qmin, qmax]."""
    x = _grouped(w, fmt)
    q = torch.round(x / qparams.scale.unsqueeze(-1)) + qparams.zero_point.unsqueeze(-1)
    return q.clamp(fmt.qmin, fmt.qmax).reshape(w.shape).to(torch.int32)


def dequantize(q: torch.Tensor, qparams: QuantParams, fmt: AffineFormat,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x = _grouped(q, fmt)
    w = (x - qparams.zero_point.unsqueeze(-1)) * qparams.scale.unsqueeze(-1)
    return w.reshape(q.shape).to(dtype)


def fake_quantize(w: torch.Tensor, fmt: AffineFormat) -> torch.Tensor:
    """Round-trip `w` through the grid with the observer's parameters, keeping its dtype."""
    qparams = choose_qparams(w, fmt)
    return dequantize(quantize(w, qparams, fmt), qparams, fmt, dtype=w.dtype)


def valid_group_sizes(in_features: list[int], minimum: int = 16) -> list[int]:
    """Group sizes >= `minimum` that divide every given in_features (per-channel always works)."""
    common = in_features[0]
    for n in in_features[1:]:
        common = _gcd(common, n)
    return [d for d in range(minimum, common + 1) if common % d == 0]


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a
