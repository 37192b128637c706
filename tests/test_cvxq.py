"""CVXQ on the stages: the streamed gradient statistics equal a single-process autograd
computation, the allocation is global (the same on 1, 2 and 3 workers), and a budgeted run
quantizes each unit at its width, reports and plots the allocation, and resumes with it."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cluster import runtime
from cluster.allocation import sensitivity_pass
from cluster.coordinator import quantize, start_stages
from pipeline.calibration import calibration_windows_for
from pipeline.config import BudgetConfig, Distortion, RunConfig
from pipeline.config.tree import build_config, config_to_dict
from pipeline.cvxq import budget
from pipeline.cvxq.sensitivity import pca_directions, projection_signs, unit_statistics
from pipeline.plan import make_plan, open_model
from pipeline.streams import split_windows

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.usefixtures("local_ray")]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test its own user cache: CVXQ's statistics of one test's model and calibration
    must not answer another's sensitivity pass."""
    folder = tmp_path / "user-cache"
    monkeypatch.setenv("RELAYQUANT_CACHE_DIR", str(folder))
    return folder


def config_for(model, output, train, test, workers, **quantization):
    return build_config(RunConfig, {
        "model": {"path": model}, "output": output,
        "calibration": {"corpus": train, "num_samples": 12, "seq_len": 32, "seed": 0},
        "quantization": {"bits": 3, "group_size": 16, **quantization},
        "eval": {"corpus": test, "seq_len": 32, "max_windows": 12},
        "cluster": {"workers": workers, "chunk_size": 5}})


def streamed_stats(model, config, workers):
    parts = open_model(model, "float32")
    plan = make_plan(parts, model, workers)
    calib = calibration_windows_for(model, config.calibration)
    stages, group = start_stages(plan, config.cluster)
    try:
        return parts, calib, sensitivity_pass(stages, model, calib, config.quantization.budget)[0]
    finally:
        runtime.release(stages.actors, group)


