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
from pipeline.formats.packing import pack_dense, unpack_dense

SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


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
        "qweight": pack_dense(q.t(), fmt.bits, dim=0),
        "qzeros": pack_dense(((zero - 1) & mask).t(), fmt.bits, dim=1),
        "scales": qparams.scale.t().contiguous().to(torch.float16),
        "g_idx": (torch.arange(in_features, dtype=torch.int32) // group_size),
    }


def join_row_slices(slices: list[dict[str, torch.Tensor]], shape: tuple[int, int]
                    ) -> dict[str, torch.Tensor]:
    """One linear's tensors from `compress_linear` run on slices of its output rows (each a
    multiple of 32 rows but the last): the output dimension is the tensors' last."""
    out = {name: torch.cat([s[name] for s in slices], dim=1) for name in ("qweight", "qzeros",
                                                                        "scales")}
    out["g_idx"] = slices[0]["g_idx"]
    return out


def decompress_linear(tensors: dict[str, torch.Tensor], bits: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """w[o, i] = scales[g_idx[i], o] * (q[i, o] - (qzeros[g_idx[i], o] + 1)), as the v1
    kernels compute it (no wrap-around of the +1)."""
    scales = tensors["scales"].float()
    out_features = scales.shape[1]
    g_idx = tensors["g_idx"].long()
    in_features = g_idx.numel()
    q = unpack_dense(tensors["qweight"], bits, in_features, dim=0)
    zeros = unpack_dense(tensors["qzeros"], bits, out_features, dim=1) + 1
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
