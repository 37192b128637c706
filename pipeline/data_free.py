"""The data-free path at any width: RTN straight from storage, one linear and one slice of its
rows at a time.

Loading a whole block at the compute dtype and quantizing it at once holds the block twice in
float32 plus its int32 codes: about 7 GB for one Llama-70B block, on every worker. Round to
nearest treats every output row on its own (min-max per row or per group of a row), so a slice
of rows gives exactly the codes and scales of the whole weight: here a worker holds one stored
weight, one slice's float copies, and the block's packed output. Checkpoints whose linears are
already packed take the whole-block path (`block_pass.quantize_block_weights`).
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch

from pipeline.block_pass import BlockResult
from pipeline.block_pass import (
    quantize_block_weights as quantize_whole_block,
)
from pipeline.config import ExportFormat, QuantizationConfig
from pipeline.export import QuantizedLinear, block_tensors
from pipeline.formats import (
    AffineFormat,
    QuantParams,
    choose_qparams,
    gptq,
    quantize,
)
from pipeline.formats import (
    compressed_tensors as ct,
)
from pipeline.formats.gptq import zero_overflow as gptq_zero_overflow
from pipeline.model_parts import ModelParts
from pipeline.reporting.process_memory import peak_rss_bytes, private_bytes
from pipeline.schemes import block_formats

# weights per slice of rows (64 MB in float32); a multiple of 32 rows, so the zero points that
# compressed-tensors and GPTQ pack along the output dimension split on word boundaries
SLICE_VALUES = 1 << 24

Join = Callable[[list[dict[str, torch.Tensor]], tuple[int, int]], dict[str, torch.Tensor]]


def _join_fake_quant(slices: list[dict[str, torch.Tensor]], shape: tuple[int, int]
                     ) -> dict[str, torch.Tensor]:
    return {"weight": torch.cat([s["weight"] for s in slices])}


JOIN: dict[ExportFormat, Join] = {
    ExportFormat.COMPRESSED_TENSORS: ct.join_row_slices,
    ExportFormat.GPTQ: gptq.join_row_slices,
    ExportFormat.FAKE_QUANT: _join_fake_quant,
}


def slice_rows(out_features: int, in_features: int) -> int:
    return max(32, SLICE_VALUES // max(in_features, 1) // 32 * 32)


@torch.no_grad()
def quantize_block_weights(parts: ModelParts, index: int, quantization: QuantizationConfig,
                           layouts: list[ExportFormat]) -> BlockResult:
    """The block's linears rounded to nearest, in every export layout, with the codes and bytes
    of `block_pass.quantize_block` with RTN (no stream read or written)."""
    path = parts.block_path(index)
    if parts.packed_tensor_names(path) or quantization.lorc is not None:
        # LoRC's SVD needs each whole error matrix (and the block to install B·A in)
        return quantize_whole_block(parts, index, quantization, layouts)
    start = time.perf_counter()
    dtypes = parts.stored_dtypes(path)
    formats = block_formats(parts, index, quantization)
    exports: dict[ExportFormat, dict[str, torch.Tensor]] = {f: {} for f in layouts}
    wraps, read_seconds = 0, 0.0
    for key, name in parts.tensor_names(path).items():
        began = time.perf_counter()
        stored = parts.reader.read([name])[name]
        read_seconds += time.perf_counter() - began
        linear = key.removesuffix(".weight")
        fmt = formats.get(linear) if key.endswith(".weight") else None
        if fmt is None:
            # the value the whole-block path writes: stored -> compute dtype -> stored
            value = stored.to(parts.compute_dtype).to(dtypes[key])
            for layout in layouts:
                exports[layout][f"{path}.{key}"] = value
            continue
        tensors, wrapped = quantize_linear(path, key, stored, fmt, parts.compute_dtype,
                                            dtypes[key], layouts)
        wraps += wrapped
        for layout in layouts:
            exports[layout].update(tensors[layout])
        del stored
    schemes = {f"{path}.{n}": None if f is None else [f.bits, f.group_size, f.symmetric]
               for n, f in formats.items()}
    metrics = {"index": index, "data_free": True, "seconds": time.perf_counter() - start,
               "load_seconds": read_seconds, "peak_rss_bytes": peak_rss_bytes(),
               "peak_private_bytes": private_bytes()}
    if ExportFormat.GPTQ in layouts:
        metrics["gptq_zero_wraps"] = wraps
    return BlockResult([], [], exports, schemes, metrics)


def quantize_linear(path: str, key: str, stored: torch.Tensor, fmt: AffineFormat,
                     compute_dtype: torch.dtype, dtype: torch.dtype, layouts: list[ExportFormat]
                     ) -> tuple[dict[ExportFormat, dict[str, torch.Tensor]], int]:
    """One linear's tensors in every layout (full names), quantized a slice of rows at a time,
    and how many GPTQ zero points wrap."""
    out_features, in_features = stored.shape
    step = slice_rows(out_features, in_features)
    linear = key.removesuffix(".weight")
    slices: dict[ExportFormat, list[dict[str, torch.Tensor]]] = {f: [] for f in layouts}
    wraps = 0
    for r in range(0, out_features, step):
        weight = stored[r:r + step].to(compute_dtype)
        # rtn_quantize's parameters and codes, without its dequantized copy (unused here)
        found = choose_qparams(weight, fmt)
        qparams = QuantParams(found.scale.to(dtype).float(), found.zero_point)
        codes = quantize(weight, qparams, fmt)
        q = QuantizedLinear(codes, qparams, fmt)
        if ExportFormat.GPTQ in layouts:
            wraps += gptq_zero_overflow(qparams, fmt)
        for layout in layouts:
            named = block_tensors(path, {key: weight}, {linear: q}, {key: dtype}, layout)
            slices[layout].append({n.removeprefix(f"{path}.{linear}."): t
                                   for n, t in named.items()})
        del weight, codes
    return {layout: {f"{path}.{linear}.{s}": t
                     for s, t in JOIN[layout](slices[layout], (out_features, in_features)).items()}
            for layout in layouts}, wraps