def reference_stats(model, calib, chunk_size, budget_config):
    """The whole HF model in this process: the same objective, plain autograd."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    hf.config._attn_implementation = "sdpa"
    decoder = hf.model
    chunks = split_windows(calib, chunk_size)
    with torch.no_grad():
        hidden = [decoder(input_ids=c).last_hidden_state.double() for c in chunks]
    cov = sum(h.reshape(-1, h.shape[-1]).T @ h.reshape(-1, h.shape[-1]) for h in hidden)
    directions = pca_directions(cov, budget_config.pca_dims)
    linears = {n: m for n, m in hf.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n}
    sums = {n: 0.0 for n in linears}
    for c, ids in enumerate(chunks):
        hf.zero_grad()
        y = decoder(input_ids=ids).last_hidden_state @ directions
        (y * projection_signs(y.shape, budget_config.seed, c)).sum().backward()
        for n, m in linears.items():
            sums[n] += float(m.weight.grad.double().pow(2).sum())
    return sums


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_streamed_gradient_statistics_match_single_process_autograd(tiny_model, corpus_files,
                                                                    tmp_path, arch):
    model = tiny_model(arch)
    config = config_for(model, str(tmp_path / "o"), *corpus_files, 2,
                        budget={"average_bits": 3.0, "pca_dims": 16})
    _, calib, stats = streamed_stats(model, config, 2)
    ref = reference_stats(model, calib, 5, config.quantization.budget)
    assert set(ref) == set(stats)
    for name, value in ref.items():
        got = stats[name]["grad_sq_sum"]
        assert abs(got - value) <= 1e-5 * abs(value), (name, got, value)


def test_allocation_is_global_not_per_shard(tiny_model, corpus_files, tmp_path):
    model = tiny_model("llama")
    allocations = []
    for workers in (1, 2, 3):
        config = config_for(model, str(tmp_path / f"o{workers}"), *corpus_files, workers,
                            budget={"average_bits": 3.0, "choices": [2, 3, 4, 8]})
        parts, _, stats = streamed_stats(model, config, workers)
        allocations.append(budget.solve(parts, unit_statistics(parts, stats),
                                        config.quantization))
    assert allocations[0]["units"] == allocations[1]["units"] == allocations[2]["units"]
    assert len({u["bits"] for u in allocations[0]["units"]}) > 1  # really mixed


def test_budgeted_run_quantizes_reports_plots_and_resumes(tiny_model, corpus_files, tmp_path):
    model = tiny_model("llama")
    out = str(tmp_path / "out")
    # uniform 3-bit g16 asymmetric with fp32 scales: 3 + 32/16 + 3/16 bits per weight
    uniform = 3 + 2 + 3 / 16
    config = config_for(model, out, *corpus_files, 2,
                        budget={"average_bits": uniform, "choices": [2, 3, 4],
                                "count_side_info": True})
    config = build_config(RunConfig, {**config_to_dict(config), "eval": {"enabled": False}})
    report = quantize(config)
    alloc = report["allocation"]
    assert uniform - 0.1 <= alloc["achieved_bits"] <= uniform + 1e-9  # 16 units: coarse steps
    assert alloc["sensitivity"]["relative_to_forward"] > 1
    bits = {lin: u["bits"] for u in alloc["units"] for lin in u["linears"]}
    folder = Path(out) / ".relayquant" / "blocks"
    markers = [json.loads(f.read_text()) for f in sorted(folder.iterdir())]
    for marker in markers:
        for linear, scheme in marker["schemes"].items():
            assert scheme[0] == bits[linear], linear
    with open(os.path.join(out, "allocation.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # a second run of the same command resumes with the saved allocation: nothing recomputed
    os.remove(os.path.join(out, "report.json"))
    again = quantize(config)
    assert again["allocation"]["units"] == alloc["units"]
    assert again["resumed_blocks"] == list(range(4))
    # another run (another method) reuses the statistics from the first one's report: the same
    # budget gives the same allocation without a sensitivity pass, another budget another one
    from pipeline.config import ConfigError

    def reusing(output, **change):
        d = config_to_dict(config)
        return build_config(RunConfig, {**d, "output": str(tmp_path / output), "quantization": {
            **d["quantization"], "method": "gptq", "budget": {
                **d["quantization"]["budget"],
                "sensitivity_from": os.path.join(out, "report.json"), **change}}})

    third = quantize(reusing("other"))
    assert third["allocation"]["units"] == alloc["units"]
    assert third["allocation"]["sensitivity"] == {"reused_from": os.path.join(out, "report.json")}
    folder = Path(tmp_path / "other") / ".relayquant" / "blocks"
    for marker in (json.loads(f.read_text()) for f in sorted(folder.iterdir())):
        for linear, scheme in marker["schemes"].items():
            assert scheme[0] == bits[linear], linear
    lower = budget.solve(open_model(model, "float32"), alloc["units"],
                         reusing("x", average_bits=uniform - 0.5).quantization)
    assert lower["achieved_bits"] <= uniform - 0.5 + 1e-9
    assert sum(u["bits"] for u in lower["units"]) < sum(u["bits"] for u in alloc["units"])
    # statistics of another model are refused before any work
    d = config_to_dict(reusing("bad"))
    opt = build_config(RunConfig, {**d, "model": {"path": tiny_model("opt")}})
    with pytest.raises(ConfigError, match="do not cover this model's quantized linears"):
        quantize(opt)
    assert not os.path.exists(tmp_path / "bad" / "manifest.json")
    # another budget in the same folder, from that folder's own report: --restart clears the
    # folder, so the statistics are read before it does
    d = config_to_dict(reusing("x", average_bits=uniform - 0.5))
    in_place = quantize(build_config(RunConfig, {**d, "output": out}), restart=True)
    assert in_place["allocation"]["units"] == lower["units"]


def test_measured_allocation_over_widths_and_group_sizes(tiny_model, corpus_files, tmp_path,
                                                         own_cache, monkeypatch):
    """distortion: measured with group_sizes: each unit gets a (width, group size) option at the
    total cost of uniform 3-bit g16 (side information counted); the stages' measured RTN errors
    equal a direct computation on the checkpoint; the blocks are quantized at the chosen formats;
    a run that reuses the statistics measures again and solves the same; a second run takes
    the FP model's statistics and errors from the user cache."""
    from safetensors.torch import load_file

    from pipeline.formats import AffineFormat
    from pipeline.methods.rtn import rtn_quantize

    model = tiny_model("llama")
    out = str(tmp_path / "out")
    uniform = 3 + (32 + 3) / 16
    spec = {"average_bits": uniform, "choices": [3, 4], "count_side_info": True,
            "distortion": "measured", "group_sizes": [16, 32, None]}
    config = config_for(model, out, *corpus_files, 2, budget=spec)
    config = build_config(RunConfig, {**config_to_dict(config), "eval": {"enabled": False}})
    alloc = quantize(config)["allocation"]
    assert uniform - 0.2 <= alloc["achieved_bits"] <= uniform + 1e-9
    chosen = {(u["bits"], u["group_size"]) for u in alloc["units"]}
    assert len(chosen) > 1 and chosen <= {(b, g) for b in (3, 4) for g in (16, 32, None)}
    weights = {}
    for f in Path(model).glob("*.safetensors"):
        weights.update(load_file(str(f)))
    for unit in alloc["units"][:4]:
        for key, mse in unit["mse"].items():
            bits = int(key[1])
            group = None if key.endswith("pc") else int(key.split("g")[1])
            direct = sum(float((rtn_quantize(w, AffineFormat(bits, group))[0] - w).double()
                               .pow(2).sum()) for w in (weights[n + ".weight"].float()
                                                        for n in unit["linears"]))
            assert mse == pytest.approx(direct / unit["params"], rel=1e-9), (unit["name"], key)
    # the allocation's distortion is at most what uniform 3-bit g16 (same cost) would give
    uniform_d = sum(u["params"] * u["grad_sq"] * u["mse"]["w3g16"] for u in alloc["units"])
    assert alloc["modelled_distortion"] <= uniform_d
    fmt = {lin: [u["bits"], u["group_size"], False] for u in alloc["units"] for lin in u["linears"]}
    for marker in (json.loads(f.read_text())
                   for f in sorted((Path(out) / ".relayquant" / "blocks").iterdir())):
        for linear, scheme in marker["schemes"].items():
            assert scheme == fmt[linear], linear
    reused = config_for(model, str(tmp_path / "again"), *corpus_files, 1, budget={
        **spec, "sensitivity_from": os.path.join(out, "report.json")})
    reused = build_config(RunConfig, {**config_to_dict(reused), "eval": {"enabled": False}})
    again = quantize(reused)["allocation"]
    assert [(u["bits"], u["group_size"]) for u in again["units"]] == \
        [(u["bits"], u["group_size"]) for u in alloc["units"]]
    # a second run of the same model (another output): the sensitivity statistics and the
    # measured errors of the FP model come from the user cache, no pass runs, same allocation;
    # another calibration, or a damaged entry, is measured again
    from cluster import allocation

    kinds = sorted(p.name for p in own_cache.iterdir())
    assert kinds == ["cvxq_errors", "cvxq_statistics"]
    measured_errors, measured_pass = allocation.measure_errors, allocation.sensitivity_pass

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed what the user cache holds")

    monkeypatch.setattr(allocation, "measure_errors", refuse)
    monkeypatch.setattr(allocation, "sensitivity_pass", refuse)
    d = config_to_dict(config)
    cached = quantize(build_config(RunConfig, {**d, "output": str(tmp_path / "cached")}))
    assert cached["allocation"]["units"] == alloc["units"]
    assert cached["allocation"]["sensitivity"]["reused_from"].startswith(str(own_cache))
    # another calibration seed: the statistics are measured again (the errors are still cached)
    calls = []
    monkeypatch.setattr(allocation, "sensitivity_pass",
                        lambda *a, **k: calls.append(1) or measured_pass(*a, **k))
    other = build_config(RunConfig, {**d, "output": str(tmp_path / "seed1"),
                                     "calibration": {**d["calibration"], "seed": 1}})
    assert "seconds" in quantize(other)["allocation"]["sensitivity"] and calls == [1]
    # damaged entries (not JSON; JSON of another shape) are measured again
    for entry in (own_cache / "cvxq_errors").iterdir():
        entry.write_text("{not json")
    for entry in (own_cache / "cvxq_statistics").iterdir():
        entry.write_text('{"linears": 3}')
    monkeypatch.setattr(allocation, "measure_errors", measured_errors)
    again = quantize(build_config(RunConfig, {**d, "output": str(tmp_path / "damaged")}))
    assert again["allocation"]["units"] == alloc["units"] and calls == [1, 1]
    entry = next((own_cache / "cvxq_errors").iterdir())
    assert json.loads(entry.read_text())["errors"]


