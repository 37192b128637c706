import itertools

import pytest

from pipeline.config import ConfigError, QuantizationConfig
from pipeline.plan import make_plan, open_model, split_stages
from pipeline.schemes import validate_schemes

pytestmark = pytest.mark.unit


def heaviest(sizes, ranges):
    return max(sum(sizes[a:b]) for a, b in ranges)


def brute_force(sizes, k):
    import itertools

    n = len(sizes)
    best = None
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = [0, *cuts, n]
        cost = max(sum(sizes[a:b]) for a, b in itertools.pairwise(bounds))
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("sizes,k", [([5, 1, 1, 1, 5], 2), ([3, 3, 3, 3, 3, 3], 3),
                                     ([9, 1, 1, 1, 1, 1, 1, 1, 1, 1], 3), ([1, 2, 3], 3)])
def test_split_is_contiguous_and_optimal(sizes, k):
    ranges = split_stages(sizes, k)
    assert len(ranges) == k and ranges[0][0] == 0 and ranges[-1][1] == len(sizes)
    assert all(a < b for a, b in ranges)
    assert all(r1[1] == r2[0] for r1, r2 in itertools.pairwise(ranges))
    assert heaviest(sizes, ranges) == brute_force(sizes, k)


def test_more_workers_than_blocks():
    with pytest.raises(ConfigError, match="cluster.workers: 5 exceeds the model's 4 blocks"):
        split_stages([1, 1, 1, 1], 5)


def test_plan_reads_only_headers(tiny_model):
    parts = open_model(tiny_model("llama"))
    plan = make_plan(parts, "x", 2)
    assert plan.num_blocks == 4 and plan.stages == ((0, 2), (2, 4))
    assert len(set(plan.block_bytes)) == 1 and plan.block_bytes[0] > 0


def test_group_size_error_is_actionable(tiny_model):
    parts = open_model(tiny_model("qwen2"))
    with pytest.raises(ConfigError, match=r"quantization.group_size: 24 does not divide "
                                          r"in_features 64 of model.layers.0.self_attn.q_proj; "
                                          r"choose one of 16, 32, 64, or null for per-channel"):
        validate_schemes(parts, QuantizationConfig(bits=4, group_size=24), [])
