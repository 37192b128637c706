"""The pre-flight plan: memory per worker and predicted time from config.json alone."""
import json

import pytest

from jobs.cli import main
from pipeline.config import ConfigError, QuantizationConfig, Schedule
from pipeline.config.tree import build_config
from pipeline.planning.clusters import PRESETS
from pipeline.planning.cost_model import Workload, estimate, worker_memory
from pipeline.planning.run_estimate import model_shape

pytestmark = pytest.mark.unit


def llama70b_folder(tmp_path):
    """Llama-2-70B's config.json and an index naming shards that do not exist."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                         num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                         max_position_embeddings=4096, torch_dtype="bfloat16").to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    folder = tmp_path / "llama-2-70b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    weight_map = {f"model.layers.{i}.mlp.down_proj.weight": f"model-{i:05d}.safetensors"
                  for i in range(80)}
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 137953316864}, "weight_map": weight_map}))
    return folder


def recipe(tmp_path, folder, method="rtn", group_size=128, sections=None, **extra):
    path = tmp_path / "r.yaml"
    data = {"model": {"path": str(folder)}, "output": str(tmp_path / "out"),
            "calibration": {"num_samples": 128, "seq_len": 2048},
            "quantization": {"method": method, "bits": 4, "group_size": group_size, **extra},
            **(sections or {})}
    path.write_text(json.dumps(data))
    return str(path)


def cluster_file(tmp_path, device, nodes, per_node):
    path = tmp_path / f"{device}-{nodes}x{per_node}.yaml"
    path.write_text(json.dumps({"device": device, "nodes": nodes, "devices_per_node": per_node}))
    return str(path)


def test_llama70b_shapes_from_config_alone(tmp_path):
    shape, blocks, shared = model_shape(json.loads(
        (llama70b_folder(tmp_path) / "config.json").read_text()))
    assert blocks == 80 and shape.hidden == 8192 and shape.intermediate == 28672
    assert shape.linear_params == 8192 * (8192 * 2 + 1024 * 2) + 3 * 8192 * 28672
    assert sorted(shape.hessian_columns(shared)) == [8192, 8192, 8192, 28672]


@pytest.mark.parametrize("device,nodes,per_node", [("a100-80g", 1, 1), ("h100-80g", 1, 8),
                                                   ("h100-80g", 4, 8)])
def test_plan_prints_memory_and_time_for_the_presets(tmp_path, capsys, device, nodes,
                                                     per_node):
    folder = llama70b_folder(tmp_path)
    rc = main(["plan", "--config", recipe(tmp_path, folder, "omniquant", 64, bits=2),
               "--cluster", cluster_file(tmp_path, device, nodes, per_node), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["fits"] and out["workers"] == nodes * per_node
    assert out["schedule"] == ("data_parallel" if nodes * per_node > 1 else "sequential")
    assert 0 < out["memory_per_worker_bytes"] <= PRESETS[device].memory_bytes
    assert out["predicted_seconds"] > 0 and out["block_seconds"]["train"] > 0
    rc = main(["plan", "--config", recipe(tmp_path, folder, "omniquant", 64, bits=2),
               "--cluster", cluster_file(tmp_path, device, nodes, per_node)])
    assert rc == 0 and "memory per worker" in capsys.readouterr().err


def test_one_node_collectives_use_the_node_link(tmp_path, capsys):
    """Eight H100s of one node all-reduce over NVLink; across nodes over the NICs."""
    folder = llama70b_folder(tmp_path)
    collective = {}
    for nodes, per_node in ((1, 8), (2, 4)):
        assert main(["plan", "--config", recipe(tmp_path, folder, "omniquant", 64, bits=2),
                     "--cluster", cluster_file(tmp_path, "h100-80g", nodes, per_node),
                     "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["device"]["network_bytes"] == (PRESETS["h100-80g"].node_link_bytes
                                                  if nodes == 1 else 50e9)
        collective[nodes] = out["block_seconds"]["collective"]
    assert collective[1] < collective[2] / 4


def test_the_scale_table_is_what_plan_predicts(tmp_path, capsys):
    """docs/scale.md's Llama-2-70B table: every row's predicted time and memory per worker
    as `relayquant plan` gives them now (the table cannot drift from the model)."""
    import os
    import re

    folder = llama70b_folder(tmp_path)
    doc = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "scale.md")
    with open(doc) as f:
        rows = re.findall(r"^\|[^|]*`(llama-70b-[\w-]+)`[^|]*\| (?:(\d+) nodes x )?(\d+) x "
                          r"([AH]100-\d+G)[^|]*\| ([\d.]+) (h|min) \| ([\d.]+) GiB \|", f.read(),
                          re.MULTILINE)
    assert len(rows) == 24
    for name, nodes, per_node, device, seconds, unit, memory in rows:
        assert main(["plan", "--config", name, "--set", f"model.path={folder}",
                     "--set", f"output={tmp_path / 'out'}",
                     "--cluster", cluster_file(tmp_path, device.lower(), int(nodes or 1),
                                               int(per_node)), "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        predicted = out["predicted_quantize_phase_seconds"] / (3600 if unit == "h" else 60)
        assert (f"{predicted:.1f}", f"{out['memory_per_worker_bytes'] / 2**30:.1f}") == (
            seconds, memory), (name, nodes, per_node, device)


def test_more_workers_are_faster_and_hold_fewer_windows(tmp_path):
    shape, blocks, shared = model_shape(json.loads(
        (llama70b_folder(tmp_path) / "config.json").read_text()))
    q = build_config(QuantizationConfig, {"method": "gptq", "bits": 4, "group_size": 128},
                     "quantization")
    one = estimate(shape, blocks, q, Workload(128, 2048, 1, Schedule.SEQUENTIAL),
                   PRESETS["h100-80g"], shared)
    eight = estimate(shape, blocks, q, Workload(128, 2048, 8, Schedule.DATA_PARALLEL),
                     PRESETS["h100-80g"], shared)
    assert eight.seconds < one.seconds / 3
    assert eight.memory["streams"] * 7 < one.memory["streams"]
    spill = worker_memory(shape, q, Workload(128, 2048, 8, Schedule.DATA_PARALLEL, 2**30),
                          shared, PRESETS["h100-80g"])
    assert spill["streams"] == 2**30 and spill["streams_on_disk"] > 0
    rtn = build_config(QuantizationConfig, {"bits": 4, "group_size": 128}, "quantization")
    free = worker_memory(shape, rtn, Workload(0, 2048, 8, Schedule.DATA_PARALLEL), shared,
                         PRESETS["h100-80g"])
    assert "streams" not in free and "hessians" not in free


def test_a_plan_that_cannot_fit_exits_2(tmp_path, capsys):
    """GPTQ at 70B on one A100-40G: with the per-block output errors (an FP stream beside the
    quantized one) the streams do not fit; without them (GPTQ's default, one stream) they do."""
    folder = llama70b_folder(tmp_path)
    device = cluster_file(tmp_path, "a100-40g", 1, 1)
    rc = main(["plan", "--config", recipe(tmp_path, folder, "gptq", sections={
        "eval": {"block_errors": True}}), "--cluster", device])
    err = capsys.readouterr().err
    assert rc == 2
    assert "plan: a worker would need" in err and "but has 40.0 GiB (streams" in err
    assert "cluster.activation_memory_bytes" in err
    assert main(["plan", "--config", recipe(tmp_path, folder, "gptq"), "--cluster", device,
                 "--json"]) == 0
    one_stream = json.loads(capsys.readouterr().out)
    assert one_stream["fits"]


def test_bad_cluster_file_is_refused(tmp_path, capsys):
    folder = llama70b_folder(tmp_path)
    bad = tmp_path / "c.yaml"
    bad.write_text(json.dumps({"device": "tpu-v9"}))
    assert main(["plan", "--config", recipe(tmp_path, folder), "--cluster", str(bad)]) == 2
    assert "--cluster: device: 'tpu-v9'; choose one of this machine, h100-80g" in \
        capsys.readouterr().err


@pytest.mark.parametrize("total, share, fewer", [
    # 1.5 GiB for 3 workers: less than a worker process needs each; 1 worker (1.0 GiB) fits
    (3 * 2**29, "0.5", 1),
    (2**29, "0.2", None),  # half a GiB: not even one worker fits, so no worker count is named
])
def test_quantize_refuses_a_run_that_cannot_fit_this_machine(tiny_model, corpus_files,
                                                             tmp_path, monkeypatch, total,
                                                             share, fewer):
    import psutil

    from cluster.coordinator import quantize
    from pipeline.config import RunConfig

    class Small:
        pass

    Small.total = total
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Small())
    config = build_config(RunConfig, {
        "model": {"path": tiny_model("llama")}, "output": str(tmp_path / "out"),
        "calibration": {"corpus": corpus_files[0], "num_samples": 4, "seq_len": 32},
        "cluster": {"workers": 3}})
    with pytest.raises(ConfigError, match=f"plan: a worker would need .* but has {share} GiB"
                       ) as e:
        quantize(config)
    # workers on one machine share its memory: fewer of them, not more, is what fits
    if fewer:
        assert f"cluster.workers: {fewer} fits this machine" in str(e.value)
    else:
        assert "fits this machine" not in str(e.value)
    assert not (tmp_path / "out" / "report.json").exists()


