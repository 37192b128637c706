"""`relayquant quantize`, also runnable as `python -m jobs.quantize` (for `ray job submit`)."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from jobs.recipes import load_recipe, parse_overrides


def run_quantize(args: argparse.Namespace) -> dict[str, Any]:
    overrides = parse_overrides(args.set)
    if args.output is not None:
        overrides["output"] = args.output
    if args.workers is not None:
        overrides["cluster.workers"] = args.workers
    if args.address is not None:
        overrides["cluster.address"] = args.address
    config = load_recipe(args.config, overrides, warn=True)
    from cluster import progress
    from cluster.coordinator import quantize

    mode = "quiet" if args.quiet else args.progress
    with progress.active(progress.Progress(mode, args.log_json)):
        report = quantize(config, restart=args.restart)
    ppl = report["perplexity"] or {}
    return {"output": report["output"], "method": report["method"], "perplexity": ppl,
            "windows": ppl.get("windows"), "wall_seconds": report["wall_seconds"],
            "blocks": len(report["blocks"]),
            "vllm_servable": report["export"].get("vllm_servable"),
            "vllm_why": report["export"].get("vllm_why")}


def summarize(result: dict[str, Any]) -> str:
    ppl = result["perplexity"]
    lines = [(f"quantized {result['blocks']} blocks with {result['method']} in "
              f"{result['wall_seconds']:.1f}s")]
    if ppl:
        fp = f"{ppl['fp']:.4f}" if ppl.get("fp") is not None else "not measured"
        lines.append(f"perplexity on {ppl['corpus']} ({ppl['windows']} windows of "
                     f"{ppl['seq_len']} tokens): FP {fp}, quantized {ppl['quantized']:.4f}")
    lines.append(f"output: {result['output']} (report.json, manifest.json inside)")
    if result.get("vllm_servable") is not None:
        lines.append("vLLM: " + ("can serve it" if result["vllm_servable"] else
                                 f"cannot serve it: {result['vllm_why']}"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import _Parser, add_quantize_arguments, run_guarded

    logging.basicConfig(level=logging.INFO, format="relayquant: %(message)s", stream=sys.stderr)
    parser = _Parser(prog="python -m jobs.quantize")
    add_quantize_arguments(parser)
    args = parser.parse_args(argv)
    return run_guarded(lambda: run_quantize(args), args.json, summarize)


if __name__ == "__main__":
    sys.exit(main())
