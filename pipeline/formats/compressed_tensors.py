"""compressed-tensors `pack-quantized`: the layout vLLM and transformers load natively.

Per quantized linear P: `P.weight_packed` (int32 [out, ceil(in*b/32)], the signed codes + 2^(b-1)
densely packed along the input), `P.weight_scale` ([out, groups], model dtype), `P.weight_shape`
(int64 [out, in]) and, when asymmetric, `P.weight_zero_point` (int32
[ceil(out*b/32), groups], signed + 2^(b-1), densely packed along the output). This is what
compressed-tensors `LAYOUT_VERSION` writes for the same codes and parameters, byte for byte
(tests/fixtures/ct_golden.json holds its bytes); the code here is relayquant's own, so writing
needs no compressed-tensors at all.

Releases before 0.18 packed 3-, 5-, 6- and 7-bit values 32 // b per word instead (2, 4 and 8 bits
are identical in both); checkpoints in that layout are still read, told apart by the packed
width (see `_unpack`).

Our asymmetric codes live on [0, 2^b - 1] with zero points on the same grid; compressed-tensors
uses the signed grid, so both are shifted by 2^(b-1): (q - z) and hence the weight is unchanged.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from pipeline.formats.affine import AffineFormat, QuantParams
from pipeline.formats.packing import (
    dense_words,
    pack_dense,
    per_word_words,
    unpack_dense,
    unpack_per_word,
)

FORMAT = "pack-quantized"
LAYOUT_VERSION = "0.20.1"  # the compressed-tensors release whose bytes and config we write
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


def _offset(fmt: AffineFormat) -> int:
    return 0 if fmt.symmetric else 2 ** (fmt.bits - 1)


_ROWS_VALUES = 1 << 24  # weights dequantized per slice of rows


def compress_linear(codes: torch.Tensor, qparams: QuantParams, fmt: AffineFormat,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors (relative names) for one linear from its integer codes and parameters."""
    half = 2 ** (fmt.bits - 1)
    stored = codes - _offset(fmt) + half  # the signed code, shifted onto [0, 2^b - 1]
    out = {
        "weight_packed": pack_dense(stored, fmt.bits, dim=1),
        "weight_scale": qparams.scale.to(dtype),
        "weight_shape": torch.tensor(list(codes.shape), dtype=torch.int64),
    }
    if not fmt.symmetric:
        zero = qparams.zero_point.round().to(torch.int64) - _offset(fmt) + half
        out["weight_zero_point"] = pack_dense(zero, fmt.bits, dim=0)
    return out


def join_row_slices(slices: list[dict[str, torch.Tensor]], shape: tuple[int, int]
                    ) -> dict[str, torch.Tensor]:
    """One linear's tensors from `compress_linear` run on slices of its output rows (each a
    multiple of 32 rows but the last): what it writes for the whole weight."""
    out = {name: torch.cat([s[name] for s in slices]) for name in slices[0]
           if name != "weight_shape"}
    out["weight_shape"] = torch.tensor(list(shape), dtype=torch.int64)
    return out


def _unpack(packed: torch.Tensor, bits: int, n: int, dim: int, name: str) -> torch.Tensor:
    """Unsigned values from either layout. Dense and per-word widths differ for 3/5/6/7 bits
    whenever n >= 32, so the width says which one wrote them (equal widths: dense)."""
    width = packed.shape[dim]
    if width == dense_words(n, bits):
        return unpack_dense(packed, bits, n, dim)
    if width == per_word_words(n, bits):
        return unpack_per_word(packed, bits, n, dim)
    raise ValueError(f"{name}: {width} int32 words along dim {dim} fit neither the dense "
                     f"({dense_words(n, bits)}) nor the pre-0.18 ({per_word_words(n, bits)}) "
                     f"compressed-tensors layout of {n} {bits}-bit values")


