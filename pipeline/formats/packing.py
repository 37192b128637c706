"""Packing unsigned b-bit integers into int32 words, along one dimension of a 2-D tensor.

`pack_dense`: one little-endian bit stream, value i at bit i*b, so every 32 values fill exactly b
words and 3-, 5-, 6- and 7-bit values straddle word boundaries; n values take ceil(n*b/32)
words, the unused high bits of the last word are zero. Both GPTQ v1 (AutoGPTQ) and
compressed-tensors >= 0.18 (vLLM reads this) store this layout.

`unpack_per_word`: the layout compressed-tensors 0.17 and older wrote, 32 // b values per word,
value j of a word at bit j*b, ceil(n / (32 // b)) words. It differs from the dense one only for
3, 5, 6 and 7 bits; relayquant only reads it (checkpoints written before the dense layout).
"""
from __future__ import annotations

import torch

# Values per slice of the unpacked dimension: packing works on int64 copies, so a 28672 x 8192
# linear (Llama-70B's down_proj) done whole would hold several GB of temporaries; in slices they
# stay near 64 MB per copy whatever the tensor, with the same words (slices are independent).
_SLICE_VALUES = 1 << 23


def _slices(m: int, n: int) -> range:
    """Starts of the column slices of an [n, m] tensor (the packed dimension first)."""
    return range(0, m, max(1, _SLICE_VALUES // max(n, 1)))


def _unsigned_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2^32) as int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_dense(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned `bits`-bit values [n, m] (dim 0) or [m, n] (dim 1) -> int32 words, the packed
    dimension shrunk to ceil(n * bits / 32)."""
    if values.numel():
        low, high = torch.aminmax(values)
        if int(low) < 0 or int(high) >= 2**bits:
            raise ValueError(f"pack_dense: values must lie in [0, {2**bits - 1}] for {bits} "
                             "bits")
    if 32 % bits == 0 and dim == 1:
        return _pack_rows_whole_words(values, bits)
    v = values if dim == 0 else values.t()
    n, m = v.shape
    out = torch.empty(dense_words(n, bits), m, dtype=torch.int32)
    step = max(1, _SLICE_VALUES // max(n, 1))
    for j in _slices(m, n):
        out[:, j:j + step] = _pack_columns(v[:, j:j + step].to(torch.int64), bits)
    return (out if dim == 0 else out.t()).contiguous()


def _pack_columns(v: torch.Tensor, bits: int) -> torch.Tensor:
    n, m = v.shape
    if n % 32:
        v = torch.nn.functional.pad(v, (0, 0, 0, -n % 32))
    v = v.reshape(-1, 32, m)
    words = torch.zeros(v.shape[0], bits, m, dtype=torch.int64)
    for i in range(32):
        word, shift = divmod(i * bits, 32)
        words[:, word] |= (v[:, i] << shift) & 0xFFFFFFFF
        if shift + bits > 32:
            words[:, word + 1] |= v[:, i] >> (32 - shift)
    return _unsigned_int32(words.reshape(-1, m)[: dense_words(n, bits)])


def _pack_rows_whole_words(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The dense layout along each row when values never straddle words (2, 4, 8 bits): word w
    of a row holds values k*w .. k*w + k - 1 (k = 32 // bits), value j of them at bit j*bits.
    Rows are contiguous here, so this avoids the transposed copies of the general path."""
    m, n = values.shape
    k = 32 // bits
    out = torch.empty(m, dense_words(n, bits), dtype=torch.int32)
    step = max(1, _SLICE_VALUES // max(n, 1))
    for r in range(0, m, step):
        v = values[r:r + step].to(torch.int64)
        if n % k:
            v = torch.nn.functional.pad(v, (0, -n % k))
        v = v.reshape(v.shape[0], -1, k)
        words = v[..., 0].clone()
        for j in range(1, k):
            words |= v[..., j] << (j * bits)
        out[r:r + step] = _unsigned_int32(words)
    return out


def _unpack_rows_whole_words(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    m = packed.shape[0]
    k = 32 // bits
    shifts = torch.arange(k, dtype=torch.int64) * bits
    out = torch.empty(m, n, dtype=torch.int32)
    step = max(1, _SLICE_VALUES // max(n, 1))
    for r in range(0, m, step):
        w = packed[r:r + step].to(torch.int64) & 0xFFFFFFFF
        values = (w.unsqueeze(-1) >> shifts) & (2**bits - 1)
        out[r:r + step] = values.reshape(w.shape[0], -1)[:, :n]
    return out


def unpack_dense(packed: torch.Tensor, bits: int, n: int, dim: int) -> torch.Tensor:
    """Inverse of `pack_dense`: int32 values, `n` of them along `dim`."""
    if 32 % bits == 0 and dim == 1:
        return _unpack_rows_whole_words(packed, bits, n)
    w = packed if dim == 0 else packed.t()
    m = w.shape[1]
    out = torch.empty(n, m, dtype=torch.int32)
    step = max(1, _SLICE_VALUES // max(n, 1))
    for j in _slices(m, n):
        out[:, j:j + step] = _unpack_columns(w[:, j:j + step].to(torch.int64) & 0xFFFFFFFF,
                                             bits, n)
    return out if dim == 0 else out.t().contiguous()


def _unpack_columns(w: torch.Tensor, bits: int, n: int) -> torch.Tensor:
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
    return values.reshape(-1, m)[:n].to(torch.int32)


def unpack_per_word(packed: torch.Tensor, bits: int, n: int, dim: int) -> torch.Tensor:
    """Values from the pre-0.18 compressed-tensors layout (32 // bits per word)."""
    w = (packed if dim == 0 else packed.t()).to(torch.int64) & 0xFFFFFFFF
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    values = (w.unsqueeze(1) >> shifts.view(1, -1, 1)) & (2**bits - 1)
    out = values.reshape(-1, w.shape[1])[:n].to(torch.int32)
    return out if dim == 0 else out.t().contiguous()


def dense_words(n: int, bits: int) -> int:
    return -(-n * bits // 32)


def per_word_words(n: int, bits: int) -> int:
    return -(-n // (32 // bits))
