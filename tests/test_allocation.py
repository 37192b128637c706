"""CVXQ allocator: brute-force optimum on small instances, the budget on rounded bits,
monotone in the budget, exact when tight, fast for 10^5 units, side information counted."""
from __future__ import annotations

import itertools
import random
import time

import pytest
import torch

from pipeline.cvxq.allocation import AllocationError, Unit, allocate, allocate_options


def random_units(n: int, seed: int, equal_params: bool = False) -> list[Unit]:
    rng = random.Random(seed)
    return [Unit(f"u{i}", 1000 if equal_params else rng.choice([500, 1000, 3000, 4096]),
                 grad_sq=10 ** rng.uniform(-8, -2), weight_var=10 ** rng.uniform(-5, -2))
            for i in range(n)]


def brute_force(units, choices, average_bits):
    total = sum(u.params for u in units)
    table = [[u.params * u.grad_sq * u.weight_var * 2.0 ** (-2 * b) for b in choices]
             for u in units]
    best = None
    for pick in itertools.product(range(len(choices)), repeat=len(units)):
        if sum(u.params * choices[k] for u, k in zip(units, pick, strict=True)) \
                <= average_bits * total:
            d = sum(row[k] for row, k in zip(table, pick, strict=True))
            if best is None or d < best[0]:
                best = (d, [choices[k] for k in pick])
    return best


@pytest.mark.parametrize("seed", range(8))
def test_matches_brute_force_with_equal_unit_sizes(seed):
    units = random_units(5, seed, equal_params=True)
    for choices in ([2, 3, 4], [0, 1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8]):
        for target in (2.5, 3.0, 3.5):
            got = allocate(units, choices, target)
            best, _ = brute_force(units, choices, target)
            assert got.distortion == pytest.approx(best, rel=1e-12), (choices, target)


@pytest.mark.parametrize("seed", range(12))
def test_near_brute_force_with_gapped_widths(seed):
    """Widths {2, 3, 4, 8}: the 4 -> 8 step costs four bits, a knapsack; the greedy fill stays
    inside the budget and within a small factor of the optimum (measured worst: 2.0x)."""
    units = random_units(6, seed, equal_params=True)
    total = sum(u.params for u in units)
    for target in (2.5, 3.0, 3.5, 4.5):
        got = allocate(units, [2, 3, 4, 8], target)
        best, _ = brute_force(units, [2, 3, 4, 8], target)
        assert sum(u.params * b for u, b in zip(units, got.bits, strict=True)) <= target * total
        assert got.distortion <= 2.5 * best


@pytest.mark.parametrize("seed", range(12))
def test_near_brute_force_with_unequal_unit_sizes(seed):
    units = random_units(6, seed)
    total = sum(u.params for u in units)
    for target in (2.5, 3.0, 3.3):
        got = allocate(units, [2, 3, 4], target)
        best, _ = brute_force(units, [2, 3, 4], target)
        assert sum(u.params * b for u, b in zip(units, got.bits, strict=True)) <= target * total
        assert got.distortion <= 1.5 * best


def test_rounded_average_within_002_and_monotone():
    units = random_units(2000, 7)
    previous = None
    for target in (2.25, 2.5, 2.75, 3.0, 3.25, 3.5, 3.9):
        got = allocate(units, [2, 3, 4, 8], target)
        assert set(got.bits) <= {2, 3, 4, 8}
        assert target - 0.02 <= got.achieved_bits <= target + 1e-12
        if previous is not None:
            assert all(b >= a for a, b in zip(previous.bits, got.bits, strict=True))
            assert got.distortion <= previous.distortion
        previous = got


def test_exact_when_the_budget_is_tight():
    units = random_units(50, 3)
    assert allocate(units, [2, 3, 4], 2.0).bits == [2] * 50
    assert allocate(units, [2, 3, 4], 4.0).bits == [4] * 50
    assert allocate(units, [2, 3, 4], 9.0).achieved_bits == 4.0
    with pytest.raises(AllocationError, match="budget.average_bits: 1.5 is below"):
        allocate(units, [2, 3, 4], 1.5)


def test_more_sensitive_units_get_more_bits():
    units = [Unit("low", 1000, 1e-6, 1e-4), Unit("high", 1000, 1e-2, 1e-4)]
    assert allocate(units, [2, 3, 4], 3.0).bits == [2, 4]


def test_side_information_takes_its_share_of_the_budget():
    units = [Unit(f"u{i}", 4096, 10 ** -(i % 5), 1e-3, side_bits=0.5) for i in range(40)]
    counted = allocate(units, [2, 3, 4], 3.5, count_side_info=True)
    plain = allocate(units, [2, 3, 4], 3.5)
    assert counted.achieved_bits <= 3.5 + 1e-12
    assert counted.weight_bits == pytest.approx(counted.achieved_bits - 0.5)
    assert counted.weight_bits < plain.weight_bits


def test_deterministic_and_fast_for_1e5_units():
    units = random_units(100_000, 11)
    start = time.perf_counter()
    a = allocate(units, list(range(9)), 3.0)
    elapsed = time.perf_counter() - start
    assert allocate(units, list(range(9)), 3.0) == a
    assert abs(a.achieved_bits - 3.0) < 0.02
    assert elapsed < 30  # a few seconds on a loaded 2-core machine; the benchmark has the figure