def test_host_workers_split_the_learned_quantizer(tmp_path):
    """Data-parallel workers split the quantizer's work (each does 1/N of it); host workers
    move their gradient sums through shared memory, GPU workers over the links (each owner's
    tensors broadcast in float32, the sums reduced to it); shard_quantizer: false keeps the
    whole quantizer on every worker, with one all-reduce of the gradient."""
    import dataclasses

    from pipeline.planning.cost_model import QUANTIZER_PASSES, training_seconds

    shape, _blocks, _ = model_shape(json.loads(
        (llama70b_folder(tmp_path) / "config.json").read_text()))
    host = dataclasses.replace(PRESETS["a100-80g"], host=True)

    def learned(split):
        return build_config(QuantizationConfig, {
            "method": "omniquant", "bits": 3, "group_size": 64, "omniquant": {
                "epochs": 1, "batch_size": 2, "rounding": "learned",
                "shard_quantizer": split}}, "quantization")

    work = Workload(128, 512, 4, Schedule.DATA_PARALLEL)
    split = training_seconds(shape, learned(True), work, host, 32)
    whole = training_seconds(shape, learned(False), work, host, 32)
    gpu = training_seconds(shape, learned(True), work, PRESETS["a100-80g"], 32)
    gpu_whole = training_seconds(shape, learned(False), work, PRESETS["a100-80g"], 32)
    assert split["train"] < whole["train"] and gpu["train"] < gpu_whole["train"]
    # 64 steps, each worker doing 1/4 of the quantizer's passes instead of all of them
    quantizer = QUANTIZER_PASSES * 4 * shape.linear_params / host.elementwise_bytes
    assert whole["train"] - split["train"] == pytest.approx(64 * quantizer * 3 / 4)
    assert split["collective"] != whole["collective"]
    link = PRESETS["a100-80g"].network_bytes
    # float32 sums (batch 2): 4 bytes out, 4 back per weight, against a ring all-reduce of
    # 4 bytes per parameter (2 (N - 1) / N of them)
    assert gpu["collective"] == pytest.approx(64 * shape.linear_params * 8 / link)
    assert gpu_whole["collective"] == pytest.approx(64 * shape.params * 4 * 1.5 / link)


