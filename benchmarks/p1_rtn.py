"""Protocol P1 with RTN: FP and quantized perplexity of SmolLM2-135M-Instruct on the SOTU test
split (all 292 windows of 512 tokens), against the reference evaluator's figures.

    python benchmarks/p1_rtn.py [--schemes w4_pc_asym w3_g64_asym ...] [--workers 2]

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
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "p1_rtn.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="relayquant: %(message)s")
    rows = []
    with tempfile.TemporaryDirectory(prefix="relayquant-p1-") as work:
        for i, scheme in enumerate(args.schemes):
            bits, group, sym = SCHEMES[scheme]
            config = load_recipe("p1-rtn-w4", {
                "output": os.path.join(work, scheme), "cluster.workers": args.workers,
                "quantization.bits": bits, "quantization.group_size": group,
                "quantization.symmetric": sym, "eval.fp": i == 0})
            report = quantize(config)
            ppl = report["perplexity"]
            rows.append({
                "scheme": scheme, "fp": ppl["fp"], "quantized": ppl["quantized"],
                "reference_fp": REFERENCE["fp"], "reference_quantized": REFERENCE[scheme],
                "windows": ppl["windows"], "wall_seconds": report["wall_seconds"],
                "eval_seconds": ppl["seconds"],
                "quantize_seconds": sum(b["seconds"] for b in report["blocks"]),
                "stage_peak_rss_bytes": max(b["peak_rss_bytes"] for b in report["blocks"]),
                "workers": args.workers})
    result = {"benchmark": "p1_rtn", "rows": rows}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
