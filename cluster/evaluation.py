"""Forward-only passes through the stages: perplexity (data-parallel shares or chunks pipelined
through the stages), the FP perplexity from the user cache, and `relayquant eval`."""
from __future__ import annotations

import logging
import math
import time
from typing import Any

import ray
import torch

from cluster import runtime
from cluster.stages import Stages, absolute, gather, report_progress, start_stages
from pipeline import calibration
from pipeline.assets import resolve_model_path
from pipeline.config import (
    ClusterConfig,
    EvalConfig,
    RunConfig,
)
from pipeline.evaluation import perplexity_cache
from pipeline.formats.peft_adapter import adapter_folder, check_adapter, read_adapter
from pipeline.plan import make_plan, open_model
from pipeline.streams import split_windows

log = logging.getLogger(__name__)


def stream_perplexity(stages: Stages, model_path: str, windows: torch.Tensor,
                      label: str, abits: int = 16, lorc: str | None = None) -> dict[str, Any]:
    """Perplexity, forward only (with abits < 16, the quantized linears' inputs fake-quantized
    per token; with `lorc`, that LoRA adapter folder merged into the weights). Data-parallel:
    each worker takes a contiguous share of the windows through every block; sequential: the
    chunks are pipelined through the stages (stage k works on chunk c while stage k+1 works on
    chunk c-1)."""
    start = time.perf_counter()
    ended: list[dict[str, Any]] | None = None
    if stages.data_parallel:
        shares = torch.tensor_split(windows, len(stages.actors))
        parts = gather([a.dp_perplexity.remote(model_path, share, stages.chunk_size, abits, lorc)
                        for a, share in zip(stages.actors, shares, strict=True)])
    else:
        parts, ended = pipelined_scores(stages, model_path, windows, abits, label, start, lorc)
    nll = sum(p[0] for p in parts)
    count = sum(p[1] for p in parts)
    seconds = time.perf_counter() - start
    log.info("eval %s: %d windows in %.1fs%s", label, windows.shape[0], seconds,
             "" if ended is None else
             " (stages busy " + ", ".join(f"{e['busy_seconds']:.1f}s" for e in ended)
             + f", {'/'.join(str(e['threads']) for e in ended)} threads)")
    return {"perplexity": math.exp(nll / count), "windows": int(windows.shape[0]),
            "tokens": count, "seconds": seconds,
            **({} if ended is None else
               {"stage_busy_seconds": [e["busy_seconds"] for e in ended],
                "stage_threads": [e["threads"] for e in ended]})}


def pipelined_scores(stages: Stages, model_path: str, windows: torch.Tensor, abits: int,
                     label: str, start: float, lorc: str | None = None
                     ) -> tuple[list[tuple[float, int]], list[dict[str, Any]]]:
    """Each chunk through every stage and scored on the last; all chunks submitted at once, so
    Ray runs stage k's chunk c beside stage k+1's chunk c-1 (an actor runs its tasks in
    submission order). Each stage keeps its blocks loaded for the pass. Returns the chunks'
    (NLL, tokens) and, per stage, the seconds it spent computing and its torch threads."""
    ids_chunks = split_windows(windows, stages.chunk_size)
    refs = []
    try:
        begin_pipelined(stages)
        for ids in ids_chunks:
            h = stages.actors[0].embed_chunk.remote(model_path, ids, lorc)
            for actor, (a, b) in zip(stages.actors, stages.plan.stages, strict=True):
                h = actor.forward_chunk.remote(model_path, a, b, h, abits, lorc)
            refs.append(stages.actors[-1].score_chunk.remote(model_path, h, ids, lorc))
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)
            report_progress(f"eval {label}", len(refs) - len(pending), len(refs), start, "chunks")
        scores = ray.get(refs)
    finally:
        ended = gather([a.release_blocks.remote() for a in stages.actors])
    return scores, ended


def begin_pipelined(stages: Stages) -> None:
    gather([a.begin_pipelined.remote(stages.pipeline_threads) for a in stages.actors])


def pipelined_forward(stages: Stages, model_path: str, ids_chunks: list[torch.Tensor],
                      start: float) -> tuple[list[list[Any]], list[Any]]:
    """The chunks through every stage, pipelined as in `pipelined_scores`; returns the stream
    entering each stage and the stream leaving the last (object refs, chunk by chunk)."""
    inputs: list[list[Any]] = [[] for _ in stages.actors]
    stream = []
    try:
        begin_pipelined(stages)
        for ids in ids_chunks:
            h = stages.actors[0].embed_chunk.remote(model_path, ids)
            for s, (actor, (a, b)) in enumerate(zip(stages.actors, stages.plan.stages,
                                                    strict=True)):
                inputs[s].append(h)
                h = actor.forward_chunk.remote(model_path, a, b, h)
            stream.append(h)
        pending = list(stream)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)
            report_progress("sensitivity forward", len(stream) - len(pending), len(stream), start,
                      "chunks")
    finally:
        gather([a.release_blocks.remote() for a in stages.actors])
    return inputs, stream


