"""Protocol P1 with a peer on this machine, to set beside relayquant's own rows measured on the
same machine: llm-compressor's `GPTQModifier` through `oneshot` (beside `p1_reconstruct.py
--rows w4:gptq`), or AutoRound's learned rounding (beside the `p1-signround-*` recipes), on the
128 P1 calibration windows, scored by `../shared/protocol/p1.py` (all 292 test windows and the
first 32).

Each peer runs in its own virtual environment (its pins differ from relayquant's), for example

    python3 -m venv /tmp/peer-venv
    /tmp/peer-venv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    /tmp/peer-venv/bin/python benchmarks/p1_peers.py --peer llmcompressor --scheme w4_pc_asym

    python3 -m venv /tmp/ar-venv
    /tmp/ar-venv/bin/pip install torch==2.13.0 auto-round==0.16.1
    /tmp/ar-venv/bin/python benchmarks/p1_peers.py --peer autoround --scheme w3_g64_asym --iters 50

AutoRound runs as its defaults say (batch 8, seed 42, learning rate 1/iters unless `--lr`, its
own choice of autocast and of `torch.compile` for this device) unless `--amp off` or
`--compile on/off` says otherwise; the row records what it chose. After `quantize()` its model
holds the fake-quantized weights, which are scored in float32 as the protocol scores any model.

The model and corpus are relayquant's P1 assets (`relayquant assets prepare`): the SmolLM2
folder and the SOTU train/test texts, split as the protocol splits them. The time is the
quantization call alone (`oneshot`, or AutoRound's `quantize()`: calibration forward and the
per-block training), as the peers' rows in `../shared/research/p1_baselines.md` were timed.
Writes benchmarks/results/p1_peer_gptq.json (llmcompressor) or p1_peer_autoround.json; rows
merge by their settings and whether `--no-eval` skipped the perplexity.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from importlib import metadata
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
PROTOCOL = os.path.join(HERE, "..", "..", "shared", "protocol")
CACHE = os.path.expanduser("~/.cache/relayquant")
RESULT_FILES = {"llmcompressor": "p1_peer_gptq.json", "autoround": "p1_peer_autoround.json"}


def weights_scheme(scheme: tuple) -> dict:
    """llm-compressor's weight quantization arguments for a P1 scheme (bits, group, symmetric)."""
    bits, group, symmetric = scheme
    args = {"num_bits": bits, "type": "int", "symmetric": symmetric,
            "strategy": "channel" if group == -1 else "group"}
    if group != -1:
        args["group_size"] = group
    return args


def run_llmcompressor(model: Any, calib: torch.Tensor, scheme: tuple, seqlen: int,
                      _args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    data = Dataset.from_dict({"input_ids": calib.tolist(),
                              "attention_mask": torch.ones_like(calib).tolist()})
    recipe = GPTQModifier(ignore=["lm_head"], config_groups={"group_0": {
        "targets": ["Linear"], "weights": weights_scheme(scheme)}})
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=seqlen,
            num_calibration_samples=calib.shape[0])
    return model, {"peer": f"llmcompressor {metadata.version('llmcompressor')}"}