def test_zero_points_that_grow_with_the_width_are_counted():
    """Group 64 asymmetric: 16-bit scale per group (0.25 bit/weight) plus a b-bit zero point
    (b/64): uniform 3 bits costs 3 + 0.25 + 3/64 = 3.296875 bits per weight."""
    units = [Unit(f"u{i}", 4096, 10 ** -(i % 7), 1e-3, side_bits=16 / 64, side_per_bit=1 / 64)
             for i in range(60)]
    uniform = 3 + 16 / 64 + 3 / 64
    got = allocate(units, [2, 3, 4, 8], uniform, count_side_info=True)
    assert got.achieved_bits <= uniform + 1e-12 and got.achieved_bits > uniform - 0.02
    assert got.weight_bits == pytest.approx((got.achieved_bits - 0.25) * 64 / 65)
    assert got.distortion < allocate(units, [3], 3.0).distortion


# --- the multiple-choice form: (width, group size) options with measured distortions ---

def random_options(n: int, k: int, seed: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Options whose cost and distortion trade off like widths x group sizes: more bits or
    smaller groups cost more and distort less (with noise, so some options are dominated)."""
    gen = torch.Generator().manual_seed(seed)
    params = [int(x) for x in torch.randint(1, 5, (n,), generator=gen) * 1000]
    cost = 2 + 6 * torch.rand(n, k, generator=gen, dtype=torch.float64)
    sens = 10 ** (-4 * torch.rand(n, 1, generator=gen, dtype=torch.float64))
    noise = torch.exp(0.3 * torch.randn(n, k, generator=gen, dtype=torch.float64))
    return params, cost, sens * 2.0 ** (-2 * cost) * noise


def brute_force_options(params, cost, distortion, average_bits):
    n, k = cost.shape
    total = sum(params)
    best = None
    for pick in itertools.product(range(k), repeat=n):
        if sum(p * float(cost[i, j]) for i, (p, j) in enumerate(zip(params, pick))) \
                <= average_bits * total + 1e-9:
            d = sum(p * float(distortion[i, j]) for i, (p, j) in enumerate(zip(params, pick)))
            if best is None or d < best:
                best = d
    return best


@pytest.mark.parametrize("seed", range(10))
def test_options_feasible_and_within_one_unit_of_brute_force(seed):
    params, cost, distortion = random_options(5, 4, seed)
    target = float((torch.tensor(params, dtype=torch.float64) * cost.mean(dim=1)).sum()) / sum(params)
    got = allocate_options(params, cost, distortion, target)
    assert got.achieved_bits <= target + 1e-12
    optimum = brute_force_options(params, cost, distortion, target)
    assert got.distortion >= optimum * (1 - 1e-12)
    # the Lagrangian leaves at most one unit off the relaxation's optimum
    spread = max(p * float(distortion[i].max() - distortion[i].min())
                 for i, p in enumerate(params))
    assert got.distortion <= optimum + spread
    rows = torch.arange(len(params))
    assert got.distortion == pytest.approx(float(
        (torch.tensor(params, dtype=torch.float64) * distortion[rows, torch.tensor(got.choice)]).sum()))


def test_options_match_brute_force_on_most_instances():
    exact = 0
    for seed in range(20):
        params, cost, distortion = random_options(5, 3, 100 + seed)
        target = float(cost.mean()) + 0.3
        got = allocate_options(params, cost, distortion, target)
        exact += got.distortion <= brute_force_options(params, cost, distortion, target) * (1 + 1e-9)
    assert exact >= 15


def test_options_monotone_in_the_budget_and_deterministic():
    params, cost, distortion = random_options(300, 6, 7)
    last = None
    for target in (3.0, 3.5, 4.0, 5.0, 7.0):
        got = allocate_options(params, cost, distortion, target)
        assert got.achieved_bits <= target + 1e-12
        assert got == allocate_options(params, cost, distortion, target)
        if last is not None:
            assert got.distortion <= last.distortion
        last = got
    # a generous budget takes every unit's least-distortion option
    top = allocate_options(params, cost, distortion, 100.0)
    assert top.choice == [int(i) for i in torch.argmin(distortion, dim=1)]


def test_options_use_the_budget_and_are_fast_for_1e5_units():
    params, cost, distortion = random_options(100_000, 6, 3)
    start = time.perf_counter()
    got = allocate_options(params, cost, distortion, 4.0)
    elapsed = time.perf_counter() - start
    assert 4.0 - 0.02 < got.achieved_bits <= 4.0 + 1e-12
    assert elapsed < 30  # about a second here


def test_options_refuse_a_budget_below_the_cheapest_options():
    params, cost, distortion = random_options(10, 3, 1)
    floor = float((torch.tensor(params, dtype=torch.float64) * cost.min(dim=1).values).sum()) / sum(params)
    with pytest.raises(AllocationError, match="quantization.budget.average_bits"):
        allocate_options(params, cost, distortion, floor - 0.01)
    assert allocate_options(params, cost, distortion, floor).achieved_bits == pytest.approx(floor)