def evaluate_run(stages: Stages, config: RunConfig, model_path: str,
                   windows: torch.Tensor | None) -> dict[str, Any] | None:
    if windows is None:
        return None
    fp = cached_fp_perplexity(stages, model_path, windows, config.eval) if config.eval.fp \
        else None
    adapter = (adapter_folder(config.output) if config.quantization.lorc is not None
               else None)
    quant = stream_perplexity(stages, config.output, windows, "quantized",
                              config.quantization.abits, adapter)
    # LoRC: "quantized" is the model as it runs (with the adapter); this is without it
    bare = (stream_perplexity(stages, config.output, windows, "quantized without lorc",
                              config.quantization.abits)
            if adapter is not None and config.eval.without_lorc else None)
    log.info("perplexity on %s: quantized %.4f%s%s", config.eval.corpus, quant["perplexity"],
             "" if bare is None else f", without LoRC {bare['perplexity']:.4f}",
             f", FP {fp['perplexity']:.4f}" if fp else "")
    return {"fp": fp["perplexity"] if fp else None, "quantized": quant["perplexity"],
            **({"quantized_without_lorc": bare["perplexity"]} if bare is not None else {}),
            "corpus": config.eval.corpus, "windows": quant["windows"],
            "seq_len": config.eval.seq_len, "tokens": quant["tokens"],
            "fp_from_cache": fp["cache"] if fp and "cache" in fp else None,
            "seconds": {"fp": fp["seconds"] if fp else None, "quantized": quant["seconds"]}}


def output_depth_errors(stages: Stages, config: RunConfig, model_path: str, ids: torch.Tensor
                        ) -> list[float]:
    """Each block's error at the model's output depth, on one worker (`eval.depth_errors`)."""
    adapter = (adapter_folder(config.output) if config.quantization.lorc is not None else None)
    errors = ray.get(stages.actors[0].depth_errors.remote(
        model_path, config.output, ids, config.quantization.abits, adapter))
    worst = max(range(len(errors)), key=errors.__getitem__)
    log.info("output-depth errors on %d windows: block %d the largest (%.3e), mean %.3e",
             ids.shape[0], worst + 1, errors[worst], sum(errors) / len(errors))
    return errors


def cached_fp_perplexity(stages: Stages, model_path: str, windows: torch.Tensor,
                         eval_config: EvalConfig) -> dict[str, Any]:
    """The FP perplexity from the user cache when this model, these windows and this code
    were evaluated before; computed and cached otherwise."""
    key = perplexity_cache.cache_key(model_path, windows, eval_config.seq_len)
    cached = perplexity_cache.read_cached(key)
    if cached is not None:
        log.info("eval fp: %.4f reused from %s (same model files, windows and code)",
                 cached["perplexity"], perplexity_cache.cache_path(key))
        return {**cached, "seconds": 0.0, "cache": perplexity_cache.cache_path(key)}
    fp = stream_perplexity(stages, model_path, windows, "fp")
    perplexity_cache.write_cached(key, {k: fp[k] for k in ("perplexity", "windows", "tokens")}
                                  | {"computed_seconds": fp["seconds"]})
    return fp


def evaluate(model_path: str, eval_config: EvalConfig, cluster: ClusterConfig,
             abits: int = 16, lorc: bool = True) -> dict[str, Any]:
    """`relayquant eval`: perplexity of a model folder, streamed through stage actors; with
    its LoRC adapter (MODEL/lorc/) merged into the weights when it has one, unless `lorc` is
    false."""
    model_path = absolute(resolve_model_path(model_path))
    parts = open_model(model_path, cluster.compute_dtype)
    parts.check_shapes()
    adapter = adapter_folder(model_path) if lorc else None
    if adapter is not None:  # refused here, not inside a worker after Ray has started
        check_adapter(read_adapter(adapter), parts, adapter)
    plan = make_plan(parts, model_path, cluster.workers)
    windows = calibration.eval_windows_for(model_path, eval_config)
    with runtime.ray_session(cluster):
        stages, group = start_stages(plan, cluster)
        try:
            result = stream_perplexity(stages, model_path, windows, "model", abits, adapter)
        finally:
            runtime.release(stages.actors, group)
    return {"model": model_path, "corpus": eval_config.corpus, "seq_len": eval_config.seq_len,
            "lorc": adapter,
            **result}
