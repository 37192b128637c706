"""A model larger than this machine's RAM at Llama-2-70B's width, quantized end to end.

Writes a synthetic Llama with Llama-2-70B's block shapes (hidden 8192, 64 query / 8 key-value
heads of 128, intermediate 28672, vocabulary 32000, bf16, untied head; seeded random weights of
a trained model's scale) one shard per block, never whole in memory (a subprocess builds it, so
the driver's memory starts clean). With the default 17 blocks the checkpoint is ~30 GB against
24 GB of RAM. Then, on 2 workers, with the memory of every process involved (the driver, each
stage actor, Ray's raylet / GCS / object store) sampled twice a second:

- RTN W4 g128 (data-free) on the whole model, then a few evaluation windows on the output;
- the same at half the depth (the same shards, a shorter index), for the stage peak's growth
  with depth (target: deep / shallow <= 1.15);
- GPTQ W4 g128 on a few calibration windows, over the first `--gptq-blocks` blocks, on
  min(2, blocks) workers, or fewer where the pre-flight memory check refuses two (each
  data-parallel worker holds a block's Hessians: 14.5 GiB per worker against 11.8 GiB each on
  24 GiB; the refusal is recorded). A block takes ~7 min on 2 cores, all 17 about 2 h;
- the output's codes for sampled linears against an independent RTN written here.

    python benchmarks/larger_than_ram.py [--blocks 17] [--gptq-blocks N] [--work DIR]

Writes benchmarks/results/larger_than_ram.json. Needs ~30 GB (+ ~9 GB of output) of free disk
under --work (default: a temporary folder, removed at the end).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from memory_sampler import MemorySampler
from results_file import RESULTS, write_result

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 8192, 28672, 64, 8, 128, 32000
GiB = 2**30


# --- the synthetic model ----------------------------------------------------------------------

def block_shapes() -> dict[str, tuple[int, ...]]:
    return {
        "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
        "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
        "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
        "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        "input_layernorm.weight": (HIDDEN,),
        "post_attention_layernorm.weight": (HIDDEN,),
    }


def _weight(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """bf16, filled a slice of rows at a time (the float32 draw of a 28672 x 8192 weight would
    be ~1 GB). Linears: N(0, 1/in_features) with heavier tails on a few input channels, as in
    trained LLMs (outlier features); norms: around 1."""
    if len(shape) == 1:
        return (1.0 + 0.1 * torch.randn(shape, generator=generator)).to(torch.bfloat16)
    rows, cols = shape
    out = torch.empty(shape, dtype=torch.bfloat16)
    outliers = torch.ones(cols)
    outliers[torch.randperm(cols, generator=generator)[: max(1, cols // 512)]] = 8.0
    std = cols ** -0.5
    for r in range(0, rows, 2048):
        n = min(2048, rows - r)
        out[r:r + n] = (torch.randn(n, cols, generator=generator) * std * outliers).bfloat16()
    return out


def synthetic_config(blocks: int) -> dict[str, Any]:
    """config.json's fields for the synthetic model (Llama-2-70B's, at `blocks` blocks)."""
    return {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": HIDDEN,
            "intermediate_size": INTERMEDIATE, "num_hidden_layers": blocks,
            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16"}


def build_model(folder: str, blocks: int, seed: int = 0) -> int:
    """The checkpoint under `folder`, a shard per block; returns its bytes."""
    from safetensors.torch import save_file
    from tiny_models import build_tokenizer
    from transformers import LlamaConfig

    os.makedirs(folder, exist_ok=True)
    LlamaConfig(**synthetic_config(blocks)).save_pretrained(folder)
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    shards: list[tuple[str, dict[str, tuple[int, ...]]]] = [
        ("model-embed.safetensors", {"model.embed_tokens.weight": (VOCAB, HIDDEN)})]
    shards += [(f"model-block-{i:03d}.safetensors",
                {f"model.layers.{i}.{k}": s for k, s in block_shapes().items()})
               for i in range(blocks)]
    shards.append(("model-head.safetensors", {"model.norm.weight": (HIDDEN,),
                                              "lm_head.weight": (VOCAB, HIDDEN)}))
    for file, shapes in shards:
        tensors = {name: _weight(shape, generator) for name, shape in shapes.items()}
        save_file(tensors, os.path.join(folder, file), {"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({name: file for name in tensors})
        del tensors
        print(f"built {file}", flush=True)
    write_index(folder, weight_map, total)
    build_tokenizer(folder, VOCAB)
    return total


def write_index(folder: str, weight_map: dict[str, str], total: int) -> None:
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)


def shallower(deep: str, folder: str, blocks: int) -> int:
    """The same model cut to its first `blocks` blocks: links to the deep one's shards (no
    copy), a config and an index naming only those."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(deep, "config.json")) as f:
        config = json.load(f)
    config["num_hidden_layers"] = blocks
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(deep, "model.safetensors.index.json")) as f:
        index = json.load(f)["weight_map"]
    keep = {n: file for n, file in index.items()
            if not n.startswith("model.layers.") or int(n.split(".")[2]) < blocks}
    for file in sorted(set(keep.values())):
        os.symlink(os.path.join(deep, file), os.path.join(folder, file))
    for name in os.listdir(deep):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            shutil.copy(os.path.join(deep, name), folder)
    total = sum(os.path.getsize(os.path.join(folder, f)) for f in set(keep.values()))
    write_index(folder, keep, total)
    return total


