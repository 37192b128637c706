"""The precision of a block's training step and stream passes: autocast (float16 on CUDA by
default, bfloat16 on request and on CPUs with bfloat16 kernels), with loss scaling for
float16."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging

import torch

from pipeline.config import Autocast, Method, QuantizationConfig
from pipeline.formats import AffineFormat

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Precision:
    """How a block's training step runs: autocast to `dtype` (None: plain float32), with loss
    scaling for float16."""

    device_type: str
    dtype: torch.dtype | None

    @property
    def name(self) -> str:
        return str(self.dtype or torch.float32).removeprefix("torch.")

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype or torch.bfloat16,
                              enabled=self.dtype is not None)

    def scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device_type) if self.dtype is torch.float16 else None


@functools.cache
def cpu_has_bf16_kernels() -> bool:
    """Whether this CPU runs bfloat16 matmuls in oneDNN's kernels (AVX-512 or AMX; AArch64
    with BF16). Without them (AVX2 only) PyTorch falls back to a reference path: a P1 block's
    training step under bfloat16 autocast then takes about 6.5x its float32 time (measured
    on an AVX2 EPYC), instead of about 0.75x."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def training_precision(device: str, formats: dict[str, AffineFormat | None], abits: int,
                       choice: Autocast) -> Precision:
    """`quantization.omniquant.autocast` on this device. auto: the fastest precision that
    trains well here: float16 autocast on CUDA except where 8-bit fake-quant overflows
    float16 gradients (the reference's rule: 8 <= bits < 16 trains in float32); on the CPU
    bfloat16 where it has bfloat16 kernels (`cpu_has_bf16_kernels`), else float32.
    An explicit bfloat16 on a CPU without them is kept, with a warning."""
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if choice is Autocast.AUTO:
        if device_type == "cpu":
            return Precision("cpu", torch.bfloat16 if cpu_has_bf16_kernels() else None)
        bits = [f.bits for f in formats.values() if f is not None] + [abits]
        fp16 = all(b < 8 or b >= 16 for b in bits)
        return Precision(device_type, torch.float16 if fp16 else None)
    if choice is Autocast.BFLOAT16 and device_type == "cpu" and not cpu_has_bf16_kernels():
        _warn_slow_bf16()
    dtypes = {Autocast.FLOAT32: None, Autocast.BFLOAT16: torch.bfloat16,
              Autocast.FLOAT16: torch.float16}
    return Precision(device_type, dtypes[choice])


def stream_precision(device: str, formats: dict[str, AffineFormat | None],
                     quantization: QuantizationConfig) -> contextlib.AbstractContextManager:
    """The precision of a block's calibration stream passes: the training's autocast with
    `quantization.omniquant.stream_autocast` (a learned method), else plain float32."""
    omni = quantization.omniquant
    if quantization.method is not Method.OMNIQUANT or not omni.stream_autocast:
        return contextlib.nullcontext()
    return training_precision(device, formats, quantization.abits,
                              omni.autocast).autocast()


def stream_block_dtype(device: str, formats: dict[str, AffineFormat | None],
                       quantization: QuantizationConfig) -> torch.dtype | None:
    """With `stream_autocast` and `stream_cast_block` in bfloat16 training, the block's stream
    passes run the block cast to bfloat16 (its parameters once per pass, the windows'
    activations); None: the block as it is (under `stream_precision`)."""
    omni = quantization.omniquant
    if (quantization.method is not Method.OMNIQUANT or not omni.stream_autocast
            or not omni.stream_cast_block):
        return None
    precision = training_precision(device, formats, quantization.abits, omni.autocast)
    return torch.bfloat16 if precision.dtype is torch.bfloat16 else None


@functools.cache
def _warn_slow_bf16() -> None:
    log.warning("quantization.omniquant.autocast: bfloat16 on a CPU without bfloat16 kernels "
                "(no AVX-512/AMX): training runs several times slower than in float32; "
                "autocast: auto picks float32 here")
