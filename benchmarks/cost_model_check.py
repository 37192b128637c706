"""The cost model against measured runs on this machine: the quantize phase that
`pipeline.planning.cost_model` predicts (device rates measured now by its own micro-benchmark, per
thread count) next to the measured one, for

- P1 data-free RTN W4, 1 and 2 workers: run here, now (about a minute each, no evaluation);
- P1 learned (p1-signround-w3g64, 1 epoch) and GPTQ W4, 1 worker x 1 thread, 2 data-parallel
  workers x 1 thread, 1 worker x 2 threads: `benchmarks/p1_data_parallel.py`'s newest rows of
  each part (its `--tag`ged entries included);
- the larger-than-RAM runs at Llama-70B width (RTN W4 g128 at full and half depth, GPTQ over
  its first blocks): `benchmarks/larger_than_ram.py`'s rows, where present.

    python benchmarks/cost_model_check.py [--no-rtn-runs]

Writes benchmarks/results/cost_model_check.json (predicted / measured per row; the target is
every ratio within 0.75-1.25; the 70B-width rows also compare the worker's predicted memory with
the stage's measured peak). Run it on an otherwise idle machine: the rates are measured when
it runs.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from typing import Any

import psutil

from jobs.recipes import load_recipe
from pipeline import storage
from pipeline.assets import resolve_model_path
from pipeline.config import RunConfig, Schedule
from pipeline.planning.cost_model import Device
from pipeline.planning.device_rates import measure_device
from pipeline.planning.run_estimate import model_shape, plan_run

sys.path.insert(0, os.path.dirname(__file__))
from results_file import RESULTS, write_result


def _load(name: str) -> dict[str, Any] | None:
    path = os.path.join(RESULTS, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def compare(model_config: dict[str, Any], cfg: RunConfig, device: Device, label: str,
            seconds: float, whole_run: bool = False) -> dict[str, Any]:
    schedule = cfg.cluster.resolved_schedule
    r = plan_run(model_config, cfg.quantization, cfg.calibration.num_samples,
                 cfg.calibration.seq_len, cfg.cluster.workers, schedule,
                 cfg.cluster.activation_memory_bytes, device)
    return row(label, schedule.value if isinstance(schedule, Schedule) else schedule, r, seconds,
               whole_run)


def row(label: str, schedule: str, plan: dict[str, Any], seconds: float,
        whole_run: bool = False) -> dict[str, Any]:
    """The quantize phase as predicted (without the run's start, unless the measurement is
    of the whole `quantize` call) against the measured one."""
    predicted = plan["predicted_seconds" if whole_run else "predicted_quantize_phase_seconds"]
    return {"run": label, "schedule": schedule, "predicted_seconds": predicted,
            "measured_seconds": seconds, "ratio": predicted / seconds,
            "block_seconds": plan["block_seconds"]}


def p1_rows(config: dict[str, Any], devices: dict[int, Device], rtn_runs: bool
            ) -> list[dict[str, Any]]:
    rows = []
    if rtn_runs:
        from cluster.coordinator import quantize

        warmed = False
        for workers in (1, 1, 2):  # the first, unrecorded, reads the model into the cache
            with tempfile.TemporaryDirectory(prefix="relayquant-cmc-") as out:
                cfg = load_recipe("p1-rtn-w4", {"cluster.workers": workers, "output": out,
                                                "eval.enabled": False})
                report = quantize(cfg)
            if workers == 1 and not warmed:
                warmed = True
                continue
            threads = 2 if workers == 1 else 1  # a lone stage gets both cores
            rows.append(compare(config, cfg, devices[threads], f"p1-rtn-w4 data-free, "
                                f"{workers} worker(s) x {threads} thread(s) (run now)",
                                report["phase_seconds"]["quantize"]))
    measured = _load("p1_data_parallel.json") or {}
    for part in ("learned", "gptq"):
        for key, row in newest_rows(measured, part):
            recipe, epochs = measured[key]["recipe"], measured[key].get("epochs")
            changes = {**measured[key].get("changes", {}), "cluster.workers": row["workers"],
                       "cluster.threads": row["threads"], "cluster.schedule": row["schedule"]}
            if epochs is not None and part == "learned":
                changes["quantization.omniquant.epochs"] = epochs
            if part == "gptq":  # recorded before the recipe's observer became mse: min-max
                changes.setdefault("quantization.observer", "minmax")
            cfg = load_recipe(recipe, changes)
            # measured around the whole quantize() call (start included; no evaluation)
            rows.append(compare(config, cfg, devices[row["threads"]],
                                f"{recipe} {row['setup']} ({key})", row["quantize_wall_seconds"],
                                whole_run=True))
    return rows


def newest_rows(measured: dict[str, Any], part: str) -> list[tuple[str, dict[str, Any]]]:
    """Per setup (workers, threads, schedule), the most recent row of `part` in
    p1_data_parallel.json (entries PART or PART:TAG, by their measured_at; one without counts
    as the oldest), with the key it came from."""
    keys = sorted((k for k in measured if k == part or k.startswith(f"{part}:")),
                  key=lambda k: (measured[k].get("measured_at") or "", k))
    rows: dict[tuple[Any, ...], tuple[str, dict[str, Any]]] = {}
    for key in keys:  # oldest first: a newer row replaces an older one of the same setup
        for r in measured[key]["rows"]:
            rows[(r["workers"], r["threads"], r["schedule"])] = (key, r)
    return list(rows.values())


def larger_than_ram_rows(work: str) -> tuple[list[dict[str, Any]], dict[int, Device]]:
    """The 70B-width runs, predicted as `relayquant plan` predicts them: rates measured on a
    stand-in of that model's block (its shapes; the Cholesky rate at 4096 columns), the disk
    rate the run recorded just before it started, else one measured now on the model's own
    shards when they are still in `work` (`--work` of larger_than_ram.py), else on a
    temporary file."""
    import dataclasses

    from larger_than_ram import synthetic_config

    from jobs.plan import local_shards

    result = _load("larger_than_ram.json")
    if not result:
        return [], {}
    shards = local_shards(os.path.join(work, f"llama70b-width-{result['blocks']}"))
    shape, _blocks, _ = model_shape(synthetic_config(result["blocks"]))
    devices = {t: measure_device(shape, 128, t, psutil.virtual_memory().total // 2,
                                 disk_files=shards) for t in (1, 2)}
    rows = []
    for label, run in result["runs"].items():
        seconds = (run.get("phase_seconds") or {}).get("quantize")
        if not seconds:
            continue
        config = synthetic_config(run["blocks"])
        windows = 0 if run["method"] == "rtn" else 4
        workers = run.get("workers", 2)
        cfg_q = load_recipe("p1-rtn-w4", {"quantization.method": run["method"],
                                          "quantization.group_size": 128}).quantization
        schedule = Schedule.DATA_PARALLEL if workers > 1 else Schedule.SEQUENTIAL
        threads = 1 if workers > 1 else 2
        # the disk rate probed just before the run where it recorded one (that disk), else now
        device = devices[threads]
        if run.get("disk_read_bytes_per_second"):
            device = dataclasses.replace(device, disk_bytes=run["disk_read_bytes_per_second"])
        r = plan_run(config, cfg_q, windows, 128, workers, schedule, None, device)
        rows.append(row(f"70B width {label} ({run['blocks']} blocks, {workers} worker(s) x "
                        f"{threads} thread(s))", schedule.value, r, seconds))
        # memory too: the worker's predicted peak against the stage's own (ru_maxrss, as its
        # block markers report it)
        measured = run.get("stage_reported_peak_rss_bytes")
        if measured:
            rows[-1].update({"predicted_memory_per_worker_bytes": r["memory_per_worker_bytes"],
                             "measured_stage_peak_rss_bytes": measured,
                             "memory_ratio": r["memory_per_worker_bytes"] / measured})
    return rows, devices


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-rtn-runs", action="store_true",
                        help="skip the two P1 RTN runs (use only recorded rows)")
    parser.add_argument("--ltr-work", default="/tmp/ltr",
                        help="larger_than_ram.py's --work, for its model's disk rate")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    model = resolve_model_path("asset:smollm2-135m")
    config = storage.read_json(storage.join(model, "config.json"))
    shape, _blocks, _ = model_shape(config)
    from jobs.plan import local_shards

    devices = {t: measure_device(shape, 512, t, psutil.virtual_memory().total // 2,
                                 disk_files=local_shards(model)) for t in (1, 2)}
    wide_rows, wide_devices = larger_than_ram_rows(args.ltr_work)
    rows = p1_rows(config, devices, not args.no_rtn_runs) + wide_rows
    result = {"benchmark": "cost_model_check", "rows": rows,
              "disk_bytes_per_s": {"p1 (page cache)": devices[1].disk_bytes},
              "devices": {t: d.to_dict() for t, d in devices.items()},
              "devices_70b_width": {t: d.to_dict() for t, d in wide_devices.items()},
              "within_25_percent": [abs(r["ratio"] - 1) <= 0.25 for r in rows],
              "all_within_25_percent": all(abs(r["ratio"] - 1) <= 0.25 for r in rows),
              "memory_all_within_25_percent": all(abs(r["memory_ratio"] - 1) <= 0.25
                                                  for r in rows if "memory_ratio" in r)}
    write_result(os.path.join(RESULTS, "cost_model_check.json"), result)
    for r in rows:
        print(f"{r['run']:70s} predicted {r['predicted_seconds']:8.1f} s  measured "
              f"{r['measured_seconds']:8.1f} s  ratio {r['ratio']:.2f}"
              + (f"  memory {r['predicted_memory_per_worker_bytes'] / 2**30:.1f} / "
                 f"{r['measured_stage_peak_rss_bytes'] / 2**30:.1f} GiB ({r['memory_ratio']:.2f})"
                 if "memory_ratio" in r else ""))
    return result


if __name__ == "__main__":
    main()
