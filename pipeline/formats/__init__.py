"""Number formats: the affine integer grid and its parameters."""
from pipeline.formats.affine import (
    OBSERVERS,
    AffineFormat,
    QuantParams,
    choose_qparams,
    dequantize,
    fake_quantize,
    quantize,
    valid_group_sizes,
)

__all__ = [
    "OBSERVERS",
    "AffineFormat",
    "QuantParams",
    "choose_qparams",
    "dequantize",
    "fake_quantize",
    "quantize",
    "valid_group_sizes",
]
