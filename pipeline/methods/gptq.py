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
from typing import Any

import torch

from pipeline.formats import AffineFormat, QuantParams, choose_qparams, dequantize

log = logging.getLogger(__name__)


class HessianError(RuntimeError):
    pass


# float64 Hessian sums on CPU up to this many bytes each (n = 11585 columns); a Llama-70B
# down_proj's (28672^2) would take 6.6 GB in float64
FLOAT64_HESSIAN_BYTES = 2**30
# the solve (factorization and sweep) in float64 on CPU up to this many bytes (n = 5792):
# every input of a 7B model's attention and of P1; wider ones (a 70B model's 8192) are solved
# in float32 as GPUs do, 1.7-2x faster on the CPU
FLOAT64_SOLVE_BYTES = 2**28


def _float64(device: torch.device | str, columns: int, limit: int) -> bool:
    return torch.device(device).type == "cpu" and columns * columns * 8 <= limit


def hessian_dtype(device: torch.device | str, columns: int = 0) -> torch.dtype:
    """The Hessian's sums: float64 on CPU (cheap there, and the sums do not depend on chunking
    or on how the windows were shared among workers) unless the matrix would exceed
    FLOAT64_HESSIAN_BYTES; float32 on GPUs and for such wide inputs."""
    return torch.float64 if _float64(device, columns, FLOAT64_HESSIAN_BYTES) else torch.float32


def solve_dtype(device: torch.device | str, columns: int = 0) -> torch.dtype:
    """The factorization and the column sweep: float64 on CPU up to FLOAT64_SOLVE_BYTES,
    float32 beyond and on GPUs."""
    return torch.float64 if _float64(device, columns, FLOAT64_SOLVE_BYTES) else torch.float32


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
        self.dtype = hessian_dtype(device, columns)
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


# the leaves of the blocked triangular inversion
INVERSE_LEAF = 256


def factor_flops(n: int) -> float:
    """Floating-point operations of `inverse_factor` on n columns, counted as LAPACK counts
    them: n^3/3 for the Cholesky factorization and n^3/3 for the triangular inversion."""
    return 2.0 / 3.0 * n ** 3


def _invert_lower_(lower: torch.Tensor) -> torch.Tensor:
    """Invert a lower-triangular matrix in place, blocked: [[A, 0], [B, C]]^-1 is
    [[A^-1, 0], [-C^-1 B A^-1, C^-1]], the off-diagonal block from two triangular solves with
    A and C themselves, then A and C inverted the same way (n^3/3 flops in all, as LAPACK's
    trtri; a solve against the identity would take n^3). Holds n^2 / 2 more at most."""
    n = lower.shape[0]
    if n <= INVERSE_LEAF:
        eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
        lower.copy_(torch.linalg.solve_triangular(lower, eye, upper=False))
        return lower
    m = n // 2
    a, b, c = lower[:m, :m], lower[m:, :m], lower[m:, m:]
    x = torch.linalg.solve_triangular(a, b, upper=False, left=False)  # B A^-1
    b.copy_(torch.linalg.solve_triangular(c, x, upper=False).neg_())  # -C^-1 B A^-1
    del x
    _invert_lower_(a)
    _invert_lower_(c)
    return lower


@dataclasses.dataclass
class InverseFactor:
    """GPTQ's factor: the upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, in the
    sweep's column order (act-order's permutation applied), held reversed: R = P U P with P
    the order reversal. R is lower-triangular, and it is what one Cholesky factorization of
    the reversed matrix and one triangular inversion give, since for P H P = L L^T,
    H^-1 = (P L^-T P)(P L^-1 P) = U^T U with U = P L^-1 P upper-triangular. That is 2n^3/3
    flops against 4n^3/3 for the textbook Cholesky, inverse, Cholesky, and one n x n copy
    fewer at the peak. One factor serves every linear that reads the same input."""
    reversed_lower: torch.Tensor
    perm: torch.Tensor | None  # the sweep's column order (act-order), or None
    dead: torch.Tensor  # bool [n]: inputs that are always zero (in the weight's order)
    damp: float  # the damping that factorized

    @property
    def columns(self) -> int:
        return self.reversed_lower.shape[0]

    def rows(self, i1: int, i2: int) -> torch.Tensor:
        """U[i1:i2, i1:] (the sweep's order), a copy."""
        n = self.columns
        return self.reversed_lower[n - i2:n - i1, :n - i1].flip(0, 1)

    def upper(self) -> torch.Tensor:
        """U whole (tests and small matrices)."""
        return self.reversed_lower.flip(0, 1)