# --- memory of every process ------------------------------------------------------------------

def run(model: str, out: str, corpus: str, method: str, eval_windows: int,
        workers: int = 2) -> dict[str, Any]:
    from cluster.coordinator import quantize
    from pipeline.config import RunConfig
    from pipeline.config.tree import build_config

    config = build_config(RunConfig, {
        "model": {"path": model}, "output": out,
        "calibration": {"corpus": corpus, "num_samples": 4, "seq_len": 128},
        "quantization": {"method": method, "bits": 4, "group_size": 128},
        "eval": {"corpus": corpus, "seq_len": 128, "max_windows": eval_windows or None,
                 "fp": False, "enabled": eval_windows > 0},
        "cluster": {"workers": workers}})
    from jobs.plan import local_shards
    from pipeline.planning.device_rates import disk_read_bytes_per_second

    # the disk as the run will find it (the cost model's input; a virtual disk may serve
    # recently written shards from the host's cache, so a rate probed at another time, or
    # on another machine, describes another disk)
    disk = disk_read_bytes_per_second(local_shards(model))
    start = time.perf_counter()
    with MemorySampler() as sampler:
        report = quantize(config)
    blocks = report["blocks"]
    return {"method": method, "blocks": len(blocks), "workers": workers,
            "disk_read_bytes_per_second": disk,
            "wall_seconds": time.perf_counter() - start,
            "quantize_seconds": report.get("phase_seconds", {}).get("quantize"),
            "phase_seconds": report.get("phase_seconds"),
            "perplexity": (report.get("perplexity") or {}).get("quantized"),
            "eval_windows": eval_windows,
            "block_seconds": [round(b["seconds"], 2) for b in blocks],
            "stage_reported_peak_rss_bytes": max(b["peak_rss_bytes"] for b in blocks),
            "block_peak_rss_bytes": [b["peak_rss_bytes"] for b in blocks],
            "memory": sampler.summary(), "memory_by_phase": phase_peaks(sampler, report)}


def phase_peaks(sampler: MemorySampler, report: dict[str, Any]) -> dict[str, Any]:
    """The peaks within each phase of the run (the report's phase seconds, in order)."""
    out, at = {}, 0.0
    for phase, seconds in (report.get("phase_seconds") or {}).items():
        out[phase] = sampler.summary(at, at + seconds)
        at += seconds
    return out


