"""Protocol P1: does a second worker buy speed? Each part runs its configurations one after
the other in this one invocation, every worker on one thread:

- `learned`: the best W3 g64 recipe (`p1-signround-w3g64`) quantized with 1 worker x 1
  thread, 2 data-parallel workers x 1 thread, and 1 worker x 2 threads (process parallelism
  against intra-op threading); then each output's perplexity on all 292 test windows.
- `gptq`: the same three for `p1-gptq-w4`.
- `eval`: the FP model's 292-window perplexity on 1 stage x 1 thread and pipelined over 2
  sequential stages x 1 thread; with `--eval-extra` also 2 data-parallel workers x 1 thread
  and a plain transformers forward over the same windows in this process on 1 thread
  (`--eval-setups 1x1 plain` picks rows; `1xauto` and `2xauto` are 1 and 2 sequential
  stages with automatic threads, `2x1-dp` what a P1 recipe's own evaluation does, and
  `plain-all` the plain forward on every core).

    python benchmarks/p1_data_parallel.py [--parts learned gptq eval] [--epochs N]
        [--setups 1x1 2x1 1x2] [--set KEY=VALUE ...] [--tag NAME]

`--epochs` shortens the learned recipe (the time per block is linear in the epochs; the
result records the value used). Needs `relayquant assets prepare`. Writes
benchmarks/results/p1_data_parallel.json (rows merged part by part as they finish).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

import yaml

from cluster.coordinator import evaluate, quantize
from jobs.recipes import load_recipe

sys.path.insert(0, os.path.dirname(__file__))
from results_file import RESULTS, write_result

log = logging.getLogger("p1_data_parallel")
RECIPES = {"learned": "p1-signround-w3g64", "gptq": "p1-gptq-w4"}
# the GPTQ rows time min-max GPTQ, as every recorded row did and as llm-compressor runs it by
# default (the recipe's mse observer since 2026-12-02 adds its search); --set overrides
PINNED = {"gptq": {"quantization.observer": "minmax"}}
# (label, workers, threads, schedule)
SETUPS = {"1x1": ("1 worker x 1 thread", 1, 1, "sequential"),
          "2x1": ("2 workers x 1 thread (data_parallel)", 2, 1, "data_parallel"),
          "1x2": ("1 worker x 2 threads", 1, 2, "sequential")}
EVAL_SETUPS = {"1x1": ("1 stage x 1 thread", 1, 1, "sequential"),
               "2x1": ("2 stages x 1 thread (sequential, pipelined)", 2, 1, "sequential"),
               "2x1-dp": ("2 workers x 1 thread (data_parallel)", 2, 1, "data_parallel"),
               # automatic threads: 1 stage takes every core; 2 sequential stages too, but
               # each its share while both compute (a pipelined pass); the P1 recipes' own
               # evaluation (2 workers, schedule unset) is 2x1-dp
               "1xauto": ("1 stage x auto threads", 1, None, "sequential"),
               "2xauto": ("2 stages x auto threads (sequential, pipelined)", 2, None,
                          "sequential"),
               "plain": None,  # plain transformers in this process, 1 thread
               "plain-all": None}  # the same on every core torch sees
EVAL_DEFAULT, EVAL_EXTRA = ["1x1", "2x1"], ["2x1-dp", "plain"]


def cluster(workers: int, threads: int | None, schedule: str) -> dict:
    return {"cluster.workers": workers, "cluster.threads": threads,
            "cluster.schedule": schedule}


def quantize_part(part: str, work: str, epochs: int | None, evaluate_outputs: bool = True,
                  setups: list[str] | None = None, changes_in: dict | None = None) -> dict:
    rows = []
    changes_in = {**PINNED.get(part, {}), **(changes_in or {})}
    for key in setups or list(SETUPS):
        label, workers, threads, schedule = SETUPS[key]
        out = os.path.join(work, f"{part}-{workers}w{threads}t")
        changes = {**(changes_in or {}), "output": out, "eval.enabled": False,
                   **cluster(workers, threads, schedule)}
        if epochs is not None and part == "learned":
            changes["quantization.omniquant.epochs"] = epochs
        config = load_recipe(RECIPES[part], changes)
        start = time.perf_counter()
        report = quantize(config)
        seconds = time.perf_counter() - start
        rows.append({"setup": label, "key": key, "workers": workers, "threads": threads,
                     "schedule": schedule, "output": out, "quantize_wall_seconds": seconds,
                     "block_seconds": sum(b["seconds"] for b in report["blocks"]),
                     "workers_per_block": [b.get("workers") for b in report["blocks"]],
                     "sha256": [b["sha256"][""] for b in report["blocks"]]})
        log.info("%s %s: %.1fs", part, label, seconds)
    config = load_recipe(RECIPES[part], cluster(2, 1, "data_parallel"))
    for row in rows:
        if not evaluate_outputs:
            row["perplexity"] = None
            continue
        if row is not rows[0] and row["sha256"] == rows[0]["sha256"]:
            # byte-identical shards: the same model, the same perplexity
            row["perplexity"], row["eval_windows"] = rows[0]["perplexity"], rows[0][
                "eval_windows"]
            row["perplexity_from"] = "identical shards to the 1-worker output"
            continue
        ppl = evaluate(row["output"], config.eval, config.cluster)
        row["perplexity"], row["eval_windows"] = ppl["perplexity"], ppl["windows"]
    by_key = {row["key"]: row for row in rows}
    base = rows[0]
    for row in rows:
        row[f"time_vs_{base['key']}"] = row["quantize_wall_seconds"] / \
            base["quantize_wall_seconds"]
        if row["perplexity"] is not None and base["perplexity"] is not None:
            row[f"perplexity_vs_{base['key']}"] = row["perplexity"] / base["perplexity"] - 1
    out = {"recipe": RECIPES[part], "epochs": epochs, "changes": changes_in or {},
           "rows": rows}
    if "2x1" in by_key and "1x2" in by_key:
        out["dp_vs_1_worker_2_threads"] = (by_key["2x1"]["quantize_wall_seconds"] /
                                           by_key["1x2"]["quantize_wall_seconds"])
    if len(rows) > 1:
        out["shards_identical"] = all(r["sha256"] == base["sha256"] for r in rows)
    return out


def eval_part(setups: list[str]) -> dict:
    rows = []
    base = load_recipe("p1-rtn-w4")
    model = base.model.path
    for key in setups:
        if EVAL_SETUPS[key] is None:
            rows.append(plain_transformers_row(model, base.eval,
                                               None if key == "plain-all" else 1))
            continue
        label, workers, threads, schedule = EVAL_SETUPS[key]
        config = load_recipe("p1-rtn-w4", cluster(workers, threads, schedule))
        start = time.perf_counter()
        ppl = evaluate(model, config.eval, config.cluster)
        rows.append({"setup": label, "workers": workers, "threads": threads,
                     "schedule": schedule, "perplexity": ppl["perplexity"],
                     "windows": ppl["windows"], "seconds": time.perf_counter() - start})
        log.info("eval %s: %.1fs", label, rows[-1]["seconds"])
    one_stage = next((r for r in rows if r["setup"] == EVAL_SETUPS["1x1"][0]), None)
    plain = next((r for r in rows if r["setup"].startswith("plain") and r["threads"] == max(
        x["threads"] or 0 for x in rows if x["setup"].startswith("plain"))), None)
    for row in rows:
        if one_stage is not None:
            row["time_vs_1_stage"] = row["seconds"] / one_stage["seconds"]
        if plain is not None:  # against the plain forward on the most threads
            row["time_vs_plain"] = row["seconds"] / plain["seconds"]
    return {"model": "smollm2-135m (FP)", "rows": rows}


def plain_transformers_row(model: str, eval_config, threads: int | None = 1) -> dict:
    """The same windows through a plain transformers forward in this one process, on `threads`
    (None: torch's default, every core it sees), chunks of 8 windows (the reference a
    streamed evaluation should match)."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.assets import resolve_model_path
    from pipeline.calibration import eval_windows_for

    folder = resolve_model_path(model)
    windows = eval_windows_for(folder, eval_config)
    before = torch.get_num_threads()
    threads = threads or before
    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        net = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        nll, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, windows.shape[0], 8):
                ids = windows[i:i + 8]
                logits = net(input_ids=ids).logits.float()
                nll += torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                    reduction="sum").item()
                count += ids[:, 1:].numel()
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(before)
    log.info("eval plain transformers (%d threads): %.1fs", threads, seconds)
    return {"setup": f"plain transformers forward, 1 process x {threads} thread"
                     + ("s" if threads > 1 else ""), "workers": 1,
            "threads": threads, "schedule": None, "perplexity": math.exp(nll / count),
            "windows": int(windows.shape[0]), "seconds": seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["learned", "gptq", "eval"],
                        choices=["learned", "gptq", "eval"])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=None,
                        help="which of the quantize setups to run (default: all three)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe change for the quantize parts (YAML value)")
    parser.add_argument("--tag", default=None,
                        help="store the parts under PART:TAG (keeps earlier results of PART)")
    parser.add_argument("--no-eval", action="store_true",
                        help="skip the perplexity of the quantized outputs (compare shards)")
    parser.add_argument("--eval-extra", action="store_true",
                        help="also the data-parallel and plain transformers evaluation rows")
    parser.add_argument("--eval-setups", nargs="+", choices=list(EVAL_SETUPS), default=None,
                        help="which evaluation rows to run (overrides --eval-extra)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "p1_data_parallel.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="relayquant: %(message)s")
    result = {"benchmark": "p1_data_parallel"}
    if os.path.exists(args.out):
        with open(args.out) as f:
            result = json.load(f)
    result["machine"] = {"cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="relayquant-dp-") as work:
        for part in args.parts:
            changes = {k: yaml.safe_load(v) for k, _, v in
                       (item.partition("=") for item in args.set)}
            key = f"{part}:{args.tag}" if args.tag else part
            eval_setups = args.eval_setups or EVAL_DEFAULT + (EVAL_EXTRA if args.eval_extra
                                                               else [])
            result[key] = (eval_part(eval_setups) if part == "eval"
                           else quantize_part(part, work, args.epochs, not args.no_eval,
                                              args.setups, changes))
            result[key]["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
