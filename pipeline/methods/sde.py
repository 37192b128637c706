"""Singular-value diagonal expansion (SDE, CQE+): a learned correction of a linear's weight in
its own singular basis.

W = U diag(S) Vh (thin SVD, float32, once; U and Vh frozen). The weight the quantizer sees is
W + U Δ Vh = U (diag(S) + Δ) Vh, where Δ (r x r, r = min(out, in)) is supported on a band of
diagonals (offsets 0, ±1, ..., ±band: one learned vector per offset) plus, optionally, a dense
k x k block over the largest singular directions (LSI's group-wise variant). band = 0 without
the block is LSI's learnable singular values. Δ starts at 0 and W + U·0·Vh is W exactly, so
training starts bit for bit at the host method's point. After training the expanded weight is
materialized and quantized like any other: nothing of the SVD remains at inference.

With `relative`, the entry (i, j) of Δ is its parameter times sqrt(S_i S_j), so one learning rate
moves every layer's singular values by the same fraction (sign gradients would otherwise move a
layer of small singular values as far as one of large ones); without it the parameters are Δ's
entries themselves (LSI's parametrization).
"""
from __future__ import annotations

import torch
from torch import nn


def thin_svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of `w`. On the CPU on one thread: LAPACK's blocked SVD rounds differently with
    the thread count, and every data-parallel worker (whatever its threads) must start from the
    same U and Vh to take the same steps as one worker."""
    if w.device.type != "cpu":
        return torch.linalg.svd(w, full_matrices=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.svd(w, full_matrices=False)
    finally:
        torch.set_num_threads(threads)


class SingularExpansion(nn.Module):
    """Δ for one linear and the weight change U Δ Vh it makes."""

    # buffers (registered below), typed for the checker
    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    norm2: torch.Tensor
    unit: torch.Tensor

    def __init__(self, weight: torch.Tensor, band: int, block: int, relative: bool = True):
        super().__init__()
        w = weight.detach().float()
        u, s, vh = thin_svd(w)
        r = s.shape[0]
        self.rank = r
        self.band = min(band, r - 1)
        self.block = min(block, r)
        self.register_buffer("u", u, persistent=False)
        self.register_buffer("s", s, persistent=False)
        self.register_buffer("vh", vh, persistent=False)
        self.register_buffer("norm2", s.double().pow(2).sum().float(), persistent=False)
        root = s.clamp(min=0).sqrt()
        # the scale of each offset's entries: sqrt(S_i S_{i+d}) (relative) or 1
        self.register_buffer("unit", torch.ones(r) if not relative else s.clamp(min=0),
                             persistent=False)
        self.diagonal = nn.Parameter(torch.zeros(r, device=w.device))
        # above[d-1][i] = Δ[i, i+d]; below[d-1][i] = Δ[i+d, i]
        self.above = nn.ParameterList(
            [nn.Parameter(torch.zeros(r - d, device=w.device)) for d in range(1, self.band + 1)])
        self.below = nn.ParameterList(
            [nn.Parameter(torch.zeros(r - d, device=w.device)) for d in range(1, self.band + 1)])
        self.off_units = [(root[:-d] * root[d:]) if relative else torch.ones(r - d,
                                                                              device=w.device)
                          for d in range(1, self.band + 1)]
        k = self.block
        self.dense = nn.Parameter(torch.zeros(k, k, device=w.device)) if k else None
        self.dense_unit = (torch.outer(root[:k], root[:k]) if relative
                           else torch.ones(k, k, device=w.device)) if k else None

    def _dense_scaled(self) -> torch.Tensor:
        """The dense k x k block in the singular values' scale (only where there is one)."""
        assert self.dense is not None and self.dense_unit is not None
        return self.dense * self.dense_unit

    def learnable(self) -> list[nn.Parameter]:
        out = [self.diagonal, *self.above, *self.below]
        return out + ([self.dense] if self.dense is not None else [])

    def band_matrix(self, size: int) -> torch.Tensor:
        """The band's top-left size x size corner as a dense matrix."""
        delta = torch.diag((self.diagonal * self.unit)[:size])
        for d, (a, b, unit) in enumerate(zip(self.above, self.below, self.off_units,
                                             strict=True), start=1):
            if d < size:
                delta = (delta + torch.diag((a * unit)[: size - d], d)
                         + torch.diag((b * unit)[: size - d], -d))
        return delta

    def matrix(self) -> torch.Tensor:
        """Δ as a dense r x r matrix (for checks; training never builds it)."""
        delta = self.band_matrix(self.rank)
        if self.dense is not None:
            k = self.block
            delta = delta + nn.functional.pad(self._dense_scaled(),
                                              (0, self.rank - k, 0, self.rank - k))
        return delta

    def u_delta(self) -> torch.Tensor:
        """U Δ (out x r) without building Δ: column j gathers U[:, i] Δ[i, j] along the band."""
        u, r = self.u, self.rank
        out = u * (self.diagonal * self.unit)
        for d, (a, b, unit) in enumerate(zip(self.above, self.below, self.off_units,
                                             strict=True), start=1):
            # Δ[i, i+d] = a[i]: column i+d gets U[:, i] a[i]; Δ[i+d, i] = b[i]: column i gets
            # U[:, i+d] b[i]
            out = out + nn.functional.pad(u[:, : r - d] * (a * unit), (d, 0))
            out = out + nn.functional.pad(u[:, d:] * (b * unit), (0, d))
        if self.dense is not None:
            k = self.block
            out = out + nn.functional.pad(u[:, :k] @ self._dense_scaled(), (0, r - k))
        return out

    def weight_change(self) -> torch.Tensor:
        """U Δ Vh, in the learned parameters' graph."""
        return self.u_delta() @ self.vh

    def expand(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight the quantizer sees: W + U Δ Vh (W itself, bit for bit, while Δ = 0)."""
        return weight + self.weight_change().to(weight.dtype)

    def relative_change(self) -> torch.Tensor:
        """||U Δ Vh||_F^2 / ||W||_F^2 = ||Δ||_F^2 / ||S||^2 (U and Vh have orthonormal columns
        and rows): how far the expansion moved the weight, for the penalty."""
        total = (self.diagonal * self.unit).pow(2).sum()
        for a, b, unit in zip(self.above, self.below, self.off_units, strict=True):
            total = total + (a * unit).pow(2).sum() + (b * unit).pow(2).sum()
        if self.dense is not None:
            # the block overlaps the band's top-left corner: count that corner densely
            band_corner = self.band_matrix(self.block)
            corner = band_corner + self._dense_scaled()
            total = total - band_corner.pow(2).sum() + corner.pow(2).sum()
        return total / self.norm2.clamp(min=1e-30)
