"""`relayquant plan` on a CVXQ budget: the allocation's passes predicted apart from the quantize
phase, and the sensitivity pass's memory per stage checked."""
import json

import pytest
from test_cost_model import cluster_file, llama70b_folder, recipe

from jobs.cli import main
from pipeline.config import ConfigError, QuantizationConfig, Schedule
from pipeline.config.tree import build_config
from pipeline.planning.clusters import PRESETS
from pipeline.planning.run_estimate import model_shape

pytestmark = pytest.mark.unit


def test_cvxq_passes_are_predicted_before_the_blocks(tmp_path, capsys):
    """A budget adds the sensitivity pass (forward pipelined, backward stage after stage: 1/W +
    4 forwards of the calibration) and, with measured distortion, the RTN errors at every option
    (the mse search at its rate): none of it in the quantize phase, all of it in the run."""
    import dataclasses

    from pipeline.config import BudgetConfig, Distortion, Observer
    from pipeline.planning.allocation_cost import allocation_seconds
    from pipeline.planning.cost_model import SEARCH_BYTES, forward_flops
    from pipeline.planning.run_estimate import plan_run

    folder = llama70b_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    shape, blocks, _ = model_shape(config)
    device = PRESETS["h100-80g"]
    plain = build_config(QuantizationConfig, {"method": "gptq", "bits": 3, "group_size": 64},
                         "quantization")
    assert allocation_seconds(shape, blocks, plain, 128, 2048, 8, device) == {}
    budget = BudgetConfig(average_bits=3.5, choices=[3, 4])
    q = dataclasses.replace(plain, budget=budget)
    one = blocks * forward_flops(shape, 128 * 2048, 2048) / device.forward_flops
    assert allocation_seconds(shape, blocks, q, 128, 2048, 8, device, 8, "bfloat16") == \
        pytest.approx({"sensitivity": one / 8 + 4 * one})
    measured = dataclasses.replace(q, budget=dataclasses.replace(
        budget, distortion=Distortion.MEASURED, group_sizes=[64, 128, None]))
    minmax = allocation_seconds(shape, blocks, measured, 128, 2048, 8, device)
    searched = allocation_seconds(shape, blocks, dataclasses.replace(
        measured, observer=Observer.MSE), 128, 2048, 8, device)
    assert minmax["measured_errors"] == pytest.approx(
        blocks * shape.linear_params * 6 / device.rtn_params / 8)
    rate = device.search_params or device.elementwise_bytes / SEARCH_BYTES
    assert searched["measured_errors"] == pytest.approx(
        blocks * shape.linear_params * 6 / rate / 8)
    reused = dataclasses.replace(measured, budget=dataclasses.replace(
        measured.budget, sensitivity_from="earlier/report.json"))
    assert set(allocation_seconds(shape, blocks, reused, 128, 2048, 8, device)) == \
        {"measured_errors"}
    with_budget = plan_run(config, measured, 128, 2048, 8, Schedule.DATA_PARALLEL, None, device)
    without = plan_run(config, plain, 128, 2048, 8, Schedule.DATA_PARALLEL, None, device)
    assert with_budget["predicted_quantize_phase_seconds"] == \
        pytest.approx(without["predicted_quantize_phase_seconds"])
    assert with_budget["predicted_seconds"] - without["predicted_seconds"] == \
        pytest.approx(sum(minmax.values()))
    rc = main(["plan", "--config", recipe(tmp_path, folder, "gptq", 64,
                                          budget={"average_bits": 3.5, "choices": [3, 4]}),
               "--cluster", cluster_file(tmp_path, "h100-80g", 1, 8)])
    assert rc == 0 and "predicted CVXQ allocation:" in capsys.readouterr().err


def test_cvxq_sensitivity_pass_memory_is_checked_per_stage(tmp_path):
    """Each stage of the sensitivity pass keeps as many of its blocks loaded as fit a quarter
    of its memory and reads the others again per chunk (charged in time): Llama-2-70B with a
    budget fits one 80 GB GPU with re-reads and 8 without; a chunk too large for one stage is
    refused naming the pass and its ways out; the statistics of an earlier run need none."""
    from pipeline.config.tree import build_config as build
    from pipeline.planning.allocation_cost import allocation_seconds
    from pipeline.planning.fit import check_memory

    config = json.loads((llama70b_folder(tmp_path) / "config.json").read_text())
    shape, blocks, _ = model_shape(config)
    device = PRESETS["h100-80g"]

    def q(**budget):
        return build(QuantizationConfig, {"method": "gptq", "bits": 3, "group_size": 64,
                                          "budget": {"average_bits": 3.5, "choices": [3, 4],
                                                     **budget}}, "quantization")

    def memory(workers, quantization, chunk_size=4):
        return check_memory(config, quantization, 128, 2048, workers, Schedule.DATA_PARALLEL,
                            None, device.memory_bytes, chunk_size=chunk_size,
                            compute_dtype="bfloat16")

    one, eight = memory(1, q()), memory(8, q())
    block = shape.params * 2
    assert one["fits"] and eight["fits"]
    assert one["memory_sensitivity_pass"]["block_weights"] == \
        (device.memory_bytes // 4) // block * block  # the quarter's worth, not all 80 blocks
    assert eight["memory_sensitivity_pass"]["block_weights"] == 10 * block  # all ten
    times = [allocation_seconds(shape, blocks, q(), 128, 2048, w, device, 4, "bfloat16")
             for w in (1, 8)]
    kept = (device.memory_bytes // 4) // block
    assert times[0]["sensitivity_reads"] == pytest.approx(
        32 * 2 * (80 - kept) * shape.params * shape.stored_bytes_per_param / device.disk_bytes)
    assert "sensitivity_reads" not in times[1]
    with pytest.raises(ConfigError, match=r"CVXQ's sensitivity pass would need .* on 1 "
                                          r"stage\(s\) of 80 blocks.*chunk_size.*sensitivity_from"):
        memory(1, q(), chunk_size=128)
    reused = memory(1, q(sensitivity_from="earlier/report.json"), chunk_size=128)
    assert reused["memory_sensitivity_pass"] == {}
