"""Protocol P1 with LoRC (ZeroQuant-V2's low-rank compensation, issue 17): RTN, GPTQ and the best
recipe (p1-signround-*) at W3 g64 and W2 g64 asymmetric, each without LoRC and with rank 8 and
16 in fp16 and int8 factors; the total bits per weight of every row (codes, scales and zero
points, and the adapter); the perplexity on all 292 SOTU test windows (with `--without-lorc`
also without the adapter: a second evaluation pass, about 400 s a row here); and, per scheme
and method, the CVXQ allocation without LoRC at the total bits of that method's best LoRC row,
so the table says whether LoRC's bits buy more than the same bits spent on width.

    python benchmarks/p1_lorc.py [--rows w3g64:gptq:r8fp16 w2g64:rtn:none ...] [--workers 2]
    python benchmarks/p1_lorc.py --rows w3g64:gptq:cvxq   # after w3g64's GPTQ LoRC rows

Row `SCHEME:METHOD:LORC`: METHOD rtn (p1-rtn-w4 at the scheme; data-free, LoRC needs no
data), gptq (p1-gptq-*), signround (p1-signround-*); LORC none, r8fp16, r8int8, r16fp16,
r16int8, or cvxq: METHOD without LoRC, widths {2,3,4} (W2) or {3,4} (W3) and group sizes
{32, 64, 96, 192, per-channel} allocated by CVXQ (measured distortion) at the total bits per
weight of METHOD's best LoRC row at SCHEME, side information counted. The cvxq row of the
scheme's best LoRC row overall is issue 17's comparison; the others say the same per method.

With `--peft`, each LoRC row's output is also scored by plain transformers + peft in a fresh
interpreter that imports nothing of relayquant (float32; the adapter `OUT/lorc` wrapped by
`PeftModel` around the compressed-tensors folder loaded dequantized, or at 3 bits, which the
pinned compressed-tensors 0.17.1 cannot read (README, Output), around `OUT/fake_quant`), on
the same windows: `peft.perplexity` and its relative difference from relayquant's (issue 17's
check: within 0.1 %).

Rows are merged into benchmarks/results/p1_lorc.json as they finish (default: every row not
there yet, the cvxq rows last; --redo to run them again). The FP perplexity comes from the
pipeline's FP cache after the first row. `--set KEY=VALUE` changes every row's recipe (a smoke
run: `--set model.path=/tiny eval.max_windows=4 calibration.num_samples=4 ...`). Needs
`relayquant assets prepare`.
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

import torch

from cluster.coordinator import quantize
from jobs.recipes import load_recipe, parse_overrides
from pipeline.assets import resolve_model_path
from pipeline.calibration import eval_windows_for

sys.path.insert(0, os.path.dirname(__file__))
from plain_transformers import score
from results_file import RESULTS, add_rows_argument, chosen_rows, provenance, write_result

SCHEMES = {"w3g64": (3, 64), "w2g64": (2, 64)}
METHODS = {"rtn": "p1-rtn-w4", "gptq": "p1-gptq-{scheme}", "signround": "p1-signround-{scheme}"}
LORC: dict[str, dict[str, Any] | None] = {
    "none": None,
    "r8fp16": {"rank": 8, "dtype": "float16"}, "r8int8": {"rank": 8, "dtype": "int8"},
    "r16fp16": {"rank": 16, "dtype": "float16"}, "r16int8": {"rank": 16, "dtype": "int8"},
}
CVXQ_CHOICES = {"w3g64": [3, 4], "w2g64": [2, 3, 4]}
CVXQ_GROUPS = [32, 64, 96, 192, None]


def recipe_config(scheme: str, method: str, work: str, workers: int,
                  extra: dict[str, Any]) -> Any:
    bits, group = SCHEMES[scheme]
    name = METHODS[method].format(scheme=scheme)
    return name, load_recipe(name, {
        "output": os.path.join(work, f"{scheme}-{method}-{time.time_ns()}"),
        "cluster.workers": workers, "quantization.bits": bits,
        "quantization.group_size": group, "quantization.symmetric": False, **extra})


# the widths whose compressed-tensors folder the pinned compressed-tensors 0.17.1 reads (README,
# Output); at the others the PEFT check wraps OUT/fake_quant instead
LOADABLE_BITS = (2, 4, 8)


def peft_perplexity(config: Any, work: str) -> dict[str, Any]:
    """`config`'s output with its adapter scored by transformers + peft in a fresh
    interpreter, on the run's evaluation windows."""
    ids_path = os.path.join(work, "peft-windows.pt")
    torch.save(eval_windows_for(resolve_model_path(config.model.path), config.eval), ids_path)
    whole = config.quantization.bits in LOADABLE_BITS
    base = str(config.output) if whole else os.path.join(config.output, "fake_quant")
    result = score(base, ids_path, work, adapter=os.path.join(config.output, "lorc"),
                   dequantize=whole, batch=4)
    result.pop("logits")
    return {**result, "base": "compressed-tensors" if whole else "fake_quant"}