def inverse_factor(hessian: torch.Tensor, damp: float = 0.01, act_order: bool = False,
                   dtype: torch.dtype | None = None, limit: float = 1.0) -> InverseFactor:
    """The factor of `hessian` (never written: it may be shared), raising damp x10 whenever
    the Cholesky factorization fails, up to `limit`. Dead inputs (zero diagonal) get 1 on
    the diagonal, as in the reference implementation. At most one n x n matrix besides the
    Hessian, plus half of one while inverting."""
    dtype = dtype or solve_dtype(hessian.device, hessian.shape[0])
    h = hessian.detach()
    n = h.shape[0]
    diagonal = h.diagonal().to(dtype)
    dead = diagonal == 0
    diagonal = torch.where(dead, torch.ones_like(diagonal), diagonal)
    mean_diag = diagonal.mean().item()
    perm = torch.argsort(diagonal, descending=True, stable=True) if act_order else None
    # the reversed (and permuted) order in which the factorization runs
    order = (perm if perm is not None else torch.arange(n, device=h.device)).flip(0)
    while True:
        # gathered transposed and viewed transposed back: the reordered matrix itself, laid
        # out column-major, which LAPACK factorizes in place without a copy
        reordered = h[order, order.unsqueeze(1)].to(dtype).mT
        reordered.diagonal().copy_(diagonal[order] + damp * mean_diag)
        info = torch.empty((), dtype=torch.int32, device=h.device)
        torch.linalg.cholesky_ex(reordered, out=(reordered, info))
        if int(info) == 0:
            return InverseFactor(_invert_lower_(reordered), perm, dead, damp)
        del reordered
        if damp * 10 > limit:
            raise HessianError(
                f"the Hessian is not positive definite even with damping {damp:g}")
        log.info("GPTQ: Cholesky failed with damping %g; retrying with %g", damp, damp * 10)
        damp *= 10


class SharedFactors:
    """The factor of the Hessian last asked for, kept while consecutive linears share that
    Hessian (q/k/v, gate/up): one factorization for them, and one factor alive at a time."""

    def __init__(self, gptq: Any):
        self.damp, self.act_order = gptq.damp, gptq.act_order
        self._last: tuple[torch.Tensor, InverseFactor] | None = None

    def of(self, hessian: torch.Tensor) -> InverseFactor:
        if self._last is None or self._last[0] is not hessian:
            self._last = None  # the previous factor freed before the next is made
            self._last = (hessian, inverse_factor(hessian, self.damp, self.act_order))
        return self._last[1]


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor | None, fmt: AffineFormat,
                  damp: float = 0.01, block_size: int = 128, act_order: bool = False,
                  scale_dtype: torch.dtype = torch.float32,
                  qparams: QuantParams | None = None,
                  factor: InverseFactor | None = None) -> GPTQResult:
    """GPTQ rounding of `weight`; with `qparams` given (e.g. learned clipping) the grid is
    fixed and only the rounding is chosen. `factor` (from `inverse_factor` of this Hessian
    with this damp and act-order) spares the factorization when several linears share the
    Hessian; then `hessian` may be None."""
    columns = weight.shape[1]
    if factor is None:
        assert hessian is not None
        factor = inverse_factor(hessian, damp, act_order)
    del hessian
    dtype = factor.reversed_lower.dtype
    w = weight.detach().to(dtype).clone()
    group = fmt.group_size
    if bool(factor.dead.any()):
        w[:, factor.dead] = 0.0
    # parameters: per channel (or static groups with act-order) from the whole weight up front;
    # otherwise each group's from the error-updated weight when its first column comes up
    perm = factor.perm
    lazy_groups = group is not None and perm is None and qparams is None
    static = choose_qparams(w.float(), fmt) if qparams is None else qparams
    scale = static.scale.to(scale_dtype).to(dtype)
    zero = static.zero_point.to(dtype)
    if perm is not None:
        w = w[:, perm]
    column_group = (torch.arange(columns, device=w.device) // group if group is not None
                    else torch.zeros(columns, dtype=torch.long, device=w.device))
    if perm is not None:
        column_group = column_group[perm]
    if group is not None:
        block_size = max(group, block_size // group * group)  # groups never straddle blocks
    # the sweep's codes and its working block of columns are held transposed (a column per
    # contiguous row); every element sees the same operations as in the textbook layout
    codes = torch.zeros(columns, w.shape[0], dtype=dtype, device=w.device)
    scale_t, zero_t = scale.T.contiguous(), zero.T.contiguous()
    one_group = dataclasses.replace(fmt, group_size=None)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        u = factor.rows(i1, i2)  # U[i1:i2, i1:]
        u1 = u[:, :i2 - i1]
        w1 = w[:, i1:i2].T.contiguous()
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = i1 + i
            g = int(column_group[col])
            if lazy_groups and group is not None and col % group == 0:
                p = choose_qparams(w1[i:i + group].T.float(), one_group)
                scale_t[g] = p.scale[:, 0].to(scale_dtype).to(dtype)
                zero_t[g] = p.zero_point[:, 0].to(dtype)
            s, z = scale_t[g], zero_t[g]
            q = (torch.round(w1[i] / s) + z).clamp_(fmt.qmin, fmt.qmax)
            codes[col] = q
            err = (w1[i] - (q - z) * s) / u1[i, i]
            w1[i:] -= u1[i, i:].unsqueeze(1) * err.unsqueeze(0)
            err1[i] = err
        w[:, i2:] -= err1.T.contiguous() @ u[:, i2 - i1:]
    scale, zero = scale_t.T, zero_t.T
    codes = codes.T
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    codes = codes.to(torch.int32)
    qparams = QuantParams(scale.float(), zero.float())
    fake = dequantize(codes, qparams, fmt, dtype=weight.dtype)
    return GPTQResult(fake, codes, qparams, factor.damp)
