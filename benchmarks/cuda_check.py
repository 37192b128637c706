"""The block reconstructor on CUDA against the same block on the CPU: every method, AMP on
(fp16 autocast + loss scaling, 4-bit) and off (8-bit, where fake-quant overflows fp16), tiny
Llama and Qwen2 blocks (GQA, RoPE, q/k/v biases). Needs a GPU; nothing else than torch and
transformers (no Ray): run on the lent device machine.

    python benchmarks/cuda_check.py [--out FILE]

Per case: the block's output error relative to the FP block (quantized stream, held-in data)
on each device, the training losses, the training precision, seconds. The check fails (exit 1)
when a CUDA run is not finite, did not use AMP where it should, or its error exceeds 1.5x the
CPU's.

    python benchmarks/cuda_check.py --parts quantizer speed

`quantizer`: `compile_quantizer`'s fused fake-quant (inductor's Triton kernels on CUDA) against
the eager one on 7B-sized weights: whether the outputs are equal, how many differ at all and
how many took another code, each gradient's difference (its norm over the eager gradient's),
forward + backward milliseconds of each (fails when more than 1e-4 of the codes differ or a
gradient by more than 1e-2: the clipping factors' gradient is the difference of two sums over
the group, which cancel largely, so the sums' order shows there far above float precision).
`speed`: one Llama block of 7B width (4096, 11008, 32 heads;
random weights) reconstructed with P1's W4 fast method (learned rounding, LWC + LET, sign
gradients) on 32 windows of 2048 tokens, 2 epochs of 2 windows, under each training setting
(`SPEED_VARIANTS`), each run twice in one process (the first pays the
compilations): training seconds, steps, error, peak device memory.
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
from pipeline.config.tree import build_config
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
    # compile_quantizer, cast_block and compile (Triton on CUDA, C++ on the CPU), bfloat16
    "signround_fused_w3g16": {"bits": 3, "group_size": 16, "method": "omniquant", "omniquant": {
        "epochs": 4, "batch_size": 2, "rounding": "learned", "optimizer": "signsgd",
        "keep_best": True, "autocast": "bfloat16", "compile_quantizer": True,
        "cast_block": True, "compile": True}},
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
            "output_relative_error": m["output_relative_error"],
            "precision": m.get("train_precision"),
            "loss_before": m.get("loss_before"), "loss_after": m.get("loss_after"),
            "peak_device_bytes": m.get("peak_device_bytes")}


# P1's W4 fast method (p1-signround-w4-fast), per channel asymmetric
SPEED_BASE: dict[str, Any] = {
    "bits": 4, "group_size": None, "symmetric": False, "method": "omniquant",
    "omniquant": {"lwc": True, "let": True, "let_lr": 0.005, "epochs": 2, "batch_size": 2,
                  "lwc_lr": 0.005, "clip_param": "direct", "lwc_init": 8.0,
                  "rounding": "learned", "round_lr": 0.005, "optimizer": "signsgd",
                  "keep_best": True, "stream_autocast": True}}
SPEED_VARIANTS: dict[str, dict[str, Any]] = {
    "fp16_eager": {"autocast": "auto"},  # float16 + loss scaling on CUDA
    "bf16_eager": {"autocast": "bfloat16"},
    "bf16_cq": {"autocast": "bfloat16", "compile_quantizer": True},
    "bf16_cq_cb": {"autocast": "bfloat16", "compile_quantizer": True, "cast_block": True},
    "bf16_fused": {"autocast": "bfloat16", "compile_quantizer": True, "cast_block": True,
                   "compile": True},
    "fp16_fused": {"autocast": "auto", "compile_quantizer": True, "compile": True},
}


def _fake_quant_step(clip: Any, weight: torch.Tensor, probe: torch.Tensor) -> tuple[Any, ...]:
    """One forward and backward of `clip`'s fake-quant of `weight`: (output, gradients)."""
    weight.grad = None
    clip.zero_grad(set_to_none=True)
    out = clip.fake_quantize(weight)
    (out * probe).sum().backward()
    return out.detach(), weight.grad, clip.up.grad, clip.low.grad, clip.offset.grad


