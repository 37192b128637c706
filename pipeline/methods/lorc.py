"""ZeroQuant-V2's low-rank compensation (LoRC): the quantization error E = W - Ŵ of a linear,
approximated by a rank-m product B·A that is added back at inference (Ŵ + B·A).

Tensors in, tensors out (fp32 math); no IO, no device choice, no global state. Names follow
PEFT's LoRA: A is [m, in_features] (`lora_A`), B is [out_features, m] (`lora_B`), so the
correction of y = x Ŵᵀ is (x Aᵀ) Bᵀ.

The singular values are split evenly, B = U_m Σ_m^½ and A = Σ_m^½ V_mᵀ (the paper's Û, V̂): both
factors then have the same scale per rank component, which keeps them inside fp16's range and
makes one int8 scale per component (a row of A, a column of B) fit both equally well.

Small matrices (min(rows, cols) <= `exact_limit`) use the full SVD (torch.linalg.svd), whose
rank-m truncation is the best rank-m approximation in Frobenius and spectral norm
(Eckart-Young): ‖E - B·A‖_F = (Σ_{i>m} σ_i²)^½, the SVD tail. Larger ones use a randomized
range finder (Halko, Martinsson & Tropp 2011, Algorithm 4.4 with Q re-orthonormalized each
power iteration) with a seeded Gaussian test matrix of m + p columns and q power iterations,
followed by the exact SVD of the small projection QᵀE. Its error bound (HMT Cor. 10.10 plus the
truncation step of §9.4, in expectation over the test matrix, for p >= 2):

    E‖E - B·A‖₂ <= σ_{m+1} + [ (1 + √(m/(p-1))) + (e·√(m+p)/p)·√(min(rows,cols) - m) ]^{1/(2q+1)} σ_{m+1}

so with q = 4 power iterations and p = max(m, 16) the factor in brackets, taken to the 1/9th
power, is below 2 for any matrix of an LLM, and the result is at most about 3x the optimal
spectral error (in practice within a fraction of a percent of the SVD tail in Frobenius norm,
which `factor_errors` measures exactly and the report records).
"""
from __future__ import annotations

import dataclasses

import torch

EXACT_LIMIT = 2048  # min(rows, cols) up to which the full SVD is used
POWER_ITERATIONS = 4
MIN_OVERSAMPLE = 16
INT8_MAX = 127


@dataclasses.dataclass
class LowRankFactors:
    a: torch.Tensor  # [rank, in_features], fp32
    b: torch.Tensor  # [out_features, rank], fp32

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def product(self) -> torch.Tensor:
        return self.b.float() @ self.a.float()


@dataclasses.dataclass
class Int8Factors:
    """Both factors as int8 codes with one fp32 absmax scale per rank component: a row of A
    (`a_scale` [rank, 1]) and a column of B (`b_scale` [1, rank])."""

    a_codes: torch.Tensor
    a_scale: torch.Tensor
    b_codes: torch.Tensor
    b_scale: torch.Tensor

    def dequantized(self) -> LowRankFactors:
        return LowRankFactors(self.a_codes.float() * self.a_scale,
                              self.b_codes.float() * self.b_scale)


def randomized_range(e: torch.Tensor, columns: int, power_iterations: int, seed: int
                     ) -> torch.Tensor:
    """An orthonormal basis Q [rows, columns] of E's dominant column space. The test matrix is
    drawn on the CPU from its own generator, so every device and worker draws the same one."""
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(e.shape[1], columns, generator=generator).to(e.device)
    q = torch.linalg.qr(e @ omega).Q
    for _ in range(power_iterations):
        q = torch.linalg.qr(e.T @ q).Q
        q = torch.linalg.qr(e @ q).Q
    return q