def independent_rtn_check(model: str, out: str, names: list[str]) -> list[dict[str, Any]]:
    """The output's 4-bit codes of `names` against min-max RTN (groups of 128, asymmetric,
    min clamped to <= 0 and max to >= 0, scales stored in bf16) computed here from the input
    weights with plain torch and an unpacker written here."""
    from safetensors import safe_open

    def tensor(folder: str, name: str) -> torch.Tensor:
        with open(os.path.join(folder, "model.safetensors.index.json")) as f:
            file = json.load(f)["weight_map"][name]
        with safe_open(os.path.join(folder, file), "pt") as f:
            return f.get_tensor(name)

    rows = []
    for name in names:
        w = tensor(model, f"{name}.weight").float()
        x = w.reshape(w.shape[0], -1, 128)
        lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
        exact = ((hi - lo) / 15).clamp(min=1e-8)
        # relayquant's convention: the zero point from the exact scale, the codes from the
        # scale as stored (bf16), so that (q - zero) * stored_scale is what loads
        zero = torch.round(-lo / exact)
        scale = exact.bfloat16().float()
        codes = (torch.round(x / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, 15)
        packed = tensor(out, f"{name}.weight_packed").to(torch.int64) & 0xFFFFFFFF
        # 4 bits: eight values per int32 word, the first in the lowest bits (signed, offset 8)
        stored = torch.stack([(packed >> (4 * i)) & 15 for i in range(8)], -1).reshape(w.shape)
        zp = tensor(out, f"{name}.weight_zero_point").to(torch.int64) & 0xFFFFFFFF
        zp = torch.stack([(zp >> (4 * i)) & 15 for i in range(8)], 1).reshape(-1, zp.shape[1])
        theirs = (stored.reshape(x.shape) - zp[: w.shape[0]].unsqueeze(-1)).float()
        mine = codes - zero.unsqueeze(-1)
        rows.append({"linear": name, "shape": list(w.shape),
                     "codes_differing": int((theirs != mine).sum()),
                     "scales_equal": bool(torch.equal(
                         tensor(out, f"{name}.weight_scale").float(), scale))})
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=17)
    parser.add_argument("--gptq-blocks", type=int, default=None,
                        help="GPTQ on the first N blocks (default: all of them; 0: skip)")
    parser.add_argument("--eval-windows", type=int, default=2)
    parser.add_argument("--work", default=None, help="folder for the model and outputs")
    parser.add_argument("--keep", nargs="*", default=[],
                        help="runs already in --out to keep instead of redoing (rtn_deep ...)")
    parser.add_argument("--build-only", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(RESULTS, "larger_than_ram.json"))
    args = parser.parse_args(argv)
    if args.gptq_blocks is None:
        args.gptq_blocks = args.blocks
    if args.build_only:
        build_model(args.build_only, args.blocks)
        return {}
    logging.basicConfig(level=logging.INFO, format="relayquant: %(message)s")
    work = args.work or tempfile.mkdtemp(prefix="relayquant-ltr-")
    try:
        return measure(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, work: str) -> dict[str, Any]:
    from tiny_models import corpus_text

    deep = os.path.join(work, f"llama70b-width-{args.blocks}")
    started = time.perf_counter()
    built = not os.path.exists(os.path.join(deep, "model.safetensors.index.json"))
    if built:
        subprocess.run([sys.executable, __file__, "--blocks", str(args.blocks),
                        "--build-only", deep], check=True)
    build_seconds = time.perf_counter() - started
    with open(os.path.join(deep, "model.safetensors.index.json")) as f:
        checkpoint_bytes = json.load(f)["metadata"]["total_size"]
    corpus = os.path.join(work, "corpus.txt")
    with open(corpus, "w") as f:
        f.write(corpus_text(20000))
    ram = psutil.virtual_memory().total
    result: dict[str, Any] = {
        "benchmark": "larger_than_ram", "blocks": args.blocks,
        "checkpoint_bytes": checkpoint_bytes, "machine_ram_bytes": ram,
        "checkpoint_over_ram": checkpoint_bytes / ram, "cpus": psutil.cpu_count(),
        "build_seconds": build_seconds, "runs": {}}
    if args.keep and os.path.exists(args.out):
        with open(args.out) as f:
            kept = json.load(f)
        result["runs"] = {k: v for k, v in kept.get("runs", {}).items() if k in args.keep}
        # the build's time only where this run did not build the model itself
        carried = ("rtn_check",) + (("build_seconds",) if not built else ()) + (
            ("gptq_refused",) if "gptq" in args.keep else ())
        result.update({k: v for k, v in kept.items() if k in carried})
    half = args.blocks // 2
    shallow = os.path.join(work, f"llama70b-width-{half}")
    if not os.path.exists(shallow):
        shallower(deep, shallow, half)
    for label, model, method, windows in (
            ("rtn_deep", deep, "rtn", args.eval_windows),
            ("rtn_half_depth", shallow, "rtn", 0)):
        if label in result["runs"]:
            continue
        out = os.path.join(work, f"out-{label}")
        result["runs"][label] = run(model, out, corpus, method, windows)
        if label == "rtn_deep":
            result["rtn_check"] = independent_rtn_check(model, out, [
                "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                f"model.layers.{args.blocks - 1}.mlp.gate_proj",
                f"model.layers.{args.blocks // 2}.self_attn.k_proj"])
        shutil.rmtree(out, ignore_errors=True)
        write_result(args.out, summarize(result))
    if args.gptq_blocks:
        cut = os.path.join(work, f"llama70b-width-{args.gptq_blocks}")
        if not os.path.exists(cut):
            shallower(deep, cut, args.gptq_blocks)
        out = os.path.join(work, "out-gptq")
        # two workers (one per block at most); where the pre-flight memory check refuses them
        # (each data-parallel worker holds every Hessian of a block), the most that fit, with
        # the refusal recorded
        from pipeline.config import ConfigError

        result.pop("gptq_refused", None)
        for workers in range(min(2, args.gptq_blocks), 0, -1):
            try:
                result["runs"]["gptq"] = run(cut, out, corpus, "gptq", 0, workers=workers)
                break
            except ConfigError as e:
                if "would need" not in str(e):
                    raise
                result.setdefault("gptq_refused", []).append(
                    {"workers": workers, "error": str(e)})
                print(f"gptq on {workers} workers refused: {e}", flush=True)
            finally:
                shutil.rmtree(out, ignore_errors=True)
    return write_and_return(args.out, summarize(result))


