"""Export layouts. The output folder itself is the compressed-tensors checkpoint; GPTQ and
fake-quant copies go to sub-folders. A block's tensors are laid out here, per format, by the
stage that owns the block; the shared parts (config, index) by the coordinator."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from pipeline.config import ExportFormat
from pipeline.formats import AffineFormat, QuantParams, dequantize, gptq
from pipeline.formats import compressed_tensors as ct

FOLDERS = {ExportFormat.COMPRESSED_TENSORS: "", ExportFormat.GPTQ: "gptq",
           ExportFormat.FAKE_QUANT: "fake_quant", ExportFormat.FAKE_QUANT_LORC: "fake_quant_lorc"}
FAKE_QUANT_LAYOUTS = (ExportFormat.FAKE_QUANT, ExportFormat.FAKE_QUANT_LORC)


@dataclasses.dataclass
class QuantizedLinear:
    codes: torch.Tensor  # int32 [out, in] on the format's grid
    qparams: QuantParams
    fmt: AffineFormat

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.codes, self.qparams, self.fmt, dtype=dtype)


def block_tensors(path: str, state: dict[str, torch.Tensor], linears: dict[str, QuantizedLinear],
                  dtypes: dict[str, torch.dtype], fmt: ExportFormat,
                  corrections: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Full tensor name -> tensor for one block in one export layout. `state` is the block's
    float state dict (relative names); quantized linears replace their `.weight`. The
    fake_quant_lorc layout adds `corrections` (linear -> LoRC's B·A, fp32) to the dequantized
    weights before rounding them to the stored dtype."""
    out = {}
    for key, tensor in state.items():
        linear = key.removesuffix(".weight")
        q = linears.get(linear) if key.endswith(".weight") else None
        if q is None or fmt in FAKE_QUANT_LAYOUTS:
            value = q.dequantized(dtypes[key]) if q is not None else tensor.to("cpu", dtypes[key])
            if q is not None and fmt is ExportFormat.FAKE_QUANT_LORC and corrections \
                    and linear in corrections:
                value = (q.dequantized(torch.float32) + corrections[linear].cpu()).to(dtypes[key])
            out[f"{path}.{key}"] = value
            continue
        if fmt is ExportFormat.COMPRESSED_TENSORS:
            packed = ct.compress_linear(q.codes, q.qparams, q.fmt, dtypes[key])
        else:
            packed = gptq.compress_linear(q.codes, q.qparams, q.fmt)
        out.update({f"{path}.{linear}.{suffix}": t for suffix, t in packed.items()})
    return out


def format_config(fmt: ExportFormat, formats: dict[str, AffineFormat | None]
                  ) -> dict[str, Any] | None:
    """The `quantization_config` for config.json in one layout (None for fake-quant)."""
    quantized = {name: f for name, f in formats.items() if f is not None}
    if fmt in FAKE_QUANT_LAYOUTS:
        return None
    if fmt is ExportFormat.GPTQ:
        (only,) = set(quantized.values())
        return gptq.quantization_config(only)
    ignore = sorted(name for name, f in formats.items() if f is None) + ["lm_head"]
    return ct.quantization_config(quantized, ignore)


def kernel_flags(formats: dict[str, AffineFormat | None]) -> list[dict[str, Any]]:
    """Formats written that current vLLM has no kernel for (reported, not refused)."""
    flags = []
    for fmt in sorted({f for f in formats.values() if f is not None},
                      key=lambda f: (f.bits, f.group_size or 0, f.symmetric)):
        if not ct.vllm_kernel(fmt):
            flags.append({"bits": fmt.bits, "group_size": fmt.group_size,
                          "symmetric": fmt.symmetric,
                          "note": "no vLLM wNa16 kernel (asymmetric needs 4 or 8 bits)"})
    return flags
