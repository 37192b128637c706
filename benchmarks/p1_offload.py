"""Activation offload on P1: the same run with every stream chunk in memory and with a budget of
a tenth of the streams (`cluster.activation_memory_bytes`), side by side.

GPTQ W4 (`p1-gptq-w4`) on 2 data-parallel workers, no evaluation. Reports the output's bytes
(identical or not), each worker's peak private memory (RssAnon: its own heap, without the
object store's shared pages) and bytes spilled to disk and read back, and the wall time.

    python benchmarks/p1_offload.py [--recipe p1-gptq-w4] [--workers 2]

Writes benchmarks/results/p1_offload.json. Needs `relayquant assets prepare`.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import tempfile
import time
from typing import Any

from cluster.coordinator import quantize
from jobs.recipes import load_recipe

sys.path.insert(0, os.path.dirname(__file__))
from results_file import RESULTS, write_result


def shard_digests(folder: str) -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with open(os.path.join(folder, name), "rb") as f:
                out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def run(recipe: str, workers: int, budget: int | None, out: str) -> dict[str, Any]:
    config = load_recipe(recipe, {"output": out, "eval.enabled": False,
                                  "cluster.workers": workers,
                                  "cluster.schedule": "data_parallel",
                                  "cluster.activation_memory_bytes": budget})
    start = time.perf_counter()
    report = quantize(config)
    blocks = report["blocks"]
    return {"activation_memory_bytes": budget, "wall_seconds": time.perf_counter() - start,
            "quantize_seconds": report["phase_seconds"]["quantize"],
            "stage_peak_private_bytes": max(b["peak_private_bytes"] for b in blocks),
            "stage_peak_rss_bytes": max(b["peak_rss_bytes"] for b in blocks),
            "workers": report.get("workers"), "digests": shard_digests(out)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="p1-gptq-w4")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(RESULTS, "p1_offload.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="relayquant: %(message)s")
    config = load_recipe(args.recipe)
    cal = config.calibration
    hidden = 576  # SmolLM2-135M
    streams = 2 * cal.num_samples * cal.seq_len * hidden * 4  # both streams, float32
    with tempfile.TemporaryDirectory(prefix="relayquant-offload-") as work:
        free = run(args.recipe, args.workers, None, os.path.join(work, "free"))
        tight = run(args.recipe, args.workers, streams // 10, os.path.join(work, "tight"))
    per_worker = streams / args.workers
    result = {
        "benchmark": "p1_offload", "recipe": args.recipe, "workers": args.workers,
        "streams_bytes": streams, "streams_bytes_per_worker": per_worker,
        "unconstrained": free, "budget_a_tenth": tight,
        "identical_output": free["digests"] == tight["digests"],
        "peak_private_reduction_bytes": free["stage_peak_private_bytes"]
        - tight["stage_peak_private_bytes"],
        "reduction_over_streams_per_worker": (free["stage_peak_private_bytes"]
                                              - tight["stage_peak_private_bytes"]) / per_worker,
    }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
