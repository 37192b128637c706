"""A stage's peak RSS does not grow with depth (4 vs 32 blocks of ~45 MB; ~1.5 GB if held)."""
import importlib.util
import os

import pytest

pytestmark = pytest.mark.slow


def test_stage_peak_does_not_grow_with_depth(tmp_path):
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "depth_memory.py")
    spec = importlib.util.spec_from_file_location("depth_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--out", str(tmp_path / "depth.json")])
    assert result["block_bytes"] >= 32 * 2**20
    assert result["deep_model_bytes"] >= 1 << 30
    assert result["peak_ratio_deep_over_shallow"] <= 1.15
