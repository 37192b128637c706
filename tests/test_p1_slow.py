"""Protocol P1 on the real model (needs `relayquant assets prepare`): FP 24.37, RTN W4 42.02."""
import os

import pytest

from pipeline import assets

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prepared():
    if not os.path.exists(os.path.join(assets.model_dir("smollm2-135m"), "config.json")):
        pytest.skip("P1 assets not prepared (run `relayquant assets prepare`)")


def test_quick_windows_fp_perplexity(prepared):
    from cluster.coordinator import evaluate
    from pipeline.config import ClusterConfig, EvalConfig

    result = evaluate("asset:smollm2-135m", EvalConfig(max_windows=32), ClusterConfig(workers=2))
    assert result["windows"] == 32
    assert result["perplexity"] == pytest.approx(27.77, abs=0.05)


def test_p1_rtn_w4_full(prepared, tmp_path):
    from cluster.coordinator import quantize
    from jobs.recipes import load_recipe

    report = quantize(load_recipe("p1-rtn-w4", {"output": str(tmp_path / "out")}))
    ppl = report["perplexity"]
    assert ppl["windows"] == 292
    assert ppl["fp"] == pytest.approx(24.37, abs=0.05)
    assert ppl["quantized"] == pytest.approx(42.02, rel=0.005)
