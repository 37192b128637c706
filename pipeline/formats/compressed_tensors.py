"""compressed-tensors `pack-quantized`: the layout vLLM and transformers load natively.

Per quantized linear P: `P.weight_packed` (int32, signed codes + 2^(b-1) densely packed along
the input), `P.weight_scale` ([out, groups], model dtype), `P.weight_shape` ([out, in]) and,
when asymmetric, `P.weight_zero_point` (signed, packed along the output). The packing and the
config data model come from the `compressed-tensors` package.

Our asymmetric codes live on [0, 2^b - 1] with zero points on the same grid; compressed-tensors
uses the signed grid, so both are shifted by 2^(b-1): (q - z) and hence the weight is unchanged.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from pipeline.formats.affine import AffineFormat, QuantParams

FORMAT = "pack-quantized"
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


def _offset(fmt: AffineFormat) -> int:
    return 0 if fmt.symmetric else 2 ** (fmt.bits - 1)


def compress_linear(codes: torch.Tensor, qparams: QuantParams, fmt: AffineFormat,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors (relative names) for one linear from its integer codes and parameters."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    signed = (codes - _offset(fmt)).to(torch.int8)
    out = {
        "weight_packed": pack_to_int32(signed, fmt.bits),
        "weight_scale": qparams.scale.to(dtype),
        "weight_shape": torch.tensor(list(codes.shape), dtype=torch.int64),
    }
    if not fmt.symmetric:
        zero = (qparams.zero_point - _offset(fmt)).to(torch.int8)
        out["weight_zero_point"] = pack_to_int32(zero, fmt.bits, packed_dim=0).contiguous()
    return out


def decompress_linear(tensors: dict[str, torch.Tensor], fmt: AffineFormat,
                      dtype: torch.dtype) -> torch.Tensor:
    """The dequantized [out, in] weight from `compress_linear`'s tensors."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    shape = torch.Size(tensors["weight_shape"].tolist())
    scale = tensors["weight_scale"].float()
    codes = unpack_from_int32(tensors["weight_packed"], fmt.bits, shape).to(torch.int32)
    zero = torch.zeros_like(scale)
    if not fmt.symmetric:
        zshape = torch.Size([shape[0], scale.shape[1]])
        zero = unpack_from_int32(tensors["weight_zero_point"], fmt.bits, zshape,
                                 packed_dim=0).float()
    groups = scale.shape[1]
    x = codes.float().reshape(shape[0], groups, shape[1] // groups)
    return ((x - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(shape).to(dtype)


def _weights_args(fmt: AffineFormat) -> dict[str, Any]:
    return {"num_bits": fmt.bits, "type": "int", "symmetric": fmt.symmetric,
            "strategy": "channel" if fmt.group_size is None else "group",
            "group_size": fmt.group_size, "dynamic": False, "observer": "minmax"}


def quantization_config(formats: dict[str, AffineFormat], ignore: list[str]) -> dict[str, Any]:
    """config.json `quantization_config`: one group per distinct format, targets naming
    exactly its modules, `ignore` for the linears kept in full precision."""
    import compressed_tensors
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )

    by_format: dict[AffineFormat, list[str]] = {}
    for name, fmt in sorted(formats.items()):
        by_format.setdefault(fmt, []).append(name)
    ordered = sorted(by_format.items(), key=lambda kv: (kv[0].bits, kv[0].group_size or 0,
                                                        kv[0].symmetric))
    groups = {f"group_{i}": QuantizationScheme(targets=names, format=FORMAT,
                                               weights=QuantizationArgs(**_weights_args(fmt)))
              for i, (fmt, names) in enumerate(ordered)}
    config = QuantizationConfig(config_groups=groups, format=FORMAT, ignore=sorted(ignore),
                                quantization_status=QuantizationStatus.COMPRESSED)
    data = config.model_dump(mode="json")
    return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
            "sparsity_config": {}, "transform_config": {}, **data}


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
