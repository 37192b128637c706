"""`relayquant recipes`: the bundled recipes, one line each (scheme, method, what P1 measured
for them), so a user picks one without reading YAML.

A recipe's measured figures are the benchmark rows (`benchmarks/results/`) whose settings give
exactly the recipe's result-bearing config (model, calibration, quantization, export): each row is
rebuilt from the recipe it started from and the keys it changed, as the benchmark ran it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from jobs.recipes import CONFIG_DIR, load_recipe, unread_sections
from pipeline.config import Autocast, ConfigError, Method, RunConfig
from pipeline.config.tree import config_to_dict
from pipeline.output_dir import RESULT_SECTIONS

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def result_key(config: RunConfig) -> str:
    """The settings that make the weights: export.target only refuses recipes, so a row run
    without it still is the recipe's figure."""
    data = config_to_dict(config)
    data["export"] = {k: v for k, v in data["export"].items() if k != "target"}
    for name in unread_sections(config.quantization):  # settings the method never reads
        data["quantization"].pop(name, None)
    return json.dumps({"model": config.model.path, **{k: data[k] for k in RESULT_SECTIONS}},
                      sort_keys=True, default=str)


def describe_scheme(config: RunConfig) -> str:
    q = config.quantization
    if q.budget.average_bits is not None:
        return f"{q.budget.average_bits:g} bits avg (CVXQ)"
    group = f"g{q.group_size}" if q.group_size else "per-channel"
    kind = ("sym" + ("-full" if q.symmetric_range == "full" else "")) if q.symmetric else "asym"
    acts = f" A{q.abits}" if q.abits < 16 else ""
    lorc = f" +LoRC r{q.lorc.rank}" if q.lorc is not None else ""
    return f"W{q.bits}{acts} {group} {kind}{lorc}"


def describe_method(config: RunConfig) -> str:
    q = config.quantization
    if q.method is not Method.OMNIQUANT:
        return q.method.value
    o = q.omniquant
    parts = [p for p, on in (("LWC", o.lwc), ("LET", o.let)) if on]
    rounding = {"learned": "learned rounding", "gptq": "GPTQ rounding"}.get(o.rounding.value)
    if rounding:
        parts.append(rounding)
    if o.optimizer.value == "signsgd":
        parts.append("sign-SGD")
    if o.sde is not None:
        parts.append(f"SDE band {o.sde.band}" + (f" + {o.sde.block}x{o.sde.block}"
                                                 if o.sde.block else ""))
    if o.cross_layer is not None:
        parts.append(f"cross-layer x{o.cross_layer.depth}")
    length = f"{o.steps} steps" if o.steps is not None else f"{o.epochs} epochs"
    return f"omniquant ({', '.join(parts) or 'no learned parameters'}; {length})"


def measured() -> dict[str, dict[str, Any]]:
    """Result key -> the newest P1 figures measured for that exact config."""
    out: dict[str, dict[str, Any]] = {}
    results = BENCHMARKS / "results"
    if not results.is_dir():
        return out
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import p1_reconstruct  # the benchmark's own scheme and variant tables
    finally:
        sys.path.remove(str(BENCHMARKS))

    def add(source: str, recipe: str, changes: dict[str, Any], row: dict[str, Any]) -> None:
        try:
            config = load_recipe(recipe, changes)
        except ConfigError:
            return  # a row of a recipe that has since changed shape
        out[result_key(config)] = {
            "perplexity": row["perplexity"], "quantize_seconds": row.get("quantize_seconds"),
            "workers": row.get("workers"), "source": f"benchmarks/results/{source}",
            # a row whose run shared the machine (its note says with what): no time figure
            "seconds_disturbed": bool(row.get("seconds_disturbed"))}

    # rows of benchmarks/p1_reconstruct.py (its variants), also those it wrote elsewhere
    for source in ("p1_reconstruct.json", "p1_cqe_ablation.json"):
        for row in _results(source).get("rows", []):
            try:
                recipe, changes = p1_reconstruct.row_recipe(p1_reconstruct.scheme_key(row),
                                                            row["method"])
            except (StopIteration, KeyError):
                continue
            add(source, recipe, changes, row)
    for source in ("p1_cvxq.json", "p1_rtn.json"):  # rows that name their recipe and changes
        for row in _results(source).get("rows", []):
            if "changes" in row:
                add(source, row["recipe"], row["changes"], row)
    return out


def figures_for(config: RunConfig, figures: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The recipe's measured row; with `autocast: auto`, whose precision depends on the CPU,
    the rows measured in each precision it can pick, named by it."""
    found = figures.get(result_key(config))
    omni = config.quantization.omniquant
    if found is not None or config.quantization.method is not Method.OMNIQUANT or \
            omni.autocast is not Autocast.AUTO:
        return found
    per_precision = {}
    for precision in (Autocast.BFLOAT16, Autocast.FLOAT32):
        row = figures.get(result_key(dataclasses.replace(
            config, quantization=dataclasses.replace(
                config.quantization, omniquant=dataclasses.replace(omni, autocast=precision)))))
        if row is not None:
            per_precision[precision.value] = row
    if not per_precision:
        return None
    first = next(iter(per_precision.values()))
    return {**first, "autocast": next(iter(per_precision)), "by_autocast": per_precision}


def _results(name: str) -> dict[str, Any]:
    path = BENCHMARKS / "results" / name
    if not path.exists():
        return {}
    with open(path) as f:
        return json.load(f)


def catalog() -> dict[str, Any]:
    figures = measured()
    out = []
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        config = load_recipe(str(path))
        out.append({"name": path.stem, "scheme": describe_scheme(config),
                    "method": describe_method(config), "model": config.model.path,
                    "export_target": config.export.target.value if config.export.target else None,
                    "measured": figures_for(config, figures)})
    return {"recipes": out, "p1_fp_perplexity": _results("p1_reconstruct.json").get("fp")}


def summarize(result: dict[str, Any]) -> str:
    rows = result["recipes"]
    width = max(len(r["name"]) for r in rows)
    scheme = max(len(r["scheme"]) for r in rows)
    lines = []
    for r in rows:
        m = r["measured"]
        if m is None:
            figure = "not measured"
        else:
            seconds = (f", quantize {m['quantize_seconds']:.0f} s" if m.get("quantize_seconds")
                       is not None else "")
            if seconds and m.get("workers"):
                seconds += f" on {m['workers']} worker{'s' if m['workers'] > 1 else ''}"
            if seconds and m.get("seconds_disturbed"):
                seconds = ", quantize time not a figure (another job shared the machine)"
            figure = f"P1 perplexity {m['perplexity']:.3f}{seconds}"
            if "by_autocast" in m:  # autocast: auto, measured per precision
                figure = "P1 perplexity " + ", ".join(
                    f"{row['perplexity']:.3f} in {precision}"
                    + (f" ({row['quantize_seconds']:.0f} s)" if row.get("quantize_seconds")
                       is not None else "")
                    for precision, row in m["by_autocast"].items()) + \
                    " (autocast auto: bfloat16 where the CPU has bf16 kernels, else float32)"
        lines.append(f"{r['name']:<{width}}  {r['scheme']:<{scheme}}  {r['method']}; {figure}")
    fp = result.get("p1_fp_perplexity")
    lines.append(f"({len(rows)} recipes in {os.path.relpath(CONFIG_DIR)}; figures from "
                 "benchmarks/results/, perplexity on P1's 292 test windows"
                 + (f", where the unquantized model scores {fp:.3f})" if fp else ")"))
    return "\n".join(lines)
