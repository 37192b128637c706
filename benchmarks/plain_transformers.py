"""A saved model scored by plain transformers (with peft for a LoRA adapter) in a fresh
interpreter that imports nothing of relayquant: the benchmarks' check that what relayquant
writes loads, and scores the same, without it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

# runs in a fresh interpreter: transformers (+ compressed-tensors, + peft) only
SCRIPT = """
import json, math, sys, time, torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig
folder, windows_path, out, adapter, dequantize, batch = sys.argv[1:7]
torch.set_num_threads(2)
start = time.time()
# compressed-tensors keeps packed linears without a `.weight`, which PEFT cannot wrap
extra = ({"quantization_config": CompressedTensorsConfig(dequantize=True)}
         if dequantize == "1" else {})
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra)
if adapter != "-":
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, adapter)
model.eval()
ours = [m for m in sys.modules if m.split(".")[0] in ("pipeline", "cluster", "jobs", "relayquant")]
assert not ours, ours
windows = torch.load(windows_path)
nll, count = 0.0, 0
with torch.no_grad():
    first = model(input_ids=windows[:2]).logits
    for i in range(0, windows.shape[0], int(batch)):
        x = windows[i:i + int(batch)]
        logits = model(input_ids=x).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
torch.save(first, out + ".logits.pt")
json.dump({"perplexity": math.exp(nll / count), "windows": int(windows.shape[0]),
           "tokens": count, "seconds": time.time() - start}, open(out, "w"))
"""


def score(folder: str, windows_path: str, work: str, adapter: str | None = None,
          dequantize: bool = False, batch: int = 1) -> dict[str, Any]:
    """Perplexity of `folder` (with the PEFT adapter folder `adapter`; `dequantize`: a
    compressed-tensors folder loaded dequantized) on the windows saved at `windows_path`,
    float32, `batch` windows per forward; also `logits`, those of the first two windows."""
    import torch

    handle, out = tempfile.mkstemp(prefix="score-", suffix=".json", dir=work)
    os.close(handle)
    done = subprocess.run([sys.executable, "-c", SCRIPT, folder, windows_path, out,
                           adapter or "-", "1" if dequantize else "0", str(batch)],
                          check=False, capture_output=True, text=True, cwd=work)
    if done.returncode != 0:
        raise SystemExit(f"scoring {folder} with plain transformers failed:\n"
                         f"{done.stderr[-3000:]}")
    with open(out) as f:
        result = json.load(f)
    result["logits"] = torch.load(out + ".logits.pt")
    return result