def run_autoround(model: Any, calib: torch.Tensor, scheme: tuple, seqlen: int,
                  args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from auto_round import AutoRound

    bits, group, symmetric = scheme
    options: dict[str, Any] = {"iters": args.iters, "nsamples": calib.shape[0],
                               "seqlen": seqlen, "batch_size": args.batch_size,
                               "device_map": "cpu"}
    if args.lr is not None:
        options["lr"] = args.lr
    if args.amp == "off":
        options["amp"] = False
    if args.compile != "auto":
        options["enable_torch_compile"] = args.compile == "on"
    # one [1, seqlen] tensor per window: AutoRound takes a list of token tensors as its data
    data = [calib[i:i + 1] for i in range(calib.shape[0])]
    tuner = AutoRound(model, args.tokenizer, bits=bits, sym=symmetric,
                      group_size=-1 if group == -1 else group, dataset=data, **options)
    tuner.quantize()
    chosen = {"peer": f"auto-round {metadata.version('auto-round')}", "iters": args.iters,
              "lr": args.lr, "batch_size": args.batch_size, "amp_requested": args.amp,
              "compile_requested": args.compile}
    context = getattr(tuner, "model_context", None)
    chosen["amp_dtype"] = str(getattr(context, "amp_dtype", None))
    chosen["amp"] = getattr(context, "amp", None)
    chosen["torch_compile"] = getattr(tuner, "enable_torch_compile", None)
    quantized = getattr(context, "model", None) or tuner.model
    return quantized, chosen


PEERS = {"llmcompressor": run_llmcompressor, "autoround": run_autoround}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", default="llmcompressor", choices=sorted(PEERS))
    parser.add_argument("--scheme", default="w4_pc_asym")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=200, help="autoround: steps per block")
    parser.add_argument("--lr", type=float, default=None,
                        help="autoround: learning rate (default: its own, 1/iters)")
    parser.add_argument("--batch-size", type=int, default=8, help="autoround: windows per step")
    parser.add_argument("--amp", default="auto", choices=["auto", "off"],
                        help="autoround: its own autocast choice, or float32 throughout")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                        help="autoround: its own torch.compile choice, or forced")
    parser.add_argument("--model", default=os.path.join(CACHE, "models", "smollm2-135m"))
    parser.add_argument("--corpus", default=os.path.join(CACHE, "corpora", "sotu"))
    parser.add_argument("--out", default=None,
                        help="results file (default: benchmarks/results/" +
                        " or ".join(RESULT_FILES.values()) + ")")
    parser.add_argument("--no-eval", action="store_true",
                        help="time the quantization only (the row keeps no perplexity)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(HERE, "results", RESULT_FILES[args.peer])
    sys.path.insert(0, PROTOCOL)
    import p1  # the protocol's windows and scoring

    if args.scheme not in p1.SCHEMES:
        parser.error(f"--scheme: {args.scheme!r}; choose one of {', '.join(p1.SCHEMES)}")

    def split(_data_dir: str | None = None) -> tuple[str, str]:
        texts = []
        for part in ("train", "test"):
            with open(os.path.join(args.corpus, f"{part}.txt"), encoding="utf-8") as f:
                texts.append(f.read())
        return texts[0], texts[1]

    p1.load_split = split  # relayquant's asset holds the protocol's two joined texts
    torch.set_num_threads(args.threads)
    tok = p1.load_tokenizer(args.model)
    args.tokenizer = tok
    model = p1.load_model(args.model)
    calib = p1.calibration_windows(tok)
    start = time.perf_counter()
    model, settings = PEERS[args.peer](model, calib, p1.SCHEMES[args.scheme], p1.SEQLEN, args)
    seconds = time.perf_counter() - start
    model = model.float().eval()  # the protocol scores in float32 whatever the peer tuned in
    scores = None if args.no_eval else p1.evaluate(model, tok)
    row = {"scheme": args.scheme, **settings,
           "torch": torch.__version__, "threads": args.threads, "quantize_seconds": seconds,
           "perplexity": scores and scores["full"]["ppl"],
           "perplexity_quick": scores and scores["quick"]["ppl"],
           "eval_windows": scores and scores["full"]["n_windows"],
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    result = {"benchmark": f"p1_peer_{args.peer}", "rows": []}
    if os.path.exists(out):
        with open(out) as f:
            result = json.load(f)

    def key(r: dict) -> tuple:
        return (r["scheme"], r["threads"], r.get("iters"), r.get("amp_requested"),
                r.get("compile_requested"), r.get("lr"), r.get("perplexity") is None)

    result["rows"] = [r for r in result["rows"] if key(r) != key(row)] + [row]
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, out)
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
