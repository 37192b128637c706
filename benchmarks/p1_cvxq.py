"""Protocol P1 with CVXQ bit allocation against uniform schemes at exactly the same total bits
(weights + scales + zero points): uniform W3 g64 asymmetric vs CVXQ at 3.546875 bits per weight
(3 + 32/64 for the fp32 scales + 3/64 for the zero points), and a uniform 2/3-bit mix (even
blocks 2-bit, odd blocks 3-bit) vs CVXQ at 3.0390625 (2.5 bits on average), each with RTN and
with the reconstructor (OmniQuant LWC + GPTQ rounding, the P1 CPU settings). The `*-groups-*`
rows let each unit also choose its group size (widths {3, 4}, measured distortion), RTN and the
best reconstructor (LWC + LET + learned rounding, sign gradients).

    python benchmarks/p1_cvxq.py [--rows cvxq-rtn-3bit uniform-rtn-3bit ...] [--workers 1]

Rows merge into benchmarks/results/p1_cvxq.json as they finish; the report's allocation
(achieved bits, log lambda, widths) and the sensitivity pass's time relative to one calibration
forward pass are kept per CVXQ row. Needs `relayquant assets prepare`.
"""
from __future__ import annotations

import argparse
import json
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

RECONSTRUCTOR = {"quantization.method": "omniquant", "quantization.omniquant.let": False,
                 "quantization.omniquant.rounding": "gptq",
                 "quantization.omniquant.epochs": 1, "quantization.omniquant.lwc_lr": 0.05,
                 "quantization.omniquant.lwc_init": 8.0, "quantization.gptq.act_order": True}
# the best P1 reconstructor (benchmarks/p1_reconstruct.py variant omniquant_signround_let)
SIGNROUND_LET = {"quantization.method": "omniquant", "quantization.omniquant.let": True,
                 "quantization.omniquant.let_lr": 5e-3,
                 "quantization.omniquant.rounding": "learned",
                 "quantization.omniquant.optimizer": "signsgd",
                 "quantization.omniquant.batch_size": 2, "quantization.omniquant.epochs": 3,
                 "quantization.omniquant.keep_best": True, "quantization.omniquant.lwc_lr": 0.05,
                 "quantization.omniquant.lwc_init": 8.0}
EVEN_BLOCKS_2BIT = {r"re:model\.layers\.\d*[02468]\..*": {"bits": 2}}
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "uniform-rtn-3bit": ("p1-rtn-w4", {"quantization.bits": 3, "quantization.group_size": 64}),
    "cvxq-rtn-3bit": ("p1-cvxq-widths-rtn-3bit", {}),
    "uniform-reconstructor-3bit": ("p1-rtn-w4", {"quantization.bits": 3,
                                                 "quantization.group_size": 64,
                                                 **RECONSTRUCTOR}),
    "cvxq-reconstructor-3bit": ("p1-cvxq-widths-rtn-3bit", RECONSTRUCTOR),
    "uniform-mix-rtn-2.5bit": ("p1-rtn-w4", {"quantization.bits": 3,
                                             "quantization.group_size": 64,
                                             "quantization.overrides": EVEN_BLOCKS_2BIT}),
    "cvxq-rtn-2.5bit": ("p1-cvxq-widths-rtn-2.5bit", {}),
    "uniform-mix-reconstructor-2.5bit": ("p1-rtn-w4", {
        "quantization.bits": 3, "quantization.group_size": 64,
        "quantization.overrides": EVEN_BLOCKS_2BIT, **RECONSTRUCTOR}),
    "cvxq-reconstructor-2.5bit": ("p1-cvxq-widths-rtn-2.5bit", RECONSTRUCTOR),
    # widths {3, 4} x group sizes {32, 64, 96, 192, per-channel}, measured distortion
    "cvxq-groups-rtn-3bit": ("p1-cvxq-rtn-3bit", {}),
    "uniform-signround-let-3bit": ("p1-rtn-w4", {"quantization.bits": 3,
                                                 "quantization.group_size": 64,
                                                 **SIGNROUND_LET}),
    "cvxq-groups-signround-let-3bit": ("p1-cvxq-rtn-3bit", SIGNROUND_LET),
    "cvxq-groups-rtn-2.5bit": ("p1-cvxq-rtn-2.5bit", {}),
    "uniform-mix-signround-let-2.5bit": ("p1-rtn-w4", {
        "quantization.bits": 3, "quantization.group_size": 64,
        "quantization.overrides": EVEN_BLOCKS_2BIT, **SIGNROUND_LET}),
    "cvxq-groups-signround-let-2.5bit": ("p1-cvxq-rtn-2.5bit", SIGNROUND_LET),
}


def run_row(name: str, work: str, workers: int, fp: bool, sensitivity_from: str | None
            ) -> dict[str, Any]:
    recipe, changes = ROWS[name]
    if sensitivity_from and name.startswith("cvxq"):
        changes = {**changes, "quantization.budget.sensitivity_from": sensitivity_from}
    config = load_recipe(recipe, {**changes, "output": os.path.join(work, name),
                                  "cluster.workers": workers, "eval.fp": fp})
    start = time.perf_counter()
    report = quantize(config)
    blocks = report["blocks"]
    row: dict[str, Any] = {
        "row": name, "recipe": recipe, "changes": changes,
        "perplexity": report["perplexity"]["quantized"],
        "fp_perplexity": report["perplexity"]["fp"],
        "wall_seconds": time.perf_counter() - start,
        "quantize_seconds": sum(b["seconds"] for b in blocks),
        "stage_peak_rss_bytes": max(b["peak_rss_bytes"] for b in blocks),
    }
    if "allocation" in report:
        a = report["allocation"]
        row["allocation"] = {k: a[k] for k in ("target_bits", "achieved_bits", "weight_bits",
                                              "log_lambda", "sensitivity")}
        row["allocation"]["widths"] = [u["bits"] for u in a["units"]]
        if "group_sizes" in a:
            row["allocation"]["group_sizes"] = [u["group_size"] for u in a["units"]]
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--sensitivity-from", default=None,
                        help="CVXQ rows: reuse these sensitivity statistics (a report.json or "
                             "allocation.json, e.g. results/p1_cvxq_sensitivity_pca.json) "
                             "instead of running the sensitivity pass")
    parser.add_argument("--out", default=os.path.join(RESULTS, "p1_cvxq.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="relayquant: %(message)s")
    result: dict[str, Any] = {"benchmark": "p1_cvxq", "fp": None, "rows": []}
    if os.path.exists(args.out):
        with open(args.out) as f:
            result = json.load(f)
    earlier = os.path.join(RESULTS, "p1_reconstruct.json")
    if result["fp"] is None and os.path.exists(earlier):
        # The FP perplexity does not depend on the row: reuse the one p1_reconstruct measured
        # with the same evaluator (saves one 292-window eval).
        with open(earlier) as f:
            result["fp"] = json.load(f).get("fp")
        result["fp_source"] = "p1_reconstruct.json"
    with tempfile.TemporaryDirectory(prefix="relayquant-p1c-") as work:
        for name in args.rows:
            if any(r["row"] == name for r in result["rows"]) and not args.redo:
                continue
            row = run_row(name, work, args.workers, fp=result["fp"] is None,
                          sensitivity_from=args.sensitivity_from)
            if row["fp_perplexity"] is not None:
                result["fp"] = row["fp_perplexity"]
            result["rows"] = [r for r in result["rows"] if r["row"] != name] + [row]
            write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
