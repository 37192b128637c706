"""The coordinator (driver side): plan -> validate -> place -> stream -> merge.

It reads configs and indexes, never a block's weights; the stage actors do the heavy work and
the activations travel between them through the Ray object store, chunk by chunk.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any

import ray
import torch

from cluster import runtime
from cluster.stage import StageActor
from pipeline import budget, calibration, compensation, cost_model, perplexity_cache, storage
from pipeline.assets import resolve_model_path
from pipeline.checkpoint import STATE_DIR, latest_boundary, verified_markers
from pipeline.config import (
    BudgetConfig,
    ClusterConfig,
    Device,
    Distortion,
    EvalConfig,
    ExportFormat,
    Method,
    Objective,
    QuantizationConfig,
    RunConfig,
    Schedule,
)
from pipeline.export import format_config
from pipeline.methods.gptq import HessianError
from pipeline.output_dir import finish_output, prepare_output, write_report
from pipeline.parallel.shares import split_windows_among
from pipeline.peft_adapter import adapter_folder
from pipeline.plan import Plan, make_plan, open_model
from pipeline.reconstruct import TrainingError
from pipeline.schemes import validate_schemes
from pipeline.sensitivity import unit_statistics
from pipeline.streams import split_windows

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Stages:
    plan: Plan
    actors: list[Any]
    chunk_size: int
    data_parallel: bool = False

    def owner(self, index: int) -> Any:
        for actor, (start, end) in zip(self.actors, self.plan.stages, strict=True):
            if start <= index < end:
                return actor
        raise IndexError(index)


def start_stages(plan: Plan, cluster: ClusterConfig) -> tuple[Stages, Any]:
    resources = runtime.plan_resources(cluster)
    group = runtime.reserve(resources, len(plan.stages))
    strategy = ray.util.scheduling_strategies.PlacementGroupSchedulingStrategy
    device = "cuda" if resources.gpus_per_worker else "cpu"
    actors = [
        StageActor.options(  # type: ignore[attr-defined]
            num_cpus=resources.cpus_per_worker, num_gpus=resources.gpus_per_worker,
            scheduling_strategy=strategy(placement_group=group, placement_group_bundle_index=i),
            name=None,
        ).remote(i, stage, cluster.compute_dtype, resources.threads, device)
        for i, stage in enumerate(plan.stages)
    ]
    log.info("placed %d blocks on %d stage(s): %s (%s per stage, device %s)", plan.num_blocks,
             len(actors), ", ".join(f"[{a}, {b})" for a, b in plan.stages),
             f"{resources.cpus_per_worker} CPU", device)
    stages = Stages(plan, actors, cluster.chunk_size,
                    cluster.resolved_schedule is Schedule.DATA_PARALLEL)
    if stages.data_parallel:
        try:
            address = (ray.get(actors[0].rendezvous_address.remote()) if len(actors) > 1
                       else None)
            gather([a.join.remote(address, r, len(actors), cluster.activation_memory_bytes)
                    for r, a in enumerate(actors)])
        except BaseException:
            runtime.release(actors, group)
            raise
        log.info("data_parallel: %d workers joined one process group (%s)", len(actors),
                 "nccl" if device == "cuda" else "gloo")
    return stages, group


def gather(refs: list[Any]) -> list[Any]:
    """Every result, but fail as soon as any one task fails (a dead data-parallel worker
    leaves the others waiting in a collective: never wait for them)."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)
    return ray.get(refs)


def stream_perplexity(stages: Stages, model_path: str, windows: torch.Tensor,
                      label: str, abits: int = 16, lorc: str | None = None) -> dict[str, Any]:
    """Perplexity, forward only (with abits < 16, the quantized linears' inputs fake-quantized
    per token; with `lorc`, that LoRA adapter folder merged into the weights). Data-parallel:
    each worker takes a contiguous share of the windows through every block; sequential: the
    chunks are pipelined through the stages (stage k works on chunk c while stage k+1 works on
    chunk c-1)."""
    start = time.perf_counter()
    if stages.data_parallel:
        shares = torch.tensor_split(windows, len(stages.actors))
        parts = gather([a.dp_perplexity.remote(model_path, share, stages.chunk_size, abits, lorc)
                        for a, share in zip(stages.actors, shares, strict=True)])
    else:
        parts = pipelined_scores(stages, model_path, windows, abits, label, start, lorc)
    nll = sum(p[0] for p in parts)
    count = sum(p[1] for p in parts)
    seconds = time.perf_counter() - start
    log.info("eval %s: %d windows in %.1fs", label, windows.shape[0], seconds)
    return {"perplexity": math.exp(nll / count), "windows": int(windows.shape[0]),
            "tokens": count, "seconds": seconds}