def test_the_compiled_quantizer_is_charged_its_fused_passes(tmp_path):
    """compile_quantizer: each step's quantizer moves QUANTIZER_PASSES_FUSED words per weight
    instead of QUANTIZER_PASSES; the windows' passes cost the same."""
    from pipeline.planning.cost_model import (
        QUANTIZER_PASSES,
        QUANTIZER_PASSES_FUSED,
        training_seconds,
    )

    shape, _blocks, _ = model_shape(json.loads(
        (llama70b_folder(tmp_path) / "config.json").read_text()))
    device = PRESETS["a100-80g"]

    def learned(fused):
        return build_config(QuantizationConfig, {
            "method": "omniquant", "bits": 4, "omniquant": {
                "epochs": 2, "batch_size": 2, "rounding": "learned",
                "compile_quantizer": fused}}, "quantization")

    work = Workload(128, 512, 1, Schedule.SEQUENTIAL)
    eager = training_seconds(shape, learned(False), work, device, 128)
    fused = training_seconds(shape, learned(True), work, device, 128)
    saved = 128 * (QUANTIZER_PASSES - QUANTIZER_PASSES_FUSED) * 4 * shape.linear_params
    assert eager["train"] - fused["train"] == pytest.approx(saved / device.elementwise_bytes)
    assert eager["probe"] == fused["probe"]


