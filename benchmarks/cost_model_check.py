"""The cost model against measured runs on this machine: for every P1 row recorded by
`benchmarks/p1_data_parallel.py` (learned W3 g64 and GPTQ W4, 1 worker x 1 thread, 2
data-parallel workers x 1 thread, 1 worker x 2 threads) and `benchmarks/p1_rtn.py` (data-free
RTN), the quantize phase predicted by `pipeline.cost_model` (rates measured now, per thread
count) next to the measured one.

    python benchmarks/cost_model_check.py

Writes benchmarks/results/cost_model_check.json (the ratio predicted / measured per row).
Run it on an otherwise idle machine: the rates are measured when it runs.
"""
from __future__ import annotations

import json
import os
import sys

import psutil

from jobs.recipes import load_recipe
from pipeline import storage
from pipeline.assets import resolve_model_path
from pipeline.config import Schedule
from pipeline.cost_model import measure_device, model_shape, plan_run

sys.path.insert(0, os.path.dirname(__file__))
from results_file import RESULTS, write_result


def main() -> dict:
    model = resolve_model_path("asset:smollm2-135m")
    config = storage.read_json(storage.join(model, "config.json"))
    shape, _blocks, _ = model_shape(config)
    devices = {t: measure_device(shape, 512, t, psutil.virtual_memory().total // 2)
               for t in (1, 2)}
    rows = []
    measured = {}
    path = os.path.join(RESULTS, "p1_data_parallel.json")
    if os.path.exists(path):
        with open(path) as f:
            measured = json.load(f)
    for part in ("learned", "gptq"):
        if part not in measured:
            continue
        recipe = measured[part]["recipe"]
        epochs = measured[part].get("epochs")
        for row in measured[part]["rows"]:
            changes = {"cluster.workers": row["workers"], "cluster.threads": row["threads"],
                       "cluster.schedule": row["schedule"]}
            if epochs is not None and part == "learned":
                changes["quantization.omniquant.epochs"] = epochs
            cfg = load_recipe(recipe, changes)
            rows.append(compare(config, cfg, devices[row["threads"]], f"{recipe} {row['setup']}",
                                row["quantize_wall_seconds"]))
    path = os.path.join(RESULTS, "p1_rtn.json")
    if os.path.exists(path):
        with open(path) as f:
            rtn = json.load(f)
        for row in rtn["rows"]:
            if row.get("data_free") and "quantize_seconds" in row:
                cfg = load_recipe("p1-rtn-w4", {"cluster.workers": row["workers"]})
                rows.append(compare(config, cfg, devices[1], f"p1-rtn {row['scheme']} "
                                    f"data-free, {row['workers']} workers",
                                    row["quantize_seconds"]))
    result = {"benchmark": "cost_model_check", "rows": rows,
              "devices": {t: d.to_dict() for t, d in devices.items()},
              "all_within_25_percent": all(abs(r["ratio"] - 1) <= 0.25 for r in rows)}
    write_result(os.path.join(RESULTS, "cost_model_check.json"), result)
    return result


def compare(model_config: dict, cfg, device, label: str, seconds: float) -> dict:
    schedule = cfg.cluster.resolved_schedule
    r = plan_run(model_config, cfg.quantization, cfg.calibration.num_samples,
                 cfg.calibration.seq_len, cfg.cluster.workers, schedule,
                 cfg.cluster.activation_memory_bytes, device)
    return {"run": label, "schedule": schedule.value if isinstance(schedule, Schedule) else
            schedule, "predicted_seconds": r["predicted_seconds"], "measured_seconds": seconds,
            "ratio": r["predicted_seconds"] / seconds, "block_seconds": r["block_seconds"]}


if __name__ == "__main__":
    main()
