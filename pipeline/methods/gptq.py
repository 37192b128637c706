"""GPTQ (Frantar et al. 2022): quantize a linear's columns one at a time, each time spreading the
rounding error over the columns not yet quantized through the inverse Hessian of the layer's
reconstruction loss, H = 2 X^T X / n over the calibration inputs X. Lazy batch updates over
`block_size` columns; damping grows x10 whenever the Cholesky factorization fails; optional
act-order (columns by decreasing H diagonal) with static group parameters, so groups stay
contiguous and the export needs no g_idx.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from concurrent.futures import ThreadPoolExecutor

import torch

from pipeline.formats import AffineFormat, QuantParams, choose_qparams, dequantize

log = logging.getLogger(__name__)


class HessianError(RuntimeError):
    pass


# float64 Hessians on CPU up to this many bytes each (n = 11585 columns); a Llama-70B down_proj's
# (28672^2) would take 6.6 GB per copy in float64 and the solve holds three copies at once
FLOAT64_HESSIAN_BYTES = 2**30


def sweep_dtype(device: torch.device | str, columns: int = 0) -> torch.dtype:
    """float64 on CPU (cheap there, and the sums do not depend on chunking or on how the
    windows were shared among workers) unless the matrix would exceed FLOAT64_HESSIAN_BYTES;
    float32 on GPUs and for such wide inputs."""
    wide = columns * columns * 8 > FLOAT64_HESSIAN_BYTES
    return torch.float64 if torch.device(device).type == "cpu" and not wide else torch.float32


# the column blocks of `gram`: products of blocks on or above the diagonal only
GRAM_BLOCK = 512


def gram(x: torch.Tensor, block: int = GRAM_BLOCK, pool: ThreadPoolExecutor | None = None
         ) -> torch.Tensor:
    """x^T x from the products of column blocks on and above the diagonal, the blocks below
    mirrored: (k + 1) / 2k of the multiplications for k blocks (two thirds at 1536 columns).
    With `pool`, the blocks' products run on its threads (each writes its own part of the
    result, so the values are those of the sequential loop)."""
    n = x.shape[1]
    if n <= block:
        return x.T @ x
    out = torch.empty(n, n, dtype=x.dtype, device=x.device)

    def product(a: int) -> None:
        upper = x[:, a : a + block].T @ x[:, a:]
        out[a : a + block, a:] = upper
        out[a + block :, a : a + block] = upper[:, block:].T

    starts = range(0, n, block)
    if pool is None:
        for a in starts:
            product(a)
    else:
        list(pool.map(product, starts))
    return out


# products of this many windows' bytes at most in flight at once: narrower Hessians are
# summed a window per thread, wider ones (a 70B down_proj's 3.3 GB) a column block per thread
WINDOW_PRODUCTS_BYTES = 2**28


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    # each pool thread's own BLAS/OpenMP setting is one thread too
    return ThreadPoolExecutor(threads, thread_name_prefix="relayquant-gram",
                              initializer=torch.set_num_threads, initargs=(1,))


class Hessian:
    """Running H = 2/n sum x x^T over the rows of every input batch seen. A float64 matrix
    (CPU) sums float32 products, one per window (the batch's leading dimension): a window's
    product is the same whichever chunk or data-parallel worker holds it, and float32 halves
    the cost of the products, which dominate GPTQ on the CPU."""

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.dtype = sweep_dtype(device, columns)
        self.matrix = torch.zeros(columns, columns, dtype=self.dtype, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach()
        windows = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() >= 3 else x.unsqueeze(0)
        # on the CPU every product runs on one thread: float32 GEMMs round differently with
        # the thread count, and a worker of any thread count must produce the same Hessian.
        # A worker of T threads runs T such products at once on its own threads and adds the
        # windows in order: the same sums as one thread (1.2-1.6x faster at T = 2 on a 2-core
        # AVX2 host)
        threads = torch.get_num_threads()
        if x.device.type != "cpu" or threads == 1:
            self._sum(windows)
        else:
            torch.set_num_threads(1)
            try:
                self._sum(windows, threads)
            finally:
                torch.set_num_threads(threads)
        self.count += windows.shape[0] * windows.shape[1]

    def _sum(self, windows: torch.Tensor, threads: int = 1) -> None:
        """Each window's product added in window order; with several threads, a window per
        thread, or a column block per thread where T products would not fit
        WINDOW_PRODUCTS_BYTES."""
        pool = _pool(threads) if threads > 1 else None
        n = windows.shape[-1]
        if pool is None or n * n * 4 * threads > WINDOW_PRODUCTS_BYTES:
            for window in windows:
                self.matrix += gram(window.float(), pool=pool).to(self.dtype)
            return
        for i in range(0, windows.shape[0], threads):
            for product in list(pool.map(lambda w: gram(w.float()), windows[i:i + threads])):
                self.matrix += product.to(self.dtype)

    def value(self) -> torch.Tensor:
        return (2.0 / max(self.count, 1)) * self.matrix


@dataclasses.dataclass
class GPTQResult:
    weight: torch.Tensor  # dequantized, in the input weight's dtype
    codes: torch.Tensor  # int32 [out, in]
    qparams: QuantParams
    damp: float  # the damping that factorized


def _inverse_factor(h: torch.Tensor, damp: float, limit: float = 1.0
                    ) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising damp on failure.
    At most two n x n matrices besides `h` are alive at any moment (no identity matrix)."""
    mean_diag = h.diagonal().mean().item()
    while True:
        try:
            damped = h.clone()
            damped.diagonal().add_(damp * mean_diag)
            lower = torch.linalg.cholesky(damped)
            del damped
            inverse = torch.cholesky_inverse(lower)
            del lower
            return torch.linalg.cholesky(inverse, upper=True), damp
        except torch.linalg.LinAlgError:
            if damp * 10 > limit:
                raise HessianError(
                    f"the Hessian is not positive definite even with damping {damp:g}") from None
            log.info("GPTQ: Cholesky failed with damping %g; retrying with %g", damp, damp * 10)
            damp *= 10


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, fmt: AffineFormat,
                  damp: float = 0.01, block_size: int = 128, act_order: bool = False,
                  scale_dtype: torch.dtype = torch.float32,
                  qparams: QuantParams | None = None) -> GPTQResult:
    """GPTQ rounding of `weight`; with `qparams` given (e.g. learned clipping) the grid is
    fixed and only the rounding is chosen."""
    columns = weight.shape[1]
    dtype = sweep_dtype(weight.device, columns)
    w = weight.detach().to(dtype).clone()
    # may be the caller's (shared) Hessian itself: never written, copied only to change it
    h = hessian.detach().to(dtype)
    del hessian
    group = fmt.group_size
    dead = h.diagonal() == 0
    if bool(dead.any()):
        h = h.clone()
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
    # parameters: per channel (or static groups with act-order) from the whole weight up front;
    # otherwise each group's from the error-updated weight when its first column comes up
    lazy_groups = group is not None and not act_order and qparams is None
    static = choose_qparams(w.float(), fmt) if qparams is None else qparams
    scale = static.scale.to(scale_dtype).to(dtype)
    zero = static.zero_point.to(dtype)
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm.unsqueeze(1), perm]
    column_group = (torch.arange(columns, device=w.device) // group if group is not None
                    else torch.zeros(columns, dtype=torch.long, device=w.device))
    if perm is not None:
        column_group = column_group[perm]
    upper, used = _inverse_factor(h, damp)
    del h
    if group is not None:
        block_size = max(group, block_size // group * group)  # groups never straddle blocks
    codes = torch.zeros_like(w)
    one_group = dataclasses.replace(fmt, group_size=None)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(column_group[col])
            if lazy_groups and group is not None and col % group == 0:
                p = choose_qparams(w1[:, i:i + group].float(), one_group)
                scale[:, g] = p.scale[:, 0].to(scale_dtype).to(dtype)
                zero[:, g] = p.zero_point[:, 0].to(dtype)
            s, z = scale[:, g], zero[:, g]
            q = (torch.round(w1[:, i] / s) + z).clamp(fmt.qmin, fmt.qmax)
            codes[:, col] = q
            err = (w1[:, i] - (q - z) * s) / u1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ upper[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    codes = codes.to(torch.int32)
    qparams = QuantParams(scale.float(), zero.float())
    fake = dequantize(codes, qparams, fmt, dtype=weight.dtype)
    return GPTQResult(fake, codes, qparams, used)