def truncated_svd(e: torch.Tensor, rank: int, exact_limit: int = EXACT_LIMIT, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U [rows, r], S [r], Vᵀ [r, cols]) of the best (or, above `exact_limit`, randomized)
    rank-r approximation of E, in fp32; r = min(rank, rows, cols)."""
    e = e.float()
    rank = min(rank, *e.shape)
    if min(e.shape) <= exact_limit:
        # float64: the rounded fp32 result then hardly depends on the LAPACK build or threads
        u, s, vh = torch.linalg.svd(e.double(), full_matrices=False)
        return _signed(u[:, :rank].float(), s[:rank].float(), vh[:rank].float())
    columns = min(rank + max(rank, MIN_OVERSAMPLE), min(e.shape))
    q = randomized_range(e, columns, POWER_ITERATIONS, seed)
    u, s, vh = torch.linalg.svd((q.T @ e).double(), full_matrices=False)
    return _signed((q @ u[:, :rank].float()), s[:rank].float(), vh[:rank].float())


def _signed(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each singular pair's sign fixed (the largest entry of its right vector positive), so
    the factors do not depend on which of the two equal solutions the library returns."""
    sign = torch.sign(vh.gather(1, vh.abs().argmax(1, keepdim=True)))
    sign[sign == 0] = 1
    return u * sign.T, s, vh * sign


def low_rank_factors(error: torch.Tensor, rank: int, exact_limit: int = EXACT_LIMIT,
                     seed: int = 0) -> LowRankFactors:
    """B = U Σ^½, A = Σ^½ Vᵀ of E's rank-m approximation (the singular values split evenly)."""
    u, s, vh = truncated_svd(error, rank, exact_limit, seed)
    root = s.sqrt()
    return LowRankFactors((root[:, None] * vh).contiguous(), (u * root[None, :]).contiguous())


def activation_weighted_factors(error: torch.Tensor, input_rms: torch.Tensor, rank: int,
                                exact_limit: int = EXACT_LIMIT, seed: int = 0
                                ) -> LowRankFactors:
    """The activation-aware variant (not the paper's; ASVD's diagonal scaling): minimize
    ‖(E - B·A) D‖_F with D = diag(rms of each input channel) instead of ‖E - B·A‖_F, which
    approximates the output error ‖(E - B·A) Xᵀ‖ when the input channels are uncorrelated.
    Solved exactly by factoring E·D and folding D⁻¹ back into A."""
    d = input_rms.float().to(error.device).clamp(min=1e-8 * float(input_rms.max().clamp(min=1e-30)))
    factors = low_rank_factors(error.float() * d[None, :], rank, exact_limit, seed)
    return LowRankFactors((factors.a / d[None, :]).contiguous(), factors.b)


def quantize_int8(factors: LowRankFactors) -> Int8Factors:
    """Symmetric int8 with an absmax scale per rank component (A's rows, B's columns)."""
    a_scale = (factors.a.abs().amax(1, keepdim=True) / INT8_MAX).clamp(min=1e-30)
    b_scale = (factors.b.abs().amax(0, keepdim=True) / INT8_MAX).clamp(min=1e-30)
    a_codes = torch.round(factors.a / a_scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    b_codes = torch.round(factors.b / b_scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return Int8Factors(a_codes, a_scale, b_codes, b_scale)


def round_factors(factors: LowRankFactors, dtype: torch.dtype) -> LowRankFactors:
    """The factors as stored in `dtype` (fp16/bf16), returned in fp32."""
    return LowRankFactors(factors.a.to(dtype).float(), factors.b.to(dtype).float())


def factor_errors(error: torch.Tensor, exact: LowRankFactors, stored: LowRankFactors
                  ) -> dict[str, float]:
    """Squared Frobenius norms (summable over linears): of E, of the residual E - B·A with the
    fp32 factors, with the stored (rounded or int8) factors, and of the storage error itself
    (B·A - B'·A')."""
    e = error.double()
    exact_product = exact.product().double()
    stored_product = stored.product().double()
    return {"error_sq": float(e.pow(2).sum()),
            "residual_sq": float((e - exact_product).pow(2).sum()),
            "stored_residual_sq": float((e - stored_product).pow(2).sum()),
            "storage_error_sq": float((exact_product - stored_product).pow(2).sum())}


def adapter_bits(rank: int, rows: int, columns: int, bits: int, scale_bits: int = 0) -> int:
    """Storage of one linear's factors: rank·(rows + columns) values of `bits` bits, plus (int8)
    one scale per rank component on each side."""
    return rank * (rows + columns) * bits + 2 * rank * scale_bits
