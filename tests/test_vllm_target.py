"""export.target vllm refuses what vLLM cannot serve before any work; without it the plan warns
and the report and summary say whether vLLM can serve the output."""
import logging
import os
import re

import pytest
import yaml

from jobs.cli import main
from jobs.quantize import summarize
from pipeline.config import ConfigError, QuantizationConfig, RunConfig
from pipeline.config.tree import build_config
from pipeline.formats import AffineFormat
from pipeline.output_dir import transformers_loading
from pipeline.plan import open_model
from pipeline.schemes import validate_schemes, vllm_servable

pytestmark = pytest.mark.unit


def run_config(quantization, target="vllm"):
    export = {"target": target} if target else {}
    return build_config(RunConfig, {"model": {"path": "m"}, "output": "o",
                                    "quantization": quantization, "export": export})


@pytest.mark.parametrize("quantization,source", [
    ({"bits": 3}, "quantization.bits"),
    ({"bits": 2, "group_size": 64}, "quantization.bits"),
    ({"bits": 4, "overrides": {"re:.*down_proj": {"bits": 3}}},
     "quantization.overrides['re:.*down_proj']"),
    ({"bits": 4, "budget": {"average_bits": 3.0}}, "quantization.budget.choices"),
])
def test_vllm_target_refuses_asymmetric_widths_without_a_kernel(quantization, source):
    bits = 2 if "budget" in quantization else quantization.get("overrides", {}).get(
        "re:.*down_proj", quantization)["bits"]
    with pytest.raises(ConfigError, match=(
            rf"export.target: vllm has no kernel for asymmetric {bits}-bit weights \(from "
            rf"{re.escape(source)}\); vLLM serves symmetric weights at 2-8 bits "
            r"and asymmetric ones at 4 and 8: set symmetric: true, or bits 4 or 8")):
        run_config(quantization)


@pytest.mark.parametrize("quantization", [
    {"bits": 3, "symmetric": True, "group_size": 64},
    {"bits": 2, "symmetric": True},
    {"bits": 4, "group_size": 64},
    {"bits": 8},
    {"bits": 4, "symmetric": True, "budget": {"average_bits": 3.0}},
    {"bits": 4, "budget": {"average_bits": 5.0, "choices": [4, 8]}},
])
def test_vllm_target_accepts_what_vllm_serves(quantization):
    assert run_config(quantization).export.target.value == "vllm"


def test_no_target_accepts_anything():
    assert run_config({"bits": 3}, target=None).export.target is None


def test_vllm_target_is_refused_by_the_cli_before_any_work(capsys, tmp_path, tiny_model,
                                                           corpus_files):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"path": tiny_model("llama")}, "output": str(tmp_path / "out"),
        "calibration": {"corpus": corpus_files[0], "num_samples": 4, "seq_len": 32},
        "quantization": {"bits": 3, "group_size": 16}, "eval": {"enabled": False}}))
    assert main(["quantize", "--config", str(recipe), "--set", "export.target=vllm"]) == 2
    err = capsys.readouterr().err
    assert "relayquant: error: export.target: vllm has no kernel for asymmetric 3-bit" in err
    assert not os.path.exists(tmp_path / "out")


def test_plan_warns_when_vllm_cannot_serve_it(tiny_model, caplog):
    parts = open_model(tiny_model("llama"))
    with caplog.at_level(logging.WARNING, logger="pipeline.schemes"):
        validate_schemes(parts, QuantizationConfig(bits=3, group_size=16), [])
    assert "vLLM cannot serve this output: no vLLM kernel for w3 g16 asym" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.schemes"):
        validate_schemes(parts, QuantizationConfig(bits=3, group_size=16, symmetric=True), [])
    assert "vLLM" not in caplog.text


def test_an_override_that_matches_no_linear_is_refused(tiny_model):
    parts = open_model(tiny_model("llama"))
    for pattern in ("model.layer.0.self_attn.q_proj", "re:.*qproj"):
        q = QuantizationConfig(group_size=16, overrides={pattern: {"bits": 8}})
        with pytest.raises(ConfigError, match=rf"quantization.overrides\['{pattern}'\]: matches "
                                              "none of this model's 28 quantizable linears"):
            validate_schemes(parts, q, [])


def test_servable_verdict_and_reason():
    assert vllm_servable([AffineFormat(3, 64, True), AffineFormat(4, 64, False), None])[0]
    ok, why = vllm_servable([AffineFormat(2, 64, False), AffineFormat(3, 64, False),
                             AffineFormat(4, 64, False)])
    assert not ok
    assert why == ("no vLLM kernel for w2 g64 asym, w3 g64 asym: vLLM serves asymmetric weights "
                   "only at 4 and 8 bits; quantize with symmetric: true (2-8 bits) or at 4 or "
                   "8 bits")


def test_transformers_loading_note():
    assert transformers_loading([AffineFormat(4, 64, False)]).startswith(
        "loads with compressed-tensors 0.17.1 (pinned)")
    note = transformers_loading([AffineFormat(3, 64, False), AffineFormat(4, 64, False)])
    assert note.startswith("3-bit weights are packed densely (compressed-tensors 0.18+)")
    assert "dequantize=True" in note and note.endswith("the pinned 0.17.1 refuses them")
    assert "dequantize" not in transformers_loading([AffineFormat(5, None, True)])


def test_summary_says_whether_vllm_serves_it():
    result = {"blocks": 4, "method": "rtn", "wall_seconds": 1.0, "perplexity": {},
              "output": "/o", "vllm_servable": False, "vllm_why": "no vLLM kernel for w3"}
    assert summarize(result).splitlines()[-1] == "vLLM: cannot serve it: no vLLM kernel for w3"
    assert summarize({**result, "vllm_servable": True}).splitlines()[-1] == "vLLM: can serve it"