def run_row(row: str, result: dict[str, Any], work: str, workers: int,
            overrides: dict[str, Any], without_lorc: bool = False,
            peft: bool = False) -> dict[str, Any]:
    scheme, method, lorc = row.split(":")
    extra: dict[str, Any] = {"eval.without_lorc": without_lorc}
    target = None
    if lorc == "cvxq":
        best = best_lorc_row(result, scheme, method)
        if best is None:
            raise SystemExit(f"{row}: run the LoRC rows of {scheme}:{method} first (the "
                             "allocation matches the best one's total bits per weight)")
        target = best["bits_per_weight"]["total"]
        extra.update({"quantization.budget": {
            "average_bits": target, "choices": CVXQ_CHOICES[scheme], "count_side_info": True,
            "distortion": "measured", "group_sizes": CVXQ_GROUPS}})
    else:
        extra["quantization.lorc"] = LORC[lorc]
        if peft and LORC[lorc] is not None and SCHEMES[scheme][0] not in LOADABLE_BITS:
            extra["export.formats"] = ["compressed-tensors", "fake_quant"]
    extra.update(overrides)  # --set last: it may change the budget's fields too
    recipe, config = recipe_config(scheme, method, work, workers, extra)
    start = time.perf_counter()
    report = quantize(config)
    ppl = report["perplexity"] or {}
    out = {"row": row, "scheme": scheme, "method": method, "lorc": lorc, "recipe": recipe,
           "bits_per_weight": report["bits_per_weight"],
           "perplexity": ppl.get("quantized"),
           "perplexity_without_lorc": ppl.get("quantized_without_lorc"),
           "fp_perplexity": ppl.get("fp"), "windows": ppl.get("windows"),
           "wall_seconds": time.perf_counter() - start,
           "quantize_seconds": sum(b["seconds"] for b in report["blocks"]),
           "workers": workers, **provenance()}
    if "lorc" in report:
        out["lorc_report"] = report["lorc"]
        if peft:
            check = peft_perplexity(config, work)
            out["peft"] = {**check, "relative_difference":
                           check["perplexity"] / out["perplexity"] - 1,
                           "relayquant_tokens": ppl.get("tokens")}
    if target is not None:
        out["matched_bits"] = target
        out["matched_row"] = best["row"]
        out["allocation"] = {k: report["allocation"][k] for k in ("achieved_bits", "target_bits")}
        out["allocation"]["widths"] = [[u["bits"], u.get("group_size")]
                                       for u in report["allocation"]["units"]]
    return out


def best_lorc_row(result: dict[str, Any], scheme: str, method: str) -> dict[str, Any] | None:
    """The lowest-perplexity row of `method` at `scheme` that carries an adapter."""
    rows = [r for r in result["rows"] if r["scheme"] == scheme and r["method"] == method
            and LORC.get(r["lorc"]) is not None and r["perplexity"] is not None]
    return min(rows, key=lambda r: r["perplexity"], default=None)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_rows_argument(parser, [("SCHEME", list(SCHEMES)), ("METHOD", list(METHODS)),
                               ("LORC", [*LORC, "cvxq"])])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--without-lorc", action="store_true",
                        help="LoRC rows: also the perplexity without the adapter")
    parser.add_argument("--peft", action="store_true",
                        help="LoRC rows: also the perplexity through transformers + peft")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY.PATH=VALUE",
                        help="recipe changes for every row (e.g. a smoke run on a tiny model)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "p1_lorc.json"))
    args = parser.parse_args(argv)
    args.rows = chosen_rows(args.rows)
    logging.basicConfig(level=logging.INFO, format="relayquant: %(message)s")
    overrides = parse_overrides(args.set)
    result: dict[str, Any] = {"benchmark": "p1_lorc", "fp": None, "rows": []}
    if os.path.exists(args.out):
        with open(args.out) as f:
            result = json.load(f)
    done = {r["row"] for r in result["rows"]}
    with tempfile.TemporaryDirectory(prefix="relayquant-p1l-") as work:
        for row in sorted(args.rows, key=lambda r: r.endswith(":cvxq")):
            if row in done and not args.redo:
                continue
            out = run_row(row, result, work, args.workers, overrides, args.without_lorc,
                          args.peft)
            result["fp"] = out["fp_perplexity"] or result["fp"]
            result["rows"] = [r for r in result["rows"] if r["row"] != row] + [out]
            write_result(args.out, result)
    print(table(result))
    return result


def table(result: dict[str, Any]) -> str:
    lines = [("| scheme | method | LoRC | total bits/weight | adapter bits/weight | PPL | "
              "PPL without adapter | PPL through peft |"), "|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: r["row"]):
        bits = r["bits_per_weight"]
        without = r.get("perplexity_without_lorc")
        ppl = r["perplexity"]
        peft = r.get("peft", {}).get("perplexity")
        lorc = (f"none, CVXQ at {r['matched_row']}'s bits" if "matched_bits" in r
                else r["lorc"])
        lines.append(f"| {r['scheme']} | {r['method']} | {lorc} | {bits['total']:.4f} | "
                     f"{bits['lorc']:.4f} | "
                     f"{'-' if ppl is None else f'{ppl:.3f}'} | "
                     f"{'-' if without is None else f'{without:.3f}'} | "
                     f"{'-' if peft is None else f'{peft:.3f}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
