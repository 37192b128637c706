"""Protocol P1 export check: quantize SmolLM2 (RTN, default W4 per-channel asymmetric), then
  1. load the compressed-tensors folder with plain transformers in a fresh interpreter (no
     relayquant import) and compare its logits with relayquant's fake-quant folder;
  2. compare the perplexity of that transformers model on the SOTU test windows with
     relayquant's own streamed perplexity of the same folder;
  3. compare the folder's size with what the bits predict.
Writes benchmarks/results/p1_export.json.

    python benchmarks/p1_export.py [--bits 4] [--group-size N] [--symmetric] [--max-windows N]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from plain_transformers import score
from results_file import write_result


def predicted_bytes(folder: str) -> dict:
    """Packed weights + scales + zero points from the config, plus every unquantized tensor."""
    from safetensors import safe_open

    index = json.loads(Path(folder, "model.safetensors.index.json").read_text())["weight_map"]
    bits = {}
    config = json.loads(Path(folder, "config.json").read_text())["quantization_config"]
    for group in config["config_groups"].values():
        for target in group["targets"]:
            bits[target] = group["weights"]["num_bits"]
    predicted, actual = 0, 0
    for file in sorted(set(index.values())):
        actual += os.path.getsize(os.path.join(folder, file))
        with safe_open(os.path.join(folder, file), "pt") as f:
            for name in f:
                t = f.get_slice(name)
                shape = t.get_shape()
                module, _, suffix = name.rpartition(".")
                numel = math.prod(shape)
                if suffix == "weight_packed":
                    continue  # counted from weight_shape below
                if suffix == "weight_shape":
                    out_f, in_f = f.get_tensor(name).tolist()
                    predicted += out_f * in_f * bits[module] / 8
                elif suffix == "weight_zero_point":
                    scale_shape = f.get_slice(f"{module}.weight_scale").get_shape()
                    predicted += math.prod(scale_shape) * bits[module] / 8
                else:
                    predicted += numel * {"F32": 4, "BF16": 2, "F16": 2, "I64": 8,
                                          "I32": 4}[t.get_dtype()]
    return {"predicted_bytes": int(predicted), "actual_bytes": actual,
            "ratio": actual / predicted}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--symmetric", action="store_true")
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "p1_export.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="relayquant: %(message)s")
    import torch

    from cluster.coordinator import evaluate, quantize
    from jobs.recipes import load_recipe
    from pipeline.calibration import eval_windows_for
    from pipeline.config import ClusterConfig, EvalConfig

    with tempfile.TemporaryDirectory(prefix="relayquant-export-") as work:
        out = os.path.join(work, "out")
        config = load_recipe("p1-rtn-w4", {
            "output": out, "quantization.bits": args.bits,
            "quantization.group_size": args.group_size,
            "quantization.symmetric": args.symmetric, "eval.enabled": False,
            "export.formats": ["compressed-tensors", "fake_quant"]})
        start = time.time()
        report = quantize(config)
        eval_config = EvalConfig(max_windows=args.max_windows)
        windows = eval_windows_for(out, eval_config)
        windows_path = os.path.join(work, "windows.pt")
        torch.save(windows, windows_path)
        ours = evaluate(out, eval_config, ClusterConfig(workers=2))
        ct = score(out, windows_path, work)
        fake = score(os.path.join(out, "fake_quant"), windows_path, work)
        logits_rel = ((ct["logits"] - fake["logits"]).abs().max() /
                      fake["logits"].abs().max()).item()
        result = {
            "benchmark": "p1_export", "scheme": {"bits": args.bits,
                                                 "group_size": args.group_size,
                                                 "symmetric": args.symmetric},
            "windows": int(windows.shape[0]),
            "relayquant_perplexity": ours["perplexity"],
            "transformers_ct_perplexity": ct["perplexity"],
            "transformers_fake_quant_perplexity": fake["perplexity"],
            "perplexity_rel_diff": abs(ct["perplexity"] - ours["perplexity"]) /
            ours["perplexity"],
            "logits_max_rel_diff_ct_vs_fake_quant": logits_rel,
            "size": predicted_bytes(out), "quantize_wall_seconds": report["wall_seconds"],
            "total_seconds": time.time() - start, "flags": report["export"]["flags"],
        }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
