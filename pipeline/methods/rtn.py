"""Round-to-nearest: min-max parameters, nearest grid point. The baseline every method beats."""
from __future__ import annotations

import torch

from pipeline.formats import AffineFormat, QuantParams, choose_qparams, dequantize, quantize


def rtn_quantize(weight: torch.Tensor, fmt: AffineFormat,
                 scale_dtype: torch.dtype = torch.float32
                 ) -> tuple[torch.Tensor, torch.Tensor, QuantParams]:
    """Returns (dequantized weight in weight's dtype, integer codes, parameters). Scales are
    rounded to `scale_dtype`, the precision they will be stored in."""
    qparams = choose_qparams(weight, fmt)
    qparams = QuantParams(qparams.scale.to(scale_dtype).float(), qparams.zero_point)
    codes = quantize(weight, qparams, fmt)
    return dequantize(codes, qparams, fmt, dtype=weight.dtype), codes, qparams