def test_an_infeasible_budget_is_refused_before_any_work(tiny_model, corpus_files, tmp_path):
    from pipeline.config import ConfigError

    config = config_for(tiny_model("llama"), str(tmp_path / "o"), *corpus_files, 1,
                        budget={"average_bits": 3.0, "choices": [2, 3, 4],
                                "count_side_info": True})
    with pytest.raises(ConfigError, match=r"quantization.budget.average_bits: 3.0 is below what "
                                          r"the smallest choice \(2 bits plus scales and zero "
                                          r"points\) costs: at least 4.1250"):
        quantize(config)
    assert not os.path.exists(tmp_path / "o" / "manifest.json")
    # a group size that does not divide a quantized linear's in_features (64 and 128)
    config = config_for(tiny_model("llama"), str(tmp_path / "g"), *corpus_files, 1,
                        budget={"average_bits": 4.0, "choices": [3, 4],
                                "distortion": "measured", "group_sizes": [16, 48]})
    with pytest.raises(ConfigError, match="quantization.budget.group_sizes: 48 does not divide "
                                          "in_features 64"):
        quantize(config)
    assert not os.path.exists(tmp_path / "g" / "manifest.json")


def test_budget_settings_are_validated():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="quantization.budget.choices"):
        BudgetConfig(average_bits=3.0, choices=[1, 3])
    with pytest.raises(ConfigError, match="quantization.budget.average_bits: 1.5"):
        BudgetConfig(average_bits=1.5, choices=[2, 3])
    with pytest.raises(ConfigError, match="quantization.budget.group_sizes: needs "
                                          "quantization.budget.distortion: measured"):
        BudgetConfig(average_bits=3.0, group_sizes=[32, 64])
    with pytest.raises(ConfigError, match="quantization.budget.group_sizes"):
        BudgetConfig(average_bits=3.0, distortion=Distortion.MEASURED, group_sizes=[0])
    with pytest.raises(ConfigError, match="quantization.budget.distortion"):
        build_config(BudgetConfig, {"distortion": "exact"}, "quantization.budget")
