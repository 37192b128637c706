"""Protocol P1 with a peer's GPTQ on this machine, to set beside relayquant's own GPTQ rows
measured on the same machine (`p1_reconstruct.py --rows w4:gptq`): llm-compressor's
`GPTQModifier` through `oneshot`, the 128 P1 calibration windows, scored by
`../shared/protocol/p1.py` (all 292 test windows and the first 32).

It runs in the peer's own virtual environment (its pins differ from relayquant's), for example

    python3 -m venv /tmp/peer-venv
    /tmp/peer-venv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    /tmp/peer-venv/bin/python benchmarks/p1_peer_gptq.py --scheme w4_pc_asym

The model and corpus are relayquant's P1 assets (`relayquant assets prepare`): the SmolLM2
folder and the SOTU train/test texts, split as the protocol splits them. The time is the
`oneshot` call alone (the peers' rows in `../shared/research/p1_baselines.md` were timed so).
Writes benchmarks/results/p1_peer_gptq.json (rows merge by scheme, threads and whether
`--no-eval` skipped the perplexity).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from importlib import metadata

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
PROTOCOL = os.path.join(HERE, "..", "..", "shared", "protocol")
CACHE = os.path.expanduser("~/.cache/relayquant")


def weights_scheme(name: str, schemes: dict) -> dict:
    """llm-compressor's weight quantization arguments for a P1 scheme name."""
    bits, group, symmetric = schemes[name]
    args = {"num_bits": bits, "type": "int", "symmetric": symmetric,
            "strategy": "channel" if group == -1 else "group"}
    if group != -1:
        args["group_size"] = group
    return args


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", default="w4_pc_asym")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=os.path.join(CACHE, "models", "smollm2-135m"))
    parser.add_argument("--corpus", default=os.path.join(CACHE, "corpora", "sotu"))
    parser.add_argument("--out", default=os.path.join(HERE, "results", "p1_peer_gptq.json"))
    parser.add_argument("--no-eval", action="store_true",
                        help="time the quantization only (the row keeps no perplexity)")
    args = parser.parse_args(argv)
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
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    torch.set_num_threads(args.threads)
    tok = p1.load_tokenizer(args.model)
    model = p1.load_model(args.model)
    calib = p1.calibration_windows(tok)
    data = Dataset.from_dict({"input_ids": calib.tolist(),
                              "attention_mask": torch.ones_like(calib).tolist()})
    recipe = GPTQModifier(ignore=["lm_head"], config_groups={"group_0": {
        "targets": ["Linear"], "weights": weights_scheme(args.scheme, p1.SCHEMES)}})
    start = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=p1.SEQLEN,
            num_calibration_samples=calib.shape[0])
    seconds = time.perf_counter() - start
    scores = None if args.no_eval else p1.evaluate(model, tok)
    row = {"scheme": args.scheme, "peer": f"llmcompressor {metadata.version('llmcompressor')}",
           "torch": torch.__version__, "threads": args.threads, "quantize_seconds": seconds,
           "perplexity": scores and scores["full"]["ppl"],
           "perplexity_quick": scores and scores["quick"]["ppl"],
           "eval_windows": scores and scores["full"]["n_windows"],
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    result = {"benchmark": "p1_peer_gptq", "rows": []}
    if os.path.exists(args.out):
        with open(args.out) as f:
            result = json.load(f)
    result["rows"] = [r for r in result["rows"]
                      if (r["scheme"], r["threads"], r.get("perplexity") is None)
                      != (args.scheme, args.threads, row["perplexity"] is None)] + [row]
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.out)
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