def pipelined_scores(stages: Stages, model_path: str, windows: torch.Tensor, abits: int,
                     label: str, start: float, lorc: str | None = None
                     ) -> list[tuple[float, int]]:
    """Each chunk through every stage and scored on the last; all chunks submitted at once, so
    Ray runs stage k's chunk c beside stage k+1's chunk c-1 (an actor runs its tasks in
    submission order). Each stage keeps its blocks loaded for the pass."""
    ids_chunks = split_windows(windows, stages.chunk_size)
    refs = []
    try:
        for ids in ids_chunks:
            h = stages.actors[0].embed_chunk.remote(model_path, ids, lorc)
            for actor, (a, b) in zip(stages.actors, stages.plan.stages, strict=True):
                h = actor.forward_chunk.remote(model_path, a, b, h, abits, lorc)
            refs.append(stages.actors[-1].score_chunk.remote(model_path, h, ids, lorc))
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)
            _progress(f"eval {label}", len(refs) - len(pending), len(refs), start, "chunks")
        return ray.get(refs)
    finally:
        gather([a.release_blocks.remote() for a in stages.actors])


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
    both streams are carried through it, the quantized one through its saved shard."""
    start = time.perf_counter()
    resumed = resume_point(stages, config, done)
    if resumed is None:
        first = 0
        fp = ray.get(stages.actors[0].embed.remote(
            model_path, split_windows(windows, stages.chunk_size)))
        q = fp
    else:
        first, fp, q = resumed
    markers = [done[i] for i in range(first)]
    last = max((i for i in range(stages.plan.num_blocks) if i not in done), default=-1)
    for i in range(first, stages.plan.num_blocks):
        owner = stages.owner(i)
        if i in done and i > last:  # nothing after it left to do: no stream needed
            markers.append(done[i])
            continue
        if i in done:
            fp_ref = owner.forward_block.remote(model_path, i, fp)
            q = ray.get(owner.forward_saved_block.remote(
                config.output, i, done[i]["files"], saved_config, q,
                config.quantization.abits))
            fp = ray.get(fp_ref)
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
        _progress("data-free quantize", len(refs) - len(pending), len(refs), start)
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
    held = gather([a.dp_start.remote(model_path, windows[list(share.indices)], share,
                                     stages.chunk_size)
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
    log.info("block %d/%d %s: %.2fs%s, peak RSS %.0f MB (private %.0f MB), ~%.0fs left%s",
             i + 1, total, where, m["seconds"], trained, m["peak_rss_bytes"] / 2**20,
             m["peak_private_bytes"] / 2**20, eta, busy)


def pipelined_forward(stages: Stages, model_path: str, ids_chunks: list[torch.Tensor],
                      start: float) -> tuple[list[list[Any]], list[Any]]:
    """The chunks through every stage, pipelined as in `pipelined_scores`; returns the stream
    entering each stage and the stream leaving the last (object refs, chunk by chunk)."""
    inputs: list[list[Any]] = [[] for _ in stages.actors]
    stream = []
    try:
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
            _progress("sensitivity forward", len(stream) - len(pending), len(stream), start,
                      "chunks")
    finally:
        gather([a.release_blocks.remote() for a in stages.actors])
    return inputs, stream


def sensitivity_pass(stages: Stages, model_path: str, windows: torch.Tensor,
                     budget: BudgetConfig) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """CVXQ statistics: forward through the stages (each keeps its input stream), the objective
    at the last stage, gradients back stage to stage; per-linear statistics come back."""
    start = time.perf_counter()
    ids_chunks = split_windows(windows, stages.chunk_size)
    inputs, stream = pipelined_forward(stages, model_path, ids_chunks, start)
    forward = time.perf_counter() - start
    last = stages.actors[-1]
    directions = (ray.get(last.pca.remote(model_path, stream, budget.pca_dims))
                  if budget.objective is Objective.PCA else None)
    grads = ray.get(last.objective_grads.remote(model_path, stream, ids_chunks, budget.objective,
                                                directions, budget.seed))
    stats: dict[str, dict[str, float]] = {}
    for s in reversed(range(len(stages.actors))):
        a, b = stages.plan.stages[s]
        log.info("sensitivity: backward through stage %d (blocks %d-%d), %.1fs elapsed", s, a,
                 b - 1, time.perf_counter() - start)
        grads, part = ray.get(stages.actors[s].backward.remote(
            model_path, stages.plan.stages[s], inputs[s], grads, s > 0))
        stats.update(part)
        log.info("sensitivity: stage %d done, %.1fs elapsed", s, time.perf_counter() - start)
    seconds = time.perf_counter() - start
    return stats, {"seconds": seconds, "forward_seconds": forward,
                   "relative_to_forward": seconds / forward if forward else None}


def measure_errors(stages: Stages, model_path: str, quantization: QuantizationConfig
                   ) -> dict[str, dict[str, float]]:
    """Every stage's RTN errors of its blocks' linears at each allocation option."""
    start = time.perf_counter()
    parts = ray.get([actor.weight_errors.remote(model_path, blocks, quantization)
                     for actor, blocks in zip(stages.actors, stages.plan.stages, strict=True)])
    errors = {k: v for part in parts for k, v in part.items()}
    log.info("allocation: RTN errors of %d linears at their options measured, %.1fs",
             len(errors), time.perf_counter() - start)
    return errors


def allocate_bits(plan: Plan, config: RunConfig, parts: Any, model_path: str,
                  calib: torch.Tensor | None) -> dict[str, Any]:
    """The run's allocation: read back when an earlier attempt saved it (same fingerprint),
    else the sensitivity pass on fresh stages and the global solve."""
    path = storage.join(config.output, STATE_DIR, budget.ALLOCATION_FILE)
    if storage.exists(path):
        log.info("allocation: reusing the one saved by an earlier attempt")
        return storage.read_json(path)
    source = config.quantization.budget.sensitivity_from
    measured = config.quantization.budget.distortion is Distortion.MEASURED
    if source is not None:
        log.info("allocation: sensitivity statistics from %s (no sensitivity pass)", source)
    if source is not None and not measured:
        allocation = budget.solve(parts, budget.load_statistics(parts, config.quantization),
                                  config.quantization)
        allocation["sensitivity"] = {"reused_from": source}
    else:
        stages, group = start_stages(plan, config.cluster)
        try:
            if source is not None:
                stats = budget.load_statistics(parts, config.quantization)
                timing: dict[str, Any] = {"reused_from": source}
            else:
                assert calib is not None  # run_calibration reads it for a sensitivity pass
                linear_stats, timing = sensitivity_pass(stages, model_path, calib,
                                                        config.quantization.budget)
                stats = unit_statistics(parts, linear_stats)
            errors = (measure_errors(stages, model_path, config.quantization) if measured
                      else None)
        finally:
            runtime.release(stages.actors, group)
        allocation = budget.solve(parts, stats, config.quantization, errors)
        allocation["sensitivity"] = timing
    timing = allocation["sensitivity"]
    log.info("allocation: log2 lambda %.3f, %d units, achieved %.4f bits per weight (target "
             "%.4f%s); %s", allocation["log_lambda"], len(allocation["units"]),
             allocation["achieved_bits"], allocation["target_bits"],
             ", side information counted" if allocation["count_side_info"] else "",
             f"sensitivity pass {timing['seconds']:.1f}s = {timing['relative_to_forward']:.2f} x "
             "one calibration forward pass" if "seconds" in timing else
             f"statistics from {timing['reused_from']}")
    log.info("allocation: widths %s", " ".join(
        str(u["bits"]) + ("" if "group_size" not in u else
                          f"g{u['group_size']}" if u["group_size"] else "pc")
        for u in allocation["units"]))
    storage.write_json(path, allocation)
    return allocation


def _progress(phase: str, done: int, total: int, start: float, unit: str = "blocks") -> None:
    if done == total or done % max(1, total // 10) == 0:
        elapsed = time.perf_counter() - start
        log.info("%s: %d/%d %s, %.1fs elapsed, ~%.1fs left", phase, done, total, unit, elapsed,
                 elapsed / done * (total - done))


def absolute(path: str) -> str:
    """Local paths made absolute, so stage actors in other working directories agree."""
    return path if "://" in path else os.path.abspath(path)


METHOD_ERRORS = (TrainingError, HessianError)
STAGE_FAILURES = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError,
                  ray.exceptions.WorkerCrashedError)


def quantize_with_retries(plan: Plan, config: RunConfig, parts: Any, model_path: str,
                          calib: torch.Tensor | None, formats: dict[str, Any]
                          ) -> tuple[Stages, Any, list[dict[str, Any]], dict[str, Any]]:
    """Quantize every block; when a stage dies (killed, out of memory), start the stages again
    and resume from the durable blocks: streams held by a dead actor are gone (objects made by
    ray.put are never reconstructed), so they are rebuilt from the newest saved boundary or
    from the start through the finished blocks. Gives up after cluster.max_retries."""
    saved_config = {**parts.reader.config, "quantization_config": format_config(
        ExportFormat.COMPRESSED_TENSORS, formats)}
    history: dict[str, Any] = {"stage_failures": []}
    for attempt in range(config.cluster.max_retries + 1):
        stages, group = start_stages(plan, config.cluster)
        try:
            done, redo = verified_markers(config.output, plan.num_blocks)
            if redo:
                log.warning("blocks %s: shard missing or checksum mismatch; redoing them", redo)
            if done:
                log.info("resuming: %d of %d blocks already done", len(done), plan.num_blocks)
            history.setdefault("resumed_blocks", sorted(done))
            history.setdefault("redone_blocks", redo)
            if calib is None:
                markers = quantize_blocks_data_free(stages, config, model_path, done)
            else:
                run = (quantize_blocks_data_parallel if stages.data_parallel
                       else quantize_blocks)
                markers = run(stages, config, model_path, calib, done, saved_config)
            return stages, group, markers, history
        except STAGE_FAILURES as e:
            runtime.release(stages.actors, group)
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
            history["stage_failures"].append(reason)
            if attempt == config.cluster.max_retries:
                raise RuntimeError(
                    f"a stage failed {attempt + 1} times, giving up ({reason}); every finished "
                    "block is kept: run the same command again to resume") from e
            log.warning("a stage failed (%s); restarting the stages and resuming from the "
                        "finished blocks (retry %d of %d)", reason, attempt + 1,
                        config.cluster.max_retries)
        except ray.exceptions.RayTaskError as e:
            runtime.release(stages.actors, group)
            if isinstance(e.cause, METHOD_ERRORS):  # say it plainly, not as a remote traceback
                raise type(e.cause)(f"{e.cause}; every finished block is kept") from None
            raise
        except BaseException:
            runtime.release(stages.actors, group)
            raise
    raise AssertionError("unreachable")


def local_memory_check(config: RunConfig, parts: Any) -> None:
    """On a local Ray (no cluster address), refuse a run whose workers cannot fit this
    machine's memory before any work (`relayquant plan` says the same in more detail)."""
    if config.cluster.address or os.environ.get("RAY_ADDRESS") or \
            config.cluster.device is Device.CUDA:
        return
    import psutil

    cost_model.check_memory(parts.reader.config, config.quantization,
                            config.calibration.num_samples, config.calibration.seq_len,
                            config.cluster.workers, config.cluster.resolved_schedule,
                            config.cluster.activation_memory_bytes,
                            psutil.virtual_memory().total // config.cluster.workers)


def quantize(config: RunConfig, restart: bool = False) -> dict[str, Any]:
    """Run the whole job; returns the report (also written to OUTPUT/report.json)."""
    start = time.time()
    config = dataclasses.replace(config, output=absolute(config.output))
    model_path = absolute(resolve_model_path(config.model.path))
    parts = open_model(model_path, config.cluster.compute_dtype)
    formats = validate_schemes(parts, config.quantization, config.export.formats)
    if config.quantization.lorc is not None:
        compensation.require_targets_match(config.quantization.lorc,
                                           [n for n, f in formats.items() if f is not None])
    if config.quantization.budget.average_bits is not None:
        budget.check_feasible(parts, config.quantization)
        if config.quantization.budget.sensitivity_from is not None:
            budget.load_statistics(parts, config.quantization)  # refuse a bad one before work
    plan = make_plan(parts, model_path, config.cluster.workers)
    local_memory_check(config, parts)
    streamed = calibration.streams_needed(config.quantization, config.eval.block_errors)
    calib = calibration.run_calibration(model_path, config)
    if not streamed:
        log.info("data-free: %s needs no calibration stream; blocks are quantized straight "
                 "from storage, all stages at once (eval.block_errors: true streams them to "
                 "measure each block's output error)", config.quantization.method.value)
    eval_ids = (calibration.eval_windows_for(model_path, config.eval) if config.eval.enabled
                else None)
    runtime.check_cluster_address(config.cluster)  # before anything is written
    manifest = prepare_output(config, parts, plan, calib, restart)
    allocation = None
    with runtime.ray_session(config.cluster):
        if config.quantization.budget.average_bits is not None:
            allocation = allocate_bits(plan, config, parts, model_path, calib)
            config = dataclasses.replace(config, quantization=budget.apply(
                config.quantization, parts, allocation))
            formats = validate_schemes(parts, config.quantization, config.export.formats)
            allocation["plot"] = budget.write_plot(config.output, allocation)
        phases = {"prepare": time.time() - start}
        mark = time.time()
        stages, group, markers, history = quantize_with_retries(plan, config, parts, model_path,
                                                                calib, formats)
        phases["quantize"] = time.time() - mark
        try:
            mark = time.time()
            exported = finish_output(config.output, parts, model_path, markers,
                                     config.export.formats, config.quantization.lorc)
            phases["finish"] = time.time() - mark
            mark = time.time()
            perplexity = _evaluate_both(stages, config, model_path, eval_ids)
            phases["evaluate"] = time.time() - mark
        finally:
            runtime.release(stages.actors, group)
    report = {"output": config.output, "method": config.quantization.method.value,
              **history,
              "perplexity": perplexity, "wall_seconds": time.time() - start,
              # prepare: plan, tokenize, open the output, start Ray (and the CVXQ allocation);
              # quantize: start the workers and every block; finish: shared tensors, index,
              # config; evaluate: FP (or its cached value) and quantized perplexity
              "phase_seconds": phases, "schedule": config.cluster.resolved_schedule.value,
              "data_free": not streamed,
              "plan": plan.to_dict(), "fingerprint": manifest["fingerprint"],
              "export": exported,
              "blocks": [{**m["metrics"], "sha256": {k: v["sha256"] for k, v in m["files"].items()}}
                         for m in markers]}
    if any("workers" in m["metrics"] for m in markers):
        report["workers"] = worker_summary(markers)
    if allocation is not None:
        report["allocation"] = allocation
    if config.quantization.bias_correction:
        corrected = sum(m["metrics"].get("bias_corrected", 0) for m in markers)
        report["bias_correction"] = {"linears": corrected}
        if not corrected:
            log.warning("quantization.bias_correction: no quantized linear of this model has a "
                        "bias in the checkpoint, so nothing was corrected")
    report["bits_per_weight"] = compensation.model_bits(parts, config.quantization)
    if config.quantization.lorc is not None:
        report["lorc"] = compensation.lorc_report(config.quantization.lorc, markers,
                                                  report["bits_per_weight"], perplexity)
    if config.quantization.abits < 16:
        report["activation_quantization"] = {
            "abits": config.quantization.abits, "kind": "per-token dynamic asymmetric fake-quant",
            "exported": False,
            "note": "the perplexity includes activation quantization; the checkpoint holds the "
                    "quantized weights only (evaluate it with the same abits)"}
    write_report(config.output, report)
    return report


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


def _evaluate_both(stages: Stages, config: RunConfig, model_path: str,
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
                              config.quantization.abits) if adapter is not None else None)
    return {"fp": fp["perplexity"] if fp else None, "quantized": quant["perplexity"],
            **({"quantized_without_lorc": bare["perplexity"]} if bare is not None else {}),
            "corpus": config.eval.corpus, "windows": quant["windows"],
            "seq_len": config.eval.seq_len, "tokens": quant["tokens"],
            "fp_from_cache": fp["cache"] if fp and "cache" in fp else None,
            "seconds": {"fp": fp["seconds"] if fp else None, "quantized": quant["seconds"]}}


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
    adapter = adapter_folder(model_path) if lorc else None
    parts = open_model(model_path, cluster.compute_dtype)
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