def test_the_mse_observer_is_charged_per_weight(tmp_path):
    """quantization.observer: mse adds its search over every quantized weight (the measured
    rate where there is one, else the elementwise rate), streamed or data-free; min-max adds
    nothing."""
    import dataclasses

    from pipeline.planning.cost_model import SEARCH_BYTES, block_seconds

    shape, _blocks, shared = model_shape(json.loads(
        (llama70b_folder(tmp_path) / "config.json").read_text()))
    device = PRESETS["a100-80g"]
    measured = dataclasses.replace(device, search_params=2e6)
    for method, windows in (("gptq", 128), ("rtn", 0)):
        def q(observer, method=method):
            return build_config(QuantizationConfig, {"method": method, "bits": 3,
                                                     "group_size": 64, "observer": observer},
                                "quantization")

        work = Workload(windows, 512, 1, Schedule.SEQUENTIAL)
        plain = block_seconds(shape, q("minmax"), work, device, shared)
        searched = block_seconds(shape, q("mse"), work, device, shared)
        assert "observer" not in plain
        assert searched["observer"] == pytest.approx(
            shape.linear_params * SEARCH_BYTES / device.elementwise_bytes)
        assert {k: v for k, v in searched.items() if k != "observer"} == plain
        assert block_seconds(shape, q("mse"), work, measured, shared)["observer"] == \
            pytest.approx(shape.linear_params / 2e6)
    # data-parallel GPTQ: each linear is solved (and searched) by one of the workers
    dp = block_seconds(shape, q("mse", "gptq"), Workload(128, 512, 4, Schedule.DATA_PARALLEL),
                       measured, shared)
    assert dp["observer"] == pytest.approx(shape.linear_params / 2e6 / 4)


def test_gptq_factorizations_are_charged_once_per_hessian_and_grow_to_the_matmul_rate(tmp_path):
    """One factorization per distinct Hessian (q/k/v and gate/up share theirs). A rate measured
    at one size gives that size its measured time and tends to the matmul rate at large sizes
    (the blocked factorization is mostly matrix products); presets' rates hold at any size."""
    import dataclasses

    from pipeline.methods.gptq import factor_flops
    from pipeline.planning.cost_model import factor_seconds, sweep_seconds

    shape, _blocks, shared = model_shape(json.loads(
        (llama70b_folder(tmp_path) / "config.json").read_text()))
    preset = PRESETS["a100-80g"]
    assert factor_seconds(28672, preset) == pytest.approx(
        factor_flops(28672) / preset.cholesky32_flops)
    unshared = sweep_seconds(shape, preset)
    shared_once = sweep_seconds(shape, preset, shared)
    # q/k/v (8192) and gate/up (8192) each factorized once instead of three and two times
    assert unshared - shared_once == pytest.approx(3 * factor_seconds(8192, preset))
    host = dataclasses.replace(preset, gptq_float64=False, forward_flops=80e9,
                               cholesky32_flops=50e9, cholesky32_n=4096)
    assert factor_seconds(4096, host) == pytest.approx(factor_flops(4096) / 50e9)
    big = factor_seconds(28672, host)
    assert factor_flops(28672) / 80e9 < big < factor_flops(28672) / 50e9
    assert big == pytest.approx(factor_flops(28672) / 80e9, rel=0.1)