def quantizer_check() -> list[dict[str, Any]]:
    """The fused (compiled) fake-quant against the eager one on CUDA, 7B-sized weights."""
    from pipeline.formats import AffineFormat
    from pipeline.methods.lwc import ClippingFactors, fused_quantizer_compiled

    rows = []
    for shape, fmt in (((11008, 4096), AffineFormat(4)), ((4096, 11008), AffineFormat(3, 64)),
                       ((4096, 4096), AffineFormat(2, 64))):
        torch.manual_seed(0)
        weight = (torch.randn(shape, device="cuda") * 0.02).requires_grad_(True)
        probe = torch.randn(shape, device="cuda")
        result: dict[str, Any] = {"shape": list(shape), "bits": fmt.bits,
                                  "group_size": fmt.group_size}
        outs = {}
        for fused in (False, True):
            clip = ClippingFactors(weight.shape, fmt, 0.0, device="cuda", learn_rounding=True,
                                   direct=True, fused=fused)
            torch.manual_seed(1)
            with torch.no_grad():
                clip.up.uniform_(0.7, 1.0)
                clip.low.uniform_(0.7, 1.0)
                clip.offset.uniform_(-0.5, 0.5)

            outs[fused] = _fake_quant_step(clip, weight, probe)
            for _ in range(3):
                _fake_quant_step(clip, weight, probe)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                _fake_quant_step(clip, weight, probe)
            end.record()
            torch.cuda.synchronize()
            result["fused_ms" if fused else "eager_ms"] = start.elapsed_time(end) / 20
        result["output_equal"] = bool(torch.equal(outs[True][0], outs[False][0]))
        # Triton's float32 division may round differently from CUDA's eager kernels: the
        # share of weights whose fake-quant value differs at all
        result["output_mismatch_fraction"] = (
            (outs[True][0] != outs[False][0]).float().mean().item())
        # a weight whose value differs by half a quantization step or more took another code;
        # below that the codes agree and the scale was rounded differently
        scale, _ = clip.qparams(weight.detach())
        steps = scale.repeat_interleave(shape[1] // scale.shape[1], dim=1)
        result["code_flip_fraction"] = (
            ((outs[True][0] - outs[False][0]).abs() >= 0.5 * steps).float().mean().item())
        result["grad_rel_norm_diff"] = {
            name: ((a - b).norm() / b.norm().clamp(min=1e-30)).item()
            for name, a, b in zip(("weight", "up", "low", "offset"), outs[True][1:],
                                  outs[False][1:], strict=True)}
        result["compiled"] = fused_quantizer_compiled()
        result["ok"] = (result["code_flip_fraction"] <= 1e-4 and result["compiled"]
                        and max(result["grad_rel_norm_diff"].values()) <= 1e-2)
        print(f"quantizer {shape} w{fmt.bits}g{fmt.group_size}: eager {result['eager_ms']:.2f} ms"
              f" fused {result['fused_ms']:.2f} ms, equal {result['output_equal']} (differing "
              f"{result['output_mismatch_fraction']:.1e}, codes {result['code_flip_fraction']:.1e})"
              f", grads {result['grad_rel_norm_diff']}  {'ok' if result['ok'] else 'FAIL'}",
              flush=True)
        rows.append(result)
    return rows


def speed_model(folder: str) -> str:
    """A two-block Llama of 7B width with random weights (a small vocabulary)."""
    from tiny_models import build_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=2048, hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=32,
                         max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.float16)
    model.save_pretrained(folder)
    build_tokenizer(folder, config.vocab_size)
    return folder


