"""Protocol P1 with RTN: FP and quantized perplexity of SmolLM2-135M-Instruct on the SOTU test
split (all 292 windows of 512 tokens), against the reference evaluator's figures.

    python benchmarks/p1_rtn.py [--schemes w4_pc_asym w3_g64_asym ...] [--workers 2]
                                [--compare-streamed]

RTN is data-free (no calibration window read); `--compare-streamed` also runs each scheme
with `eval.block_errors: true` (the calibration streamed through every block, as before the
data-free path) and records both quantize phases and whether the shards are byte-identical.

Needs `relayquant assets prepare`. Writes benchmarks/results/p1_rtn.json.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

from cluster.coordinator import quantize
from jobs.recipes import load_recipe

# reference evaluator (../shared/protocol/p1.py) figures on this machine kind
REFERENCE = {"fp": 24.373, "w4_pc_asym": 42.016, "w3_g64_asym": 71.029,
             "w2_g64_asym": 416642.473, "w4_g64_sym": 37.370}
SCHEMES = {"w4_pc_asym": (4, None, False), "w3_g64_asym": (3, 64, False),
           "w2_g64_asym": (2, 64, False), "w4_g64_sym": (4, 64, True)}


sys.path.insert(0, os.path.dirname(__file__))
from results_file import write_result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", nargs="+", default=["w4_pc_asym"], choices=sorted(SCHEMES))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--compare-streamed", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "p1_rtn.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="relayquant: %(message)s")
    rows = []
    with tempfile.TemporaryDirectory(prefix="relayquant-p1-") as work:
        for i, scheme in enumerate(args.schemes):
            bits, group, sym = SCHEMES[scheme]
            changes = {"cluster.workers": args.workers, "quantization.bits": bits,
                       "quantization.group_size": group, "quantization.symmetric": sym}
            config = load_recipe("p1-rtn-w4", {
                **changes, "output": os.path.join(work, scheme), "eval.fp": i == 0})
            report = quantize(config)
            ppl = report["perplexity"]
            row = {
                "scheme": scheme, "recipe": "p1-rtn-w4", "changes": {
                    k: v for k, v in changes.items() if k != "cluster.workers"},
                "perplexity": ppl["quantized"], "fp": ppl["fp"], "quantized": ppl["quantized"],
                "fp_from_cache": ppl.get("fp_from_cache"),
                "reference_fp": REFERENCE["fp"], "reference_quantized": REFERENCE[scheme],
                "windows": ppl["windows"], "wall_seconds": report["wall_seconds"],
                "eval_seconds": ppl["seconds"], "phase_seconds": report["phase_seconds"],
                "data_free": report["data_free"],
                "quantize_seconds": report["phase_seconds"]["quantize"],
                "stage_peak_rss_bytes": max(b["peak_rss_bytes"] for b in report["blocks"]),
                "workers": args.workers}
            if args.compare_streamed:
                streamed = quantize(load_recipe("p1-rtn-w4", {
                    **changes, "output": os.path.join(work, f"{scheme}-streamed"),
                    "eval.enabled": False, "eval.block_errors": True}))
                row["streamed_quantize_seconds"] = streamed["phase_seconds"]["quantize"]
                row["shards_identical_to_streamed"] = (
                    [b["sha256"] for b in streamed["blocks"]] ==
                    [b["sha256"] for b in report["blocks"]])
            rows.append(row)
    result = {"benchmark": "p1_rtn", "rows": rows}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
