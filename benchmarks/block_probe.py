"""One block of P1, several reconstruction settings: a cheap way to compare methods before a
full P1 row. The FP stream of the first `--train` calibration windows (and of the last `--test`
ones, held out) is run through blocks 0..K-1 unquantized; block K is then quantized with each
variant on the training windows, and its output error relative to the FP block is measured on
both sets; with `--depth D` also after the next D FP blocks (-1: at the model's last block),
the error cross-layer learning aims at.

    python benchmarks/block_probe.py --block 12 --scheme w3g64 \\
        --variant gptq='{"quantization.method": "gptq"}' \\
        --variant lwc='{"quantization.method": "omniquant", "quantization.omniquant.epochs": 1}'

Each variant is a JSON object of recipe overrides on `p1-rtn-w4` (after the scheme's bits and
group size). Results go to benchmarks/results/block_probe.json (rows merge by name, block,
scheme and training windows).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

from jobs.recipes import load_recipe
from pipeline import block_pass
from pipeline.assets import resolve_model_path
from pipeline.calibration import calibration_windows_for
from pipeline.plan import open_model
from pipeline.streams import MemoryStore, split_windows

sys.path.insert(0, os.path.dirname(__file__))
from results_file import RESULTS, write_result

SCHEMES = {"w4": {"quantization.bits": 4, "quantization.group_size": None},
           "w3g64": {"quantization.bits": 3, "quantization.group_size": 64},
           "w2g64": {"quantization.bits": 2, "quantization.group_size": 64}}


def relative_error(parts: Any, block: torch.nn.Module, store: MemoryStore, inputs: list[Any],
                   targets: list[Any]) -> float:
    err = ref = 0.0
    with torch.no_grad():
        for h, t in zip(inputs, targets, strict=True):
            y = block_pass._run(parts, block, store, h)
            err += (y - store.get(t)).double().pow(2).sum().item()
            ref += store.get(t).double().pow(2).sum().item()
    return err / ref


def through_rest(parts: Any, start: int, stream: list[Any], store: MemoryStore,
                 depth: int) -> list[Any]:
    """The stream through the next `depth` FP blocks (-1: to the end of the model)."""
    end = parts.num_blocks if depth < 0 else min(parts.num_blocks, start + depth)
    for i in range(start, end):
        stream = block_pass.forward_block(parts, i, stream, store)
    return stream


def stream_error(got: list[Any], want: list[Any], store: MemoryStore) -> float:
    err = ref = 0.0
    for g, w in zip(got, want, strict=True):
        err += (store.get(g) - store.get(w)).double().pow(2).sum().item()
        ref += store.get(w).double().pow(2).sum().item()
    return err / ref


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", type=int, default=12)
    parser.add_argument("--scheme", choices=list(SCHEMES), default="w3g64")
    parser.add_argument("--train", type=int, default=32)
    parser.add_argument("--test", type=int, default=16)
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=JSON")
    parser.add_argument("--depth", type=int, default=0,
                        help="also the held-out error after this many more FP blocks (-1: "
                             "the model's last block), where cross-layer learning aims")
    parser.add_argument("--out", default=os.path.join(RESULTS, "block_probe.json"))
    args = parser.parse_args(argv)
    variants = {}
    for v in args.variant:
        name, _, changes = v.partition("=")
        variants[name] = json.loads(changes or "{}")
    base = load_recipe("p1-rtn-w4", SCHEMES[args.scheme])
    model = resolve_model_path(base.model.path)
    parts = open_model(model, "float32")
    store = MemoryStore()
    windows = calibration_windows_for(model, base.calibration)
    assert args.train + args.test <= windows.shape[0], "--train + --test > calibration windows"
    train = block_pass.embed_stream(parts, split_windows(windows[: args.train], 8), store)
    test = block_pass.embed_stream(parts, split_windows(windows[-args.test :], 8), store)
    for i in range(args.block):
        train = block_pass.forward_block(parts, i, train, store)
        test = block_pass.forward_block(parts, i, test, store)
    test_target = block_pass.forward_block(parts, args.block, test, store)
    final_target = through_rest(parts, args.block + 1, test_target, store, args.depth)
    result: dict[str, Any] = {"benchmark": "block_probe", "rows": []}
    if os.path.exists(args.out):
        with open(args.out) as f:
            result = json.load(f)
    loaded: list[torch.nn.Module] = []
    load_block = parts.load_block

    def keep(index: int) -> torch.nn.Module:
        block = load_block(index)
        if index == args.block:  # the block being quantized (not a cross-layer neighbour)
            loaded.append(block)
        return block

    parts.load_block = keep  # type: ignore[method-assign]
    for name, changes in variants.items():
        config = load_recipe("p1-rtn-w4", {**SCHEMES[args.scheme], **changes})
        torch.manual_seed(0)
        start = time.perf_counter()
        r = block_pass.quantize_block(parts, args.block, train, train, config.quantization, [],
                                      store)
        row = {"name": name, "block": args.block, "scheme": args.scheme, "train": args.train,
               "test": args.test, "changes": changes, "seconds": time.perf_counter() - start,
               "train_relative_error": r.metrics["output_relative_error"],
               "test_relative_error": relative_error(parts, loaded[-1], store, test,
                                                     test_target)}
        if args.depth:
            out = [store.put(block_pass._run(parts, loaded[-1], store, h)) for h in test]
            rest = parts.num_blocks - 1 - args.block
            row["depth"] = rest if args.depth < 0 else min(args.depth, rest)
            row["test_relative_error_at_depth"] = stream_error(
                through_rest(parts, args.block + 1, out, store, args.depth), final_target,
                store)
        if "train_seconds" in r.metrics:  # learned methods: the training alone, and per step
            omni = config.quantization.omniquant
            steps = omni.total_steps(args.train)
            row.update({"train_seconds": r.metrics["train_seconds"], "steps": steps,
                        "train_precision": r.metrics.get("train_precision"),
                        **({"best_step": r.metrics["best_step"]}
                           if "best_step" in r.metrics else {})})
        print(json.dumps(row), flush=True)
        key = (name, args.block, args.scheme, args.train)
        result["rows"] = [x for x in result["rows"]
                          if (x["name"], x["block"], x["scheme"], x["train"]) != key] + [row]
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
