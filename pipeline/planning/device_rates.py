"""This machine's rates for the cost model (`pipeline.planning.cost_model.Device`), measured now by
micro-benchmarks: a stand-in of the block's forward and forward + backward, float64 matmul,
elementwise throughput, GPTQ's per-column cost and factorizations, the data-free path on one
linear, the mse observer's search, a block's write, and reads of the model's shards past (or, for a small checkpoint,
through) the page cache.
"""
from __future__ import annotations

import time
from typing import Any

import psutil
import torch

from pipeline.planning.cost_model import BlockShape, Device, forward_flops


def measure_device(shape: BlockShape, seq_len: int, threads: int, memory_bytes: int,
                   seconds: float = 1.0, disk_files: list[str] | None = None) -> Device:
    """This machine's rates for one worker of `threads` threads, measured now on a stand-in of
    the block (its linears' shapes, causal attention, norms; random weights, one window of
    `seq_len` tokens, forward and forward + backward)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        weights = [torch.randn(o, i) * i ** -0.5 for _, o, i in shape.linears]
        for w in weights:
            w.requires_grad_(True)
        inputs = {i: torch.randn(1, seq_len, i, requires_grad=True)
                  for i in {i for _, _, i in shape.linears}}
        flops = forward_flops(shape, seq_len, seq_len)

        def forward() -> torch.Tensor:
            return _stand_in_block(shape, weights, inputs)

        with torch.no_grad():
            fwd = _rate(forward, flops, seconds)
        train = _rate(lambda: forward().sum().backward(), 3 * flops, seconds)
        a64, b64 = torch.randn(576, 576, dtype=torch.float64), torch.randn(
            576, 1536, dtype=torch.float64)
        fp64 = _rate(lambda: a64 @ b64, 2.0 * 576 * 576 * 1536, seconds / 2)
        v = torch.randn(4 * 2**20)
        elementwise = _rate(lambda: torch.mul(v, 1.0001), 8.0 * v.numel(), seconds / 2)
        column = _gptq_column_seconds()
        rtn = _rtn_params_per_second(seconds)
        search = _search_params_per_second(seconds)
        chol64_n = 1024
        chol64 = _cholesky_flops(torch.float64, chol64_n, seconds / 2)
        # float32 solves are of wide inputs (a 70B model's 8192 and 28672 columns): measured
        # at the widest input up to 4096 (0.9 s a factorization on 2 cores of this machine);
        # the cost model extends it to larger sizes (`cost_model.factor_seconds`)
        chol32_n = min(max(max(i for _, _, i in shape.linears), 2048), 4096)
        chol32 = _cholesky_flops(torch.float32, chol32_n, seconds / 2)
        write_rate, write_fixed = _write_rates()
        stage_start = _stage_start_seconds()
    finally:
        torch.set_num_threads(previous)
    return Device(f"this machine ({threads} thread{'s' if threads > 1 else ''})", fwd, train,
                  fp64, elementwise, disk_bytes=disk_read_bytes_per_second(disk_files),
                  network_bytes=2e9,
                  memory_bytes=memory_bytes, column_seconds=column, rtn_params=rtn,
                  search_params=search,
                  cholesky64_flops=chol64, cholesky32_flops=chol32, cholesky64_n=chol64_n,
                  cholesky32_n=chol32_n, write_bytes=write_rate,
                  stage_start_seconds=stage_start,
                  block_write_seconds=write_fixed)


def _stage_start_seconds() -> float:
    """A stage's start: a new process importing what a stage actor imports (torch,
    transformers, relayquant's block pass)."""
    import subprocess
    import sys

    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import pipeline.block_pass, transformers"],
                   check=True, capture_output=True)
    return time.perf_counter() - start


def _cholesky_flops(dtype: torch.dtype, n: int, seconds: float) -> float:
    """GPTQ's factorization (`pipeline.methods.gptq.inverse_factor`) on an n x n Hessian."""
    from pipeline.methods.gptq import factor_flops, inverse_factor

    x = torch.randn(4 * n, n, dtype=dtype)
    h = x.T @ x / (4 * n)
    return _rate(lambda: inverse_factor(h, 0.01, dtype=dtype), factor_flops(n), seconds)


def _write_rates() -> tuple[float, float]:
    """(bytes/s, fixed seconds per block) of `checkpoint.write_block`: a tiny block and a 64 MB
    one written to a temporary output."""
    import tempfile

    from pipeline import checkpoint

    with tempfile.TemporaryDirectory(prefix="relayquant-write-") as out:
        def timed(index: int, numel: int) -> float:
            tensors = {"w": torch.zeros(numel, dtype=torch.int32)}
            start = time.perf_counter()
            checkpoint.write_block(out, index, {"": tensors}, {}, {})
            return time.perf_counter() - start

        timed(0, 1)
        small = min(timed(1, 1), timed(2, 1))
        large = timed(3, 16 * 2**20)
    return 64 * 2**20 / max(large - small, 1e-6), small


