"""A stage's peak memory must not grow with the model's depth.

Builds two Llama models that differ only in depth (default 4 and 32 blocks of ~50 MB each, so
holding the deep one whole would add ~1.5 GB), quantizes each with ONE stage that owns every
block, and compares the stage's peak RSS. Writes benchmarks/results/depth_memory.json.

    python benchmarks/depth_memory.py [--shallow 4] [--deep 32] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from tiny_models import build_tokenizer, corpus_text

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 1024, 2816, 16, 4, 320


sys.path.insert(0, os.path.dirname(__file__))
from results_file import write_result


def block_tensors(i: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    p = f"model.layers.{i}."
    head_dim = HIDDEN // HEADS
    shapes = {
        "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        "self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
        "self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN),
        "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
        "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
    }
    out = {p + k: torch.randn(s, generator=generator) * 0.02 for k, s in shapes.items()}
    out[p + "input_layernorm.weight"] = torch.ones(HIDDEN)
    out[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN)
    return out


def build_deep_model(folder: str, depth: int) -> int:
    """Write the checkpoint shard by shard (never the whole model in memory); returns bytes
    per block."""
    from transformers import LlamaConfig

    os.makedirs(folder, exist_ok=True)
    LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                num_hidden_layers=depth, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                tie_word_embeddings=True, architectures=["LlamaForCausalLM"]
                ).save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    weight_map, total, per_block = {}, 0, 0
    base = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=generator) * 0.02,
            "model.norm.weight": torch.ones(HIDDEN)}
    shards = [("model-base.safetensors", base)]
    for i in range(depth):
        shards.append((f"model-block-{i:03d}.safetensors", block_tensors(i, generator)))
    for name, tensors in shards:
        save_file(tensors, os.path.join(folder, name), {"format": "pt"})
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        total += size
        per_block = size if name != "model-base.safetensors" else per_block
        weight_map.update({t: name for t in tensors})
        del tensors
    shards.clear()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    build_tokenizer(folder, VOCAB)
    return per_block


def stage_peak(model: str, work: str, corpus: str) -> dict:
    from cluster.coordinator import quantize
    from pipeline.config import RunConfig
    from pipeline.config.tree import build_config

    config = build_config(RunConfig, {
        "model": {"path": model}, "output": os.path.join(work, "out-" + os.path.basename(model)),
        "calibration": {"corpus": corpus, "num_samples": 8, "seq_len": 64},
        "quantization": {"bits": 4, "group_size": 64}, "eval": {"enabled": False},
        "cluster": {"workers": 1, "chunk_size": 4}})
    start = time.perf_counter()
    report = quantize(config)
    peaks = [b["peak_rss_bytes"] for b in report["blocks"]]
    return {"blocks": len(peaks), "stage_peak_rss_bytes": max(peaks),
            "peak_after_first_block": peaks[0], "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shallow", type=int, default=4)
    parser.add_argument("--deep", type=int, default=32)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "depth_memory.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="relayquant-depth-") as work:
        corpus = os.path.join(work, "corpus.txt")
        with open(corpus, "w") as f:
            f.write(corpus_text(20000))
        runs = {}
        for depth in (args.shallow, args.deep):
            model = os.path.join(work, f"llama-{depth}")
            block_bytes = build_deep_model(model, depth)
            runs[depth] = stage_peak(model, work, corpus)
            runs[depth]["block_bytes"] = block_bytes
    shallow, deep = runs[args.shallow], runs[args.deep]
    result = {
        "benchmark": "depth_memory", "workers": 1,
        "block_bytes": deep["block_bytes"],
        "deep_model_bytes": deep["block_bytes"] * args.deep,
        "runs": {str(k): v for k, v in runs.items()},
        "peak_ratio_deep_over_shallow": deep["stage_peak_rss_bytes"] /
        shallow["stage_peak_rss_bytes"],
        "target_ratio": 1.15,
    }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
