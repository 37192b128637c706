"""The block loops of the quantize phase: sequential (both streams carried stage to stage),
data-free (every stage at once, straight from storage) and data-parallel (every worker on every
block, its own share of the windows), with resume from verified markers and per-block logs."""
from __future__ import annotations

import logging
import time
from typing import Any

import ray
import torch

from cluster import progress
from cluster.stages import Stages, gather, report_progress
from pipeline.calibration import fp_stream_needed
from pipeline.checkpoint import latest_boundary
from pipeline.config import (
    Method,
    QuantizationConfig,
    RunConfig,
)
from pipeline.parallel.shares import split_windows_among
from pipeline.streams import split_windows

log = logging.getLogger(__name__)


def resume_point(stages: Stages, config: RunConfig, done: dict[int, Any]
                 ) -> tuple[int, list[Any], list[Any]] | None:
    """(block, fp, q) from the newest saved boundary that only finished blocks precede."""
    if not config.checkpoint.save_streams:
        return None
    boundary = latest_boundary(config.output)
    leading = next(i for i in range(stages.plan.num_blocks + 1) if i not in done)
    if boundary is None or not 0 < boundary["boundary"] <= leading:
        return None
    b = boundary["boundary"]
    loader = stages.owner(min(b, stages.plan.num_blocks - 1))
    fp, q = ray.get(loader.load_streams.remote(boundary))
    log.info("resuming from the saved streams entering block %d", b + 1)
    return b, fp, q


def quantize_blocks(stages: Stages, config: RunConfig, model_path: str, windows: torch.Tensor,
                    done: dict[int, dict[str, Any]], saved_config: dict[str, Any]
                    ) -> list[dict[str, Any]]:
    """Quantize every block in order; a block already done (verified marker) is not redone:
    the streams are carried through it, the quantized one through its saved shard. The FP
    stream exists only where the method or `eval.block_errors` needs it."""
    start = time.perf_counter()
    resumed = resume_point(stages, config, done)
    with_fp = fp_stream_needed(config.quantization, config.eval.block_errors)
    fp: list[Any] | None
    if resumed is None:
        first = 0
        q = ray.get(stages.actors[0].embed.remote(
            model_path, split_windows(windows, stages.chunk_size)))
        fp = q if with_fp else None
    else:
        first, fp, q = resumed
        if with_fp and fp is None:  # not reachable: the boundary belongs to this same recipe
            raise RuntimeError("the saved boundary holds no FP stream")
    markers = [done[i] for i in range(first)]
    last = max((i for i in range(stages.plan.num_blocks) if i not in done), default=-1)
    for i in range(first, stages.plan.num_blocks):
        owner = stages.owner(i)
        if i in done and i > last:  # nothing after it left to do: no stream needed
            markers.append(done[i])
            continue
        if i in done:
            fp_ref = None if fp is None else owner.forward_block.remote(model_path, i, fp)
            q = ray.get(owner.forward_saved_block.remote(
                config.output, i, done[i]["files"], saved_config, q,
                config.quantization.abits))
            fp = None if fp_ref is None else ray.get(fp_ref)
            markers.append(done[i])
            log.info("block %d/%d: done in an earlier run, streams carried through it", i + 1,
                     stages.plan.num_blocks)
            continue
        fp, q, marker = ray.get(owner.quantize_block.remote(
            model_path, i, fp, q, config.quantization, config.export.formats, config.output))
        if config.checkpoint.save_streams and i + 1 < stages.plan.num_blocks:
            ray.get(owner.save_streams.remote(config.output, i + 1, fp, q))
        markers.append(marker)
        _log_block(marker, i, stages.plan.num_blocks, time.perf_counter() - start,
                   sum(1 for j in range(first, i + 1) if j not in done))
    log.info("quantized %d blocks in %.1fs", stages.plan.num_blocks, time.perf_counter() - start)
    return markers


def quantize_blocks_data_free(stages: Stages, config: RunConfig, model_path: str,
                              done: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """RTN straight from storage: every unfinished block submitted at once to its worker (its
    stage's owner, or worker i mod N when data-parallel), so all workers quantize in
    parallel; no stream exists."""
    start = time.perf_counter()
    total = stages.plan.num_blocks
    refs = {i: (stages.actors[i % len(stages.actors)] if stages.data_parallel
                else stages.owner(i)).quantize_weights.remote(
                    model_path, i, config.quantization, config.export.formats, config.output)
            for i in range(total) if i not in done}
    pending = list(refs.values())
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)
        report_progress("data-free quantize", len(refs) - len(pending), len(refs), start)
    markers = [done[i] if i in done else ray.get(refs[i]) for i in range(total)]
    log.info("quantized %d blocks in %.1fs (data-free, %d resumed)", total,
             time.perf_counter() - start, len(done))
    return markers


def training_batch(quantization: QuantizationConfig, workers: int) -> int:
    """The global batch the windows are shared by: the training batch for learned methods (so
    each batch is spread over the workers), else one window per worker in turn."""
    if quantization.method is Method.OMNIQUANT:
        return quantization.omniquant.batch_size
    return workers