def test_the_stages_start_inside_the_quantize_phase(tmp_path):
    import dataclasses

    from pipeline.planning.cost_model import STARTUP_SECONDS
    from pipeline.planning.run_estimate import plan_run

    config = json.loads((llama70b_folder(tmp_path) / "config.json").read_text())
    q = build_config(QuantizationConfig, {"method": "rtn", "bits": 4, "group_size": 128},
                     "quantization")
    device = PRESETS["a100-80g"]
    runs = [plan_run(config, q, 0, 512, 1, Schedule.SEQUENTIAL, None,
                     dataclasses.replace(device, stage_start_seconds=start))
            for start in (0.0, 7.0)]
    assert runs[1]["predicted_quantize_phase_seconds"] == pytest.approx(
        runs[0]["predicted_quantize_phase_seconds"] + 7.0)
    assert runs[1]["predicted_seconds"] - runs[1]["predicted_quantize_phase_seconds"] == \
        pytest.approx(STARTUP_SECONDS)


def test_cross_layer_is_charged_frozen_blocks_per_depth(tmp_path):
    """cross-layer learning: each window also goes forward and back through `depth` frozen
    blocks (a backward of the input's gradient only, so less than the block's own training
    per window) plus their FP targets once; depth 2 costs twice depth 1, and the block's own
    training is unchanged."""
    from pipeline.planning.cost_model import forward_flops, training_seconds

    shape, _blocks, _ = model_shape(json.loads(
        (llama70b_folder(tmp_path) / "config.json").read_text()))
    device = PRESETS["a100-80g"]

    def learned(depth):
        cl = {} if depth == 0 else {"cross_layer": {"weight": 1.0, "depth": depth}}
        return build_config(QuantizationConfig, {
            "method": "omniquant", "bits": 4, "omniquant": {
                "epochs": 2, "batch_size": 2, "rounding": "learned", **cl}}, "quantization")

    work = Workload(128, 512, 1, Schedule.SEQUENTIAL)
    plain, one, two = (training_seconds(shape, learned(d), work, device, 128) for d in (0, 1, 2))
    assert "cross_layer" not in plain
    assert one["train"] == plain["train"] == two["train"]
    assert two["cross_layer"] == pytest.approx(2 * one["cross_layer"])
    windows = 2 * 128 * 3 * forward_flops(shape, 512, 512) / device.train_flops
    assert 0.5 * windows < one["cross_layer"] < windows


def test_keep_best_checks_are_charged_per_check(tmp_path):
    """keep_best_every N: a float32 forward of the probe's 16 windows every N steps and after
    the last (through the next blocks too under cross-layer learning, and then at the start
    too); none for per-step keep_best."""
    from pipeline.planning.cost_model import forward_flops, training_seconds

    shape, _blocks, _ = model_shape(json.loads(
        (llama70b_folder(tmp_path) / "config.json").read_text()))
    device = PRESETS["a100-80g"]

    def learned(every, depth=0):
        cl = {"cross_layer": {"weight": 1.0, "depth": depth}} if depth else {}
        return build_config(QuantizationConfig, {
            "method": "omniquant", "bits": 4, "omniquant": {
                "epochs": 2, "batch_size": 2, "rounding": "learned", "keep_best": True,
                "keep_best_every": every, **cl}}, "quantization")

    work = Workload(128, 512, 1, Schedule.SEQUENTIAL)
    per_step, every8, every64, cl8 = (training_seconds(shape, learned(e, d), work, device, 128)
                                      for e, d in ((0, 0), (8, 0), (64, 0), (8, 1)))
    assert "keep_best_checks" not in per_step
    assert every8["train"] == per_step["train"]
    one = 16 * forward_flops(shape, 512, 512) / device.forward_flops
    assert every8["keep_best_checks"] == pytest.approx(16 * one)  # 128 steps / 8
    assert every64["keep_best_checks"] == pytest.approx(2 * one)
    # through the next block too, and the start checked on its own
    assert cl8["keep_best_checks"] == pytest.approx(2 * 17 * one)
