"""The data-parallel training step without Ray: two processes train one block together
through `torch.distributed` (gloo, the two ranks sharing one device: NCCL refuses two ranks on
one GPU), on a P1-sized Llama block and, with enough memory (a GPU), a Llama-2-70B-width one
(hidden 8192, 64/8 heads, intermediate 28672). Random bf16 weights, random windows.

    python benchmarks/dp_step_check.py [--device cuda] [--sizes p1 70b] [--steps 8]

Per size and rank: seconds per optimizer step (the block's training time over its steps, the
loss probes and the fold included) and the share spent in the collective
(`TorchCollective.wait_seconds`), the reconstruction loss before/after. Needs torch and
transformers only (no Ray). Writes benchmarks/results/dp_step_check.json.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from results_file import RESULTS, write_result

SIZES = {  # Llama shapes: hidden, heads, kv heads, intermediate
    "p1": (576, 9, 3, 1536),
    "70b": (8192, 64, 8, 28672),
}


def build_block_model(folder: str, size: str) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, heads, kv, inter = SIZES[size]
    config = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=1, num_attention_heads=heads,
                         num_key_value_heads=kv, max_position_embeddings=4096,
                         tie_word_embeddings=True, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="2GB")
    return folder


def rank_main(rank: int, world: int, address: str, folder: str, device: str, steps: int,
              seq: int, out: str) -> None:
    from pipeline import block_pass
    from pipeline.config import ExportFormat, QuantizationConfig
    from pipeline.config.tree import build_config
    from pipeline.parallel.collective import TorchCollective
    from pipeline.parallel.shares import split_windows_among
    from pipeline.plan import open_model
    from pipeline.streams import MemoryStore

    torch.set_num_threads(1)
    group = TorchCollective(address, rank, world, "gloo")
    parts = open_model(folder, "float32", device)
    batch = 2 * world
    windows = steps * batch
    share = split_windows_among(windows, world, batch)[rank]
    torch.manual_seed(1)
    ids = torch.randint(0, parts.hf_config.vocab_size, (windows, seq))[list(share.indices)]
    store = MemoryStore()
    stream = block_pass.embed_stream(parts, [ids[i:i + 2] for i in range(0, len(ids), 2)],
                                     store)
    q = build_config(QuantizationConfig, {
        "method": "omniquant", "bits": 3, "group_size": 64, "omniquant": {
            "epochs": 1, "batch_size": batch, "let": True, "rounding": "learned",
            "optimizer": "signsgd", "clip_param": "direct", "lwc_init": 8.0,
            "keep_best": True}}, "quantization")
    waited = group.wait_seconds
    r = block_pass.quantize_block(parts, 0, stream, stream, q, [ExportFormat.FAKE_QUANT],
                                  store, group, share)
    train = r.metrics["train_seconds"]
    collective = group.wait_seconds - waited
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump({"rank": rank, "steps": steps, "windows_per_step": batch,
                   "train_seconds": train, "seconds_per_step": train / steps,
                   "collective_seconds": collective, "collective_share": collective / train,
                   "loss_before": r.metrics["loss_before"],
                   "loss_after": r.metrics["loss_after"]}, f)
    group.close()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="+", default=None, choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--out", default=os.path.join(RESULTS, "dp_step_check.json"))
    args = parser.parse_args(argv)
    sizes = args.sizes or (["p1", "70b"] if args.device.startswith("cuda") else ["p1"])
    result: dict = {"benchmark": "dp_step_check", "device": args.device,
                    "device_name": (torch.cuda.get_device_name() if
                                    args.device.startswith("cuda") else "cpu"),
                    "world": 2, "backend": "gloo", "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="relayquant-dpcheck-") as work:
        for size in sizes:
            folder = build_block_model(os.path.join(work, size), size)
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
            out = os.path.join(work, f"{size}-result")
            start = time.perf_counter()
            mp.spawn(rank_main, args=(2, address, folder, args.device, args.steps, args.seq,
                                      out), nprocs=2, join=True)
            ranks = []
            for rank in range(2):
                with open(f"{out}.{rank}.json") as f:
                    ranks.append(json.load(f))
            result["sizes"][size] = {"shape": SIZES[size], "ranks": ranks,
                                     "wall_seconds": time.perf_counter() - start}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