def disk_read_bytes_per_second(files: list[str] | None = None, folder: str | None = None,
                               size: int = 256 * 2**20) -> float:
    """Read throughput of a model's shards. A checkpoint under half the available memory is
    read from the page cache (measured warm). Otherwise past the cache: with `files`, 32 MB from
    the middle of up to 8 of them, spread over the list, read with O_DIRECT, which is what
    the run will see (a virtual disk may serve recently written files from the host's cache
    and older ones at its own speed, so the sample spans the model). Without: a temporary
    file under `folder`, flushed and dropped from the cache, read back."""
    import mmap
    import os
    import tempfile

    size_of = sum(os.path.getsize(f) for f in files or [])
    if files and size_of < psutil.virtual_memory().available // 2:
        # a checkpoint this small stays in the page cache after its first read: that is what
        # every block read of the run sees (the first read, once, is not counted)
        for _ in range(2):
            start = time.perf_counter()
            for path in files:
                with open(path, "rb", buffering=0) as shard:
                    while shard.read(64 * 2**20):
                        pass
            cached = size_of / max(time.perf_counter() - start, 1e-9)
        return cached
    if files and hasattr(os, "O_DIRECT"):
        chosen = [files[round(i * (len(files) - 1) / 7)] for i in range(min(8, len(files)))]
        buffer = mmap.mmap(-1, 32 * 2**20)
        total, seconds = 0, 0.0
        for path in dict.fromkeys(chosen):
            length = os.path.getsize(path)
            if length < 2 * len(buffer):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            try:
                start = time.perf_counter()
                total += os.preadv(fd, [buffer], (length // 2) // 4096 * 4096)
                seconds += time.perf_counter() - start
            finally:
                os.close(fd)
        if total:
            return total / max(seconds, 1e-9)
    fd, path = tempfile.mkstemp(prefix="relayquant-disk-", dir=folder)
    try:
        piece = os.urandom(1 << 20) * 64
        with os.fdopen(fd, "wb") as out:
            for _ in range(max(1, size // len(piece))):
                out.write(piece)
            out.flush()
            os.fsync(out.fileno())
        written = os.path.getsize(path)
        with open(path, "rb", buffering=0) as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            into = bytearray(len(piece))
            start = time.perf_counter()
            while f.readinto(into):
                pass
            return written / max(time.perf_counter() - start, 1e-9)
    finally:
        os.remove(path)


def _rtn_params_per_second(seconds: float) -> float:
    """The data-free path on one bf16 linear (4-bit, groups of 128, compressed-tensors)."""
    from pipeline.config import ExportFormat
    from pipeline.data_free import quantize_linear
    from pipeline.formats import AffineFormat

    w = torch.randn(2048, 4096).to(torch.bfloat16)
    fmt = AffineFormat(4, 128, False)
    return _rate(lambda: quantize_linear("m", "w.weight", w, fmt, torch.float32, torch.bfloat16,
                                         [ExportFormat.COMPRESSED_TENSORS]),
                 float(w.numel()), seconds / 2)


def _search_params_per_second(seconds: float) -> float:
    """The mse observer's search (`quantization.observer: mse`) on a 3-bit, group-64 linear."""
    from pipeline.formats import AffineFormat, choose_qparams

    w = torch.randn(256, 2048)
    fmt = AffineFormat(3, 64, observer="mse")
    return _rate(lambda: choose_qparams(w, fmt), float(w.numel()), seconds / 2)


def _gptq_column_seconds() -> float:
    """GPTQ on a small, wide matrix, where the per-column work is negligible: its time per
    column is the loop's fixed cost."""
    from pipeline.formats import AffineFormat
    from pipeline.methods.gptq import gptq_quantize

    w = torch.randn(8, 512)
    x = torch.randn(1024, 512, dtype=torch.float64)
    h = x.T @ x
    gptq_quantize(w, h, AffineFormat(4, 64))
    start = time.perf_counter()
    gptq_quantize(w, h, AffineFormat(4, 64))
    return (time.perf_counter() - start) / 512


def _stand_in_block(shape: BlockShape, weights: list[torch.Tensor],
                    inputs: dict[int, torch.Tensor]) -> torch.Tensor:
    """Every linear on an input of its width, and causal attention over the first one's
    output (q_proj: heads x head_dim)."""
    fn = torch.nn.functional
    outs = [fn.linear(inputs[i], w) for (_, _, i), w in zip(shape.linears, weights, strict=True)]
    q = outs[0].reshape(1, -1, shape.heads, shape.head_dim).transpose(1, 2)
    att = fn.scaled_dot_product_attention(q, q, q, is_causal=True)
    return att.float().pow(2).mean() + sum(fn.silu(o).pow(2).mean() for o in outs)


def _rate(fn: Any, work: float, seconds: float) -> float:
    fn()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        count += 1
    return work * count / (time.perf_counter() - start)
