"""GPTQ v1 layout (AutoGPTQ / GPTQModel `checkpoint_format: gptq`), for engines and tools
that load only that.

Per linear P: `P.qweight` int32 [in*b/32, out] (unsigned codes packed along the input, dense
little-endian bit stream, so 3-bit values straddle words), `P.qzeros` int32
[groups, out*b/32] holding zero - 1 (the v1 convention), `P.scales` fp16 [groups, out],
`P.g_idx` int32 [in]. Symmetric formats use zero = 2^(b-1).
"""
from __future__ import annotations

from typing import Any

import torch

from pipeline.formats.affine import AffineFormat, QuantParams

SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def _pack_unsigned(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Dense little-endian packing of unsigned b-bit values along `dim` (0 or 1): every 32
    values become one 32*b-bit stream in b int32 words, value i at bit i*b (3-bit values
    straddle words, as AutoGPTQ packs them)."""
    v = values.to(torch.int64)
    v = v if dim == 0 else v.t()
    n, m = v.shape
    pad = -n % 32
    v = torch.nn.functional.pad(v, (0, 0, 0, pad)).reshape(-1, 32, m)
    words = torch.zeros(v.shape[0], bits, m, dtype=torch.int64)
    for i in range(32):
        word, shift = divmod(i * bits, 32)
        words[:, word] |= (v[:, i] << shift) & 0xFFFFFFFF
        if shift + bits > 32:
            words[:, word + 1] |= v[:, i] >> (32 - shift)
    out = words.reshape(-1, m)[: -(-n * bits // 32)]  # ceil(n*b/32) words, no padding words
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    return (out if dim == 0 else out.t()).contiguous()


def _unpack_unsigned(packed: torch.Tensor, bits: int, shape: list[int], dim: int) -> torch.Tensor:
    """Inverse of `_pack_unsigned`; `shape` is the unpacked shape."""
    w = packed.to(torch.int64) & 0xFFFFFFFF
    w = w if dim == 0 else w.t()
    m = w.shape[1]
    w = torch.nn.functional.pad(w, (0, 0, 0, -w.shape[0] % bits)).reshape(-1, bits, m)
    mask = 2**bits - 1
    values = torch.zeros(w.shape[0], 32, m, dtype=torch.int64)
    for i in range(32):
        word, shift = divmod(i * bits, 32)
        v = w[:, word] >> shift
        if shift + bits > 32:
            v = v | (w[:, word + 1] << (32 - shift))
        values[:, i] = v & mask
    n = shape[0] if dim == 0 else shape[1]
    out = values.reshape(-1, m)[:n].to(torch.int32)
    return out if dim == 0 else out.t().contiguous()


def unsigned_codes(codes: torch.Tensor, qparams: QuantParams, fmt: AffineFormat
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, zero points) on the unsigned grid [0, 2^b - 1]."""
    if fmt.symmetric:
        half = 2 ** (fmt.bits - 1)
        return codes + half, torch.full_like(qparams.scale, half).to(torch.int32)
    return codes, qparams.zero_point.to(torch.int32)


def compress_linear(codes: torch.Tensor, qparams: QuantParams, fmt: AffineFormat
                    ) -> dict[str, torch.Tensor]:
    in_features = codes.shape[1]
    if in_features % 32:
        raise ValueError(f"gptq export needs in_features divisible by 32, got {in_features}")
    q, zero = unsigned_codes(codes, qparams, fmt)
    groups = qparams.scale.shape[1]
    group_size = in_features // groups
    mask = 2**fmt.bits - 1
    return {
        "qweight": _pack_unsigned(q.t(), fmt.bits, dim=0),
        "qzeros": _pack_unsigned(((zero - 1) & mask).t(), fmt.bits, dim=1),
        "scales": qparams.scale.t().contiguous().to(torch.float16),
        "g_idx": (torch.arange(in_features, dtype=torch.int32) // group_size),
    }


def decompress_linear(tensors: dict[str, torch.Tensor], bits: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """w[o, i] = scales[g_idx[i], o] * (q[i, o] - (qzeros[g_idx[i], o] + 1)), as the v1
    kernels compute it (no wrap-around of the +1)."""
    scales = tensors["scales"].float()
    groups, out_features = scales.shape
    g_idx = tensors["g_idx"].long()
    in_features = g_idx.numel()
    q = _unpack_unsigned(tensors["qweight"], bits, [in_features, out_features], dim=0)
    zeros = _unpack_unsigned(tensors["qzeros"], bits, [groups, out_features], dim=1) + 1
    w = scales[g_idx] * (q.float() - zeros[g_idx].float())
    return w.t().contiguous().to(dtype)


def quantization_config(fmt: AffineFormat) -> dict[str, Any]:
    return {"quant_method": "gptq", "bits": fmt.bits,
            "group_size": -1 if fmt.group_size is None else fmt.group_size,
            "desc_act": False, "sym": fmt.symmetric, "lm_head": False,
            "checkpoint_format": "gptq", "pack_dtype": "int32", "true_sequential": True,
            "meta": {"quantizer": ["relayquant"]}}


def zero_overflow(qparams: QuantParams, fmt: AffineFormat) -> int:
    """Groups whose zero point is 0: v1 stores zero - 1, which wraps, so they load wrong."""
    return 0 if fmt.symmetric else int((qparams.zero_point == 0).sum())
