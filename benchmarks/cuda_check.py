"""The block reconstructor on CUDA against the same block on the CPU: every method, AMP on
(fp16 autocast + loss scaling, 4-bit) and off (8-bit, where fake-quant overflows fp16), tiny
Llama and Qwen2 blocks (GQA, RoPE, q/k/v biases). Needs a GPU; nothing else than torch and
transformers (no Ray): run on the lent device machine.

    python benchmarks/cuda_check.py [--out FILE]

Per case: the block's output error relative to the FP block (quantized stream, held-in data)
on each device, the training losses, whether AMP ran, seconds. The check fails (exit 1) when a
CUDA run is not finite, did not use AMP where it should, or its error exceeds 1.5x the CPU's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
from tiny_models import build_model

from pipeline import block_pass
from pipeline.config import ExportFormat, QuantizationConfig
from pipeline.config_tree import build_config
from pipeline.plan import open_model
from pipeline.streams import MemoryStore

CASES: dict[str, dict[str, Any]] = {
    "rtn_w4g16": {"bits": 4, "group_size": 16},
    "gptq_w3g16": {"bits": 3, "group_size": 16, "method": "gptq", "gptq": {"act_order": True}},
    "omniquant_lwc_let_w4g16": {"bits": 4, "group_size": 16, "method": "omniquant",
                                "omniquant": {"epochs": 4, "batch_size": 2}},
    "omniquant_lwc_let_w8": {"bits": 8, "method": "omniquant",
                             "omniquant": {"epochs": 2, "batch_size": 2}},
    "signround_let_w3g16": {"bits": 3, "group_size": 16, "method": "omniquant", "omniquant": {
        "epochs": 4, "batch_size": 2, "rounding": "learned", "optimizer": "signsgd",
        "keep_best": True}},
    "omniquant_w4a8": {"bits": 4, "group_size": 16, "abits": 8, "method": "omniquant",
                       "omniquant": {"epochs": 2, "batch_size": 2}},
}


def run(model: str, device: str, case: dict[str, Any]) -> dict[str, Any]:
    parts = open_model(model, "float32", device)
    torch.manual_seed(0)
    store = MemoryStore()
    ids = torch.randint(0, parts.hf_config.vocab_size, (8, 64))
    fp = block_pass.embed_stream(parts, [ids[:4], ids[4:]], store)
    q = build_config(QuantizationConfig, case, "quantization")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    r = block_pass.quantize_block(parts, 1, fp, fp, q, [ExportFormat.FAKE_QUANT], store)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    m = r.metrics
    return {"device": device, "seconds": time.perf_counter() - start,
            "output_relative_error": m["output_relative_error"], "amp": m.get("amp"),
            "loss_before": m.get("loss_before"), "loss_after": m.get("loss_after"),
            "peak_device_bytes": m.get("peak_device_bytes")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "cuda_check.json"))
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    rows, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("llama", "qwen2"):
            model = build_model(os.path.join(tmp, arch), arch, num_layers=2)
            for name, case in CASES.items():
                cpu, gpu = run(model, "cpu", case), run(model, "cuda", case)
                # AMP where the reconstructor trains and no 8-bit fake-quant is involved
                amp_expected = (case.get("method") == "omniquant" and case["bits"] < 8
                                and not 8 <= case.get("abits", 16) < 16)
                ok = (torch.isfinite(torch.tensor(gpu["output_relative_error"])).item()
                      and gpu["output_relative_error"] <= 1.5 * cpu["output_relative_error"] + 1e-7
                      and (gpu["amp"] is None or bool(gpu["amp"]) == amp_expected))
                rows.append({"arch": arch, "case": name, "settings": case, "cpu": cpu,
                             "cuda": gpu, "ok": ok})
                if not ok:
                    failures.append(f"{arch}/{name}")
                print(f"{arch:6s} {name:26s} cpu {cpu['output_relative_error']:.3e} "
                      f"({cpu['seconds']:.1f}s)  cuda {gpu['output_relative_error']:.3e} "
                      f"({gpu['seconds']:.1f}s, amp {gpu['amp']})  {'ok' if ok else 'FAIL'}",
                      flush=True)
    result = {"benchmark": "cuda_check", "device": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "rows": rows, "failures": failures}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("failures:", failures or "none")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
