"""Learnable weight clipping (OmniQuant LWC): the min-max range of every row (or row-group) is
shrunk by learnable factors through a sigmoid, x_max <- sigmoid(up) * max, x_min <- sigmoid(low)
* min. Rounding uses a straight-through estimator; the zero point gets no gradient (as in the
reference), so the factors learn through the scale only. Factors at +inf are plain RTN.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.formats import AffineFormat, QuantParams, dequantize, quantize
from pipeline.formats.affine import _MIN_SCALE


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


class ClippingFactors(nn.Module):
    """One pair of logits per row (per-channel) or per row-group, shape [out, groups]."""

    def __init__(self, weight_shape: torch.Size, fmt: AffineFormat, init: float,
                 device: torch.device | str = "cpu"):
        super().__init__()
        out_features, in_features = weight_shape
        shape = (out_features, fmt.groups(in_features))
        self.fmt = fmt
        self.up = nn.Parameter(torch.full(shape, float(init), device=device))
        self.low = nn.Parameter(torch.full(shape, float(init), device=device))

    def qparams(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point), each [out, groups]; scale carries the gradient."""
        fmt = self.fmt
        out_features, in_features = weight.shape
        g = fmt.groups(in_features)
        x = weight.reshape(out_features, g, in_features // g)
        hi = x.amax(-1).clamp(min=0) * torch.sigmoid(self.up)
        lo = x.amin(-1).clamp(max=0) * torch.sigmoid(self.low)
        if fmt.symmetric:
            scale = (torch.maximum(hi, -lo) / fmt.qmax).clamp(min=_MIN_SCALE)
            return scale, torch.zeros_like(scale).detach()
        scale = ((hi - lo) / fmt.qmax).clamp(min=_MIN_SCALE)
        return scale, torch.round(-lo / scale).detach()

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """Differentiable fake-quant of `weight` (in the training dtype)."""
        fmt = self.fmt
        out_features = weight.shape[0]
        scale, zero = self.qparams(weight)
        x = weight.reshape(out_features, scale.shape[1], -1)
        q = (round_ste(x / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(fmt.qmin, fmt.qmax)
        return ((q - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(weight.shape)

    @torch.no_grad()
    def export(self, weight: torch.Tensor, scale_dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor, QuantParams]:
        """(dequantized weight in weight's dtype, integer codes, parameters) with the learned
        clipping; scales rounded to their stored dtype first, as RTN does."""
        scale, zero = self.qparams(weight.float())
        qparams = QuantParams(scale.to(scale_dtype).float(), zero.float())
        codes = quantize(weight, qparams, self.fmt)
        return dequantize(codes, qparams, self.fmt, dtype=weight.dtype), codes, qparams