def _quantization_peak(run: dict[str, Any], key: str) -> int:
    """The peak over every phase but the evaluation."""
    phases = [m for phase, m in run["memory_by_phase"].items() if phase != "evaluate"]
    return max((m[key] for m in phases), default=0)


def _stage_peak(run: dict[str, Any]) -> int:
    phases = [m for phase, m in run["memory_by_phase"].items() if phase != "evaluate"]
    return max((max(m["stage_peaks_bytes"], default=0) for m in phases), default=0)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    runs = result["runs"]
    size = result["checkpoint_bytes"]
    if "rtn_deep" in runs:
        deep = runs["rtn_deep"]
        quantization = _quantization_peak(deep, "peak_total_rss_bytes")
        result["rtn_quantization_peak_total_rss_over_checkpoint"] = quantization / size
        result["rtn_target_met"] = quantization < 0.25 * size
        result["rtn_whole_run_peak_total_rss_over_checkpoint"] = (
            deep["memory"]["peak_total_rss_bytes"] / size)
    if "rtn_deep" in runs and "rtn_half_depth" in runs:
        # each stage's own peak (ru_maxrss) over its blocks, as its block markers report it
        result["stage_peak_ratio_deep_over_half"] = (
            runs["rtn_deep"]["stage_reported_peak_rss_bytes"]
            / runs["rtn_half_depth"]["stage_reported_peak_rss_bytes"])
        sampled = [_stage_peak(runs[k]) for k in ("rtn_deep", "rtn_half_depth")]
        if all(sampled):
            result["sampled_stage_peak_ratio_deep_over_half"] = sampled[0] / sampled[1]
    if "gptq" in runs:
        used = runs["gptq"]["memory"]["peak_used_above_idle_bytes"]
        result["gptq_margin_under_ram_bytes"] = result["machine_ram_bytes"] - used
        peaks = runs["gptq"].get("block_peak_rss_bytes") or []
        if len(peaks) > 1:  # the stage's peak by depth: the last block's over the first's
            result["gptq_stage_peak_last_over_first"] = peaks[-1] / peaks[0]
    return result


def write_and_return(path: str, result: dict[str, Any]) -> dict[str, Any]:
    write_result(path, result)
    return result


if __name__ == "__main__":
    main()
