"""CVXQ bit allocation: integer bit widths per decision unit under one average-bit budget.

Each unit n has P_n weights, a mean squared output gradient G_n^2 and a weight variance S_n^2;
its distortion at b bits is modelled as P_n G_n^2 S_n^2 2^(-2b). For a Lagrange multiplier
lambda, the unit's continuous optimum is the closed form

    B_n = 1/2 (log2 G_n^2 + log2 S_n^2 - log2 lambda)

clamped to the allowed widths and rounded to the allowed width that minimizes the unit's
Lagrangian G^2 S^2 2^(-2b) + 2 ln2 lambda b (the floor or the ceiling of the clamped closed form
for contiguous widths: the cost is convex in b). The rate of the **rounded** widths is monotone
in lambda, so log2 lambda is found by bisection (the sign of the constraint's violation is the
dual ascent direction; bisection converges deterministically where a fixed step oscillates) to
the smallest lambda whose rounded rate fits the budget. The units that switch at that lambda
are then raised one at a time, highest gain per bit first, while the budget allows, and any
budget still left goes to next-width upgrades by the same rule (greedy fill).

Side information (scales and zero points) is counted in the budget when asked: a unit's side
bits per weight are fixed by its group size, so they take their share of the budget first.
Pure: no torch modules, no I/O; vectorized over units (10^5 units take milliseconds).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from pipeline.config import ConfigError


class AllocationError(ConfigError):
    """The budget cannot be met (bad input: exit 2 on the command line)."""


@dataclasses.dataclass(frozen=True)
class Unit:
    name: str
    params: int
    grad_sq: float  # mean squared gradient of the objective w.r.t. the unit's weights
    weight_var: float  # variance of the unit's weights
    side_bits: float = 0.0  # side-information bits per weight that do not depend on b (scales)
    side_per_bit: float = 0.0  # side bits per weight per weight bit (zero points stored at b)


@dataclasses.dataclass(frozen=True)
class Allocation:
    bits: list[int]
    log2_lambda: float
    target_bits: float
    achieved_bits: float  # average bits per weight of the chosen widths (+ side info if counted)
    weight_bits: float  # average of the chosen widths alone
    distortion: float  # modelled: sum P G^2 S^2 2^(-2b)


def _costs(units: Sequence[Unit]) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.tensor([u.params for u in units], dtype=torch.float64)
    gs = torch.tensor([u.grad_sq * u.weight_var for u in units], dtype=torch.float64)
    return p, gs.clamp(min=1e-300)


def modelled_distortion(units: Sequence[Unit], bits: Sequence[int]) -> float:
    p, gs = _costs(units)
    b = torch.tensor(list(bits), dtype=torch.float64)
    return float((p * gs * torch.pow(2.0, -2 * b)).sum())


def _choose(gs: torch.Tensor, choices: torch.Tensor, log2_lambda: float) -> torch.Tensor:
    """Index into `choices` per unit: the closed form, clamped, rounded to the allowed width
    with the lowest Lagrangian."""
    closed = 0.5 * (torch.log2(gs) - log2_lambda)
    closed = closed.clamp(float(choices[0]), float(choices[-1]))
    upper = torch.searchsorted(choices, closed, right=False).clamp(max=len(choices) - 1)
    lower = (upper - 1).clamp(min=0)
    lower = torch.where(choices[upper] == closed, upper, lower)
    lam = 2 * math.log(2) * 2.0**log2_lambda

    def cost(i: torch.Tensor) -> torch.Tensor:
        b = choices[i]
        return gs * torch.pow(2.0, -2 * b) + lam * b

    return torch.where(cost(lower) <= cost(upper), lower, upper)


def allocate(units: Sequence[Unit], choices: Sequence[int], average_bits: float,
             count_side_info: bool = False, iterations: int = 200) -> Allocation:
    if not units:
        raise AllocationError("allocation: no decision units")
    widths = sorted({int(c) for c in choices})
    if not widths or widths[0] < 0:
        raise AllocationError(f"quantization.budget.choices: {list(choices)}; give non-negative integers")
    p, gs = _costs(units)
    total = float(p.sum())
    side = (float((p * torch.tensor([u.side_bits for u in units], dtype=torch.float64)).sum())
            if count_side_info else 0.0)
    if count_side_info:  # the rate of one more bit, counting what grows with it
        p_rate = p * (1 + torch.tensor([u.side_per_bit for u in units], dtype=torch.float64))
    else:
        p_rate = p
    budget = average_bits * total - side  # bits available for what grows with the width
    rate_total = float(p_rate.sum())
    lowest, highest = widths[0] * rate_total, widths[-1] * rate_total
    if budget < lowest - 1e-9 * total:
        raise AllocationError(
            f"quantization.budget.average_bits: {average_bits} is below the smallest width "
            f"{widths[0]}{' plus the side information' if side else ''} "
            f"(at least {(lowest + side) / total:.4f})")
    # per weight of rate: the same distortion, spread over the rate-weighted sizes
    p, p_distortion, gs = p_rate, p, gs * p / p_rate
    c = torch.tensor(widths, dtype=torch.float64)

    def rate(log2_lambda: float) -> tuple[torch.Tensor, float]:
        idx = _choose(gs, c, log2_lambda)
        return idx, float((p * c[idx]).sum())

    if budget >= highest:
        idx = torch.full((len(units),), len(widths) - 1, dtype=torch.long)
        log2_lambda = float(torch.log2(gs).min()) - 2 * widths[-1] - 2
    else:
        # bracket: low lambda -> every unit at the top width (too many bits), high -> bottom
        lo = float(torch.log2(gs).min()) - 2 * widths[-1] - 4
        hi = float(torch.log2(gs).max()) - 2 * widths[0] + 4
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            if rate(mid)[1] <= budget:
                hi = mid
            else:
                lo = mid
        log2_lambda = hi
        idx, used = rate(hi)
        below, _ = rate(lo)
        # units that switch between the two sides of the breakpoint: raise them while they fit
        gain = gs * (torch.pow(2.0, -2 * c[idx]) - torch.pow(2.0, -2 * c[below]))
        extra = p * (c[below] - c[idx])
        order = sorted((i for i in range(len(units)) if below[i] > idx[i]),
                       key=lambda i: (-float(gain[i] / (c[below[i]] - c[idx[i]])), i))
        for i in order:
            if used + float(extra[i]) <= budget + 1e-9 * total:
                used += float(extra[i])
                idx[i] = below[i]
        # what is left (gapped widths, unequal unit sizes): next-width upgrades, best gain per
        # bit first, while they fit
        while True:
            up = (idx + 1).clamp(max=len(widths) - 1)
            step = p * (c[up] - c[idx])
            fits = (up > idx) & (used + step <= budget + 1e-9 * total)
            if not bool(fits.any()):
                break
            ratio = gs * (torch.pow(2.0, -2 * c[idx]) - torch.pow(2.0, -2 * c[up])) / (
                c[up] - c[idx]).clamp(min=1)
            ratio = torch.where(fits, ratio, torch.full_like(ratio, -1.0))
            i = int(torch.argmax(ratio))
            used += float(step[i])
            idx[i] = up[i]
    bits = [int(c[i]) for i in idx]
    weight_bits = float((p_distortion * c[idx]).sum()) / total
    rate_bits = float((p * c[idx]).sum()) / total
    return Allocation(bits=bits, log2_lambda=log2_lambda, target_bits=average_bits,
                      achieved_bits=rate_bits + side / total, weight_bits=weight_bits,
                      distortion=modelled_distortion(units, bits))


@dataclasses.dataclass(frozen=True)
class OptionAllocation:
    choice: list[int]  # each unit's option (column of `cost` / `distortion`)
    log2_lambda: float
    achieved_bits: float  # average cost per weight of the chosen options
    distortion: float  # sum over units of P * distortion[n, choice]


def allocate_options(params: Sequence[int], cost: torch.Tensor, distortion: torch.Tensor,
                     average_bits: float, iterations: int = 200) -> OptionAllocation:
    """The multiple-choice form: unit n takes one option o (a width and a group size, say) that
    costs `cost[n, o]` bits per weight (side information included) for `distortion[n, o]` per
    weight (G^2 times the measured error, or any estimate). For a multiplier lambda each unit
    takes argmin_o distortion + lambda * cost; the total cost is monotone in lambda, so log2
    lambda is bisected to the smallest lambda that fits the budget, then the moves with the
    highest distortion drop per extra bit are made while they fit (greedy fill). The result is
    within one unit's distortion range of the optimum (the Lagrangian relaxation leaves at most
    one unit fractional). Ties go to the lower option index: deterministic."""
    p = torch.tensor([float(x) for x in params], dtype=torch.float64)
    c = cost.to(torch.float64)
    d = distortion.to(torch.float64)
    if p.numel() == 0:
        raise AllocationError("allocation: no decision units")
    if c.shape != d.shape or c.shape[0] != p.numel():
        raise ValueError(f"allocate_options: cost {tuple(c.shape)}, distortion "
                         f"{tuple(d.shape)} and {p.numel()} units disagree")
    total = float(p.sum())
    budget = average_bits * total
    rows = torch.arange(p.numel())
    cheapest = float((p * c.min(dim=1).values).sum())
    if budget < cheapest - 1e-9 * total:
        raise AllocationError(
            f"quantization.budget.average_bits: {average_bits} is below what the cheapest "
            f"options cost (at least {cheapest / total:.4f} bits per weight)")

    def pick(log2_lambda: float) -> torch.Tensor:
        # lexicographic tie-break: the lower Lagrangian, then the lower index
        return torch.argmin(d + 2.0**log2_lambda * c, dim=1)

    def used(idx: torch.Tensor) -> float:
        return float((p * c[rows, idx]).sum())

    def fits_at(log2_lambda: float) -> bool:
        return used(pick(log2_lambda)) <= budget + 1e-9 * total

    # bracket log2 lambda (the distortion scale is arbitrary), then bisect
    lo, hi, step = -1.0, 1.0, 1.0
    while not fits_at(hi) and hi < 1000:
        lo, hi, step = hi, min(hi + step, 1000.0), step * 2
    step = 1.0
    while fits_at(lo) and lo > -1000:
        hi, lo, step = lo, max(lo - step, -1000.0), step * 2
    if fits_at(lo):  # even the least distortion fits
        idx, log2_lambda = pick(lo), lo
    else:
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            if fits_at(mid):
                hi = mid
            else:
                lo = mid
        idx, log2_lambda = pick(hi), hi
    spent = used(idx)
    for _ in range(p.numel() * c.shape[1]):
        extra = p[:, None] * (c - c[rows, idx][:, None])
        gain = p[:, None] * (d[rows, idx][:, None] - d)
        fits = (extra > 0) & (gain > 0) & (spent + extra <= budget + 1e-9 * total)
        if not bool(fits.any()):
            break
        ratio = torch.where(fits, gain / extra.clamp(min=1e-300),
                            torch.full_like(gain, -1.0))
        flat = int(torch.argmax(ratio))
        n, o = divmod(flat, c.shape[1])
        spent += float(extra[n, o])
        idx[n] = o
    return OptionAllocation(
        choice=[int(i) for i in idx], log2_lambda=log2_lambda, achieved_bits=used(idx) / total,
        distortion=float((p * d[rows, idx]).sum()))