def quantize_blocks_data_parallel(stages: Stages, config: RunConfig, model_path: str,
                                  windows: torch.Tensor, done: dict[int, dict[str, Any]],
                                  saved_config: dict[str, Any]) -> list[dict[str, Any]]:
    """Every worker keeps its share of the windows (both streams) for the whole run and all
    work on each block together; worker 0 writes the block's checkpoint."""
    start = time.perf_counter()
    workers = len(stages.actors)
    batch = training_batch(config.quantization, workers)
    shares = split_windows_among(windows.shape[0], workers, batch)
    idle = [w for w, share in enumerate(shares) if not share.indices]
    if idle:
        log.warning("data_parallel: the global batch of %d windows is smaller than the %d "
                    "workers; workers %s hold no window and only join the collectives", batch,
                    workers, idle)
    if config.checkpoint.save_streams:
        log.warning("checkpoint.save_streams: the data_parallel schedule keeps each worker's "
                    "streams to itself and saves no boundary; a resumed run carries the "
                    "streams through the finished blocks")
    with_fp = fp_stream_needed(config.quantization, config.eval.block_errors)
    held = gather([a.dp_start.remote(model_path, windows[list(share.indices)], share,
                                     stages.chunk_size, with_fp)
                   for a, share in zip(stages.actors, shares, strict=True)])
    log.info("data_parallel: %d windows shared among %d workers (%s), global batch %d",
             windows.shape[0], workers, "/".join(map(str, held)), batch)
    markers = []
    last = max((i for i in range(stages.plan.num_blocks) if i not in done), default=-1)
    for i in range(stages.plan.num_blocks):
        if i in done and i > last:  # nothing after it left to do: no stream needed
            markers.append(done[i])
            continue
        if i in done:
            gather([a.dp_carry_block.remote(model_path, i, config.output,
                                             done[i]["files"], saved_config,
                                             config.quantization.abits)
                    for a in stages.actors])
            markers.append(done[i])
            log.info("block %d/%d: done in an earlier run, streams carried through it", i + 1,
                     stages.plan.num_blocks)
            continue
        results = gather([a.dp_quantize_block.remote(model_path, i, config.quantization,
                                                     config.export.formats, config.output)
                          for a in stages.actors])
        marker = results[0]["marker"]
        markers.append(marker)
        _log_block(marker, i, stages.plan.num_blocks, time.perf_counter() - start,
                   sum(1 for j in range(i + 1) if j not in done))
    gather([a.dp_release_streams.remote() for a in stages.actors])
    log.info("quantized %d blocks in %.1fs on %d data-parallel workers",
             stages.plan.num_blocks, time.perf_counter() - start, workers)
    return markers


def _log_block(marker: dict[str, Any], i: int, total: int, elapsed: float, worked: int) -> None:
    m = marker["metrics"]
    trained = (f", loss {m['loss_before']:.3e} -> {m['loss_after']:.3e}"
               if "loss_before" in m else "")
    trained += (f", output rel. error {m['output_relative_error']:.3e}"
                if "output_relative_error" in m else "")
    where = (f"on {len(m['workers'])} workers" if "workers" in m else f"on stage {m['worker']}")
    busy = ("; " + ", ".join(f"worker {w['worker']} {w['compute_seconds']:.1f}s compute + "
                             f"{w['collective_seconds']:.1f}s collective" for w in m["workers"])
            if "workers" in m else "")
    eta = elapsed / max(worked, 1) * (total - i - 1)
    progress.note("block", f"block {i + 1}/{total} {where}: {m['seconds']:.2f}s{trained}, peak "
                  f"RSS {m['peak_rss_bytes'] / 2**20:.0f} MB (private "
                  f"{m['peak_private_bytes'] / 2**20:.0f} MB), ~{eta:.0f}s left{busy}",
                  block=i, blocks=total, seconds=m["seconds"], loss=m.get("loss_after"),
                  loss_before=m.get("loss_before"),
                  output_relative_error=m.get("output_relative_error"), eta=eta,
                  rss_bytes=m["peak_rss_bytes"], worker=m.get("worker"))


def worker_summary(markers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per data-parallel worker over the blocks quantized in this run: compute and collective
    seconds, and its stream store's totals (bytes spilled to disk and read back, peak bytes in
    memory)."""
    rows = [m["metrics"]["workers"] for m in markers if "workers" in m["metrics"]]
    rows = [r for r in rows if len(r) == len(rows[-1])]  # an earlier attempt's count differs
    out = []
    for w in range(len(rows[-1])):
        out.append({"worker": w,
                    "compute_seconds": sum(r[w]["compute_seconds"] for r in rows),
                    "collective_seconds": sum(r[w]["collective_seconds"] for r in rows),
                    **{k: rows[-1][w][k] for k in ("stream_memory_peak_bytes", "spilled_bytes",
                                                   "spill_read_bytes") if k in rows[-1][w]}})
    return out