def decompress_linear(tensors: dict[str, torch.Tensor], fmt: AffineFormat,
                      dtype: torch.dtype) -> torch.Tensor:
    """The dequantized [out, in] weight from `compress_linear`'s tensors, a slice of rows at a
    time (the float temporaries of a 70B-width linear stay small; the result is the same)."""
    out_features, in_features = tensors["weight_shape"].tolist()
    scale = tensors["weight_scale"].float()
    half = 2 ** (fmt.bits - 1)
    zero = torch.zeros_like(scale)
    if not fmt.symmetric:
        zero = (_unpack(tensors["weight_zero_point"], fmt.bits, out_features, 0,
                        "weight_zero_point") - half).float()
    groups = scale.shape[1]
    out = torch.empty(out_features, in_features, dtype=dtype)
    step = max(1, _ROWS_VALUES // max(in_features, 1))
    for r in range(0, out_features, step):
        rows = slice(r, r + step)
        codes = _unpack(tensors["weight_packed"][rows], fmt.bits, in_features, 1,
                        "weight_packed") - half
        x = codes.float().reshape(-1, groups, in_features // groups)
        w = (x - zero[rows].unsqueeze(-1)) * scale[rows].unsqueeze(-1)
        out[rows] = w.reshape(-1, in_features).to(dtype)
    return out


def _weights_args(fmt: AffineFormat) -> dict[str, Any]:
    """One config group's `weights`, the fields compressed-tensors LAYOUT_VERSION dumps."""
    return {"dynamic": False, "group_size": fmt.group_size, "num_bits": fmt.bits,
            "observer": "minmax", "strategy": "channel" if fmt.group_size is None else "group",
            "symmetric": fmt.symmetric, "type": "int"}


def quantization_config(formats: dict[str, AffineFormat], ignore: list[str]) -> dict[str, Any]:
    """config.json `quantization_config`: one group per distinct format, targets naming
    exactly its modules, `ignore` for the linears kept in full precision. The keys are those
    compressed-tensors LAYOUT_VERSION writes (`ModelCompressor.update_config`)."""
    by_format: dict[AffineFormat, list[str]] = {}
    for name, fmt in sorted(formats.items()):
        by_format.setdefault(fmt, []).append(name)
    ordered = sorted(by_format.items(), key=lambda kv: (kv[0].bits, kv[0].group_size or 0,
                                                        kv[0].symmetric))
    groups = {f"group_{i}": {"format": FORMAT, "input_activations": None,
                             "output_activations": None, "targets": names,
                             "weights": _weights_args(fmt)}
              for i, (fmt, names) in enumerate(ordered)}
    return {"config_groups": groups, "format": FORMAT, "global_compression_ratio": None,
            "ignore": sorted(ignore), "kv_cache_scheme": None, "moe_sparsity_config": None,
            "quant_method": "compressed-tensors", "quantization_status": "compressed",
            "sparsity_config": {}, "transform_config": {}, "version": LAYOUT_VERSION}


def module_formats(qconfig: dict[str, Any], modules: list[str]) -> dict[str, AffineFormat]:
    """Which of `modules` a compressed-tensors config quantizes, and with which format.
    Targets may be exact names, `re:` regexes or the class name `Linear`."""
    ignore = qconfig.get("ignore") or []
    out = {}
    for name in modules:
        if any(_matches(pattern, name) for pattern in ignore):
            continue
        for group in qconfig["config_groups"].values():
            if any(_matches(t, name) or t == "Linear" for t in group["targets"]):
                w = group["weights"]
                out[name] = AffineFormat(w["num_bits"], w.get("group_size") if
                                         w.get("strategy") == "group" else None,
                                         bool(w.get("symmetric", True)))
                break
    return out


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name


def vllm_kernel(fmt: AffineFormat) -> bool:
    """Whether current vLLM has a wNa16 kernel for this format (systems.md §4.1)."""
    if fmt.symmetric:
        return 2 <= fmt.bits <= 8
    return fmt.bits in (4, 8)