def speed(folder: str, windows: int = 32, seq_len: int = 2048) -> list[dict[str, Any]]:
    parts = open_model(speed_model(folder), "float32", "cuda")
    torch.manual_seed(0)
    store = MemoryStore()
    ids = torch.randint(0, parts.hf_config.vocab_size, (windows, seq_len))
    fp = block_pass.embed_stream(parts, list(ids.split(8)), store)
    fp = block_pass.forward_block(parts, 0, fp, store)
    rows = []
    for name, options in SPEED_VARIANTS.items():
        settings = {**SPEED_BASE, "omniquant": {**SPEED_BASE["omniquant"], **options}}
        q = build_config(QuantizationConfig, settings, "quantization")
        for attempt in (1, 2):
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            start = time.perf_counter()
            r = block_pass.quantize_block(parts, 1, fp, fp, q, [ExportFormat.FAKE_QUANT], store)
            torch.cuda.synchronize()
            m = r.metrics
            row = {"variant": name, "attempt": attempt, "options": options,
                   "seconds": time.perf_counter() - start, "train_seconds": m["train_seconds"],
                   "steps": m.get("steps"),
                   "ms_per_step": 1e3 * m["train_seconds"] / max(1, m.get("steps") or 1),
                   "output_relative_error": m["output_relative_error"],
                   "loss_before": m.get("loss_before"), "loss_after": m.get("loss_after"),
                   "precision": m.get("train_precision"),
                   "train_block_dtype": m.get("train_block_dtype"),
                   "quantizer_compiled": m.get("quantizer_compiled"),
                   "train_compiled": m.get("train_compiled"),
                   "peak_device_bytes": torch.cuda.max_memory_allocated()}
            print(f"speed {name:12s} #{attempt}: train {row['train_seconds']:.2f} s "
                  f"({row['ms_per_step']:.1f} ms/step, {row['steps']} steps), all "
                  f"{row['seconds']:.2f} s, error {row['output_relative_error']:.4e}, peak "
                  f"{row['peak_device_bytes'] / 2**30:.1f} GiB", flush=True)
            rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "cuda_check.json"))
    parser.add_argument("--parts", nargs="+", default=["check"],
                        choices=["check", "quantizer", "speed"])
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    result: dict[str, Any] = {"benchmark": "cuda_check", "device": torch.cuda.get_device_name(0),
                              "torch": torch.__version__}

    def save() -> None:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({**result, "failures": failures}, f, indent=1)

    if "quantizer" in args.parts:
        result["quantizer"] = quantizer_check()
        failures += [f"quantizer {r['shape']}" for r in result["quantizer"] if not r["ok"]]
        save()
    if "speed" in args.parts:
        with tempfile.TemporaryDirectory() as tmp:
            result["speed"] = speed(tmp)
        save()
    if "check" not in args.parts:
        print("failures:", failures or "none")
        return 1 if failures else 0
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("llama", "qwen2"):
            model = build_model(os.path.join(tmp, arch), arch, num_layers=2)
            for name, case in CASES.items():
                cpu, gpu = run(model, "cpu", case), run(model, "cuda", case)
                # AMP where the reconstructor trains and no 8-bit fake-quant is involved
                amp_expected = (case.get("method") == "omniquant" and case["bits"] < 8
                                and not 8 <= case.get("abits", 16) < 16)
                amp = gpu["precision"] not in (None, "float32")
                ok = (torch.isfinite(torch.tensor(gpu["output_relative_error"])).item()
                      and gpu["output_relative_error"] <= 1.5 * cpu["output_relative_error"] + 1e-7
                      and (gpu["precision"] is None) == (case.get("method") != "omniquant")
                      and amp == amp_expected)
                rows.append({"arch": arch, "case": name, "settings": case, "cpu": cpu,
                             "cuda": gpu, "ok": ok})
                if not ok:
                    failures.append(f"{arch}/{name}")
                print(f"{arch:6s} {name:26s} cpu {cpu['output_relative_error']:.3e} "
                      f"({cpu['seconds']:.1f}s)  cuda {gpu['output_relative_error']:.3e} "
                      f"({gpu['seconds']:.1f}s, {gpu['precision']})  {'ok' if ok else 'FAIL'}",
                      flush=True)
    result["rows"] = rows
    save()
    print("failures:", failures or "none")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
