"""The coordinator (driver side): plan -> validate -> place -> stream -> merge.

It reads configs and indexes, never a block's weights; the stage actors do the heavy work and
the activations travel between them through the Ray object store, chunk by chunk.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import ray
import torch

from cluster import progress, runtime
from cluster.evaluation import (  # noqa: F401
    evaluate,
    evaluate_run,
    output_depth_errors,
    pipelined_forward,
    stream_perplexity,
)
from cluster.schedules import (
    quantize_blocks,
    quantize_blocks_data_free,
    quantize_blocks_data_parallel,
    worker_summary,
)
from cluster.stages import (  # noqa: F401
    Stages,
    absolute,
    gather,
    job_working_dir_warning,
    report_progress,
    start_stages,
)
from pipeline import calibration, storage, user_cache
from pipeline.assets import resolve_model_path
from pipeline.checkpoint import STATE_DIR, verified_markers
from pipeline.config import (
    BudgetConfig,
    ClusterConfig,
    ConfigError,
    Device,
    Distortion,
    ExportFormat,
    Objective,
    QuantizationConfig,
    RunConfig,
)
from pipeline.cvxq import budget, statistics_cache
from pipeline.cvxq.sensitivity import unit_statistics
from pipeline.export import format_config
from pipeline.methods import lorc_block
from pipeline.methods.gptq import HessianError
from pipeline.output_dir import finish_output, prepare_output, write_report
from pipeline.plan import Plan, make_plan, open_model
from pipeline.planning import fit
from pipeline.planning.preflight import check_recipe
from pipeline.reconstruct import TrainingError
from pipeline.reporting import report_html
from pipeline.schemes import validate_schemes
from pipeline.streams import split_windows

log = logging.getLogger(__name__)
REPORT_SCHEMA_VERSION = 2  # docs/report.md


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
                  calib: torch.Tensor | None, saved: list[dict[str, Any]] | None = None
                  ) -> dict[str, Any]:
    """The run's allocation: read back when an earlier attempt saved it (same fingerprint),
    else the global solve on the sensitivity statistics (from `saved`, budget.sensitivity_from
    read before the output was opened: it may lie in the output a --restart clears; else from
    the user cache when this model, calibration and objective were measured before; else the
    sensitivity pass) and, with measured distortion, the RTN errors (cached likewise). Stages
    start only for what the cache does not hold."""
    path = storage.join(config.output, STATE_DIR, budget.ALLOCATION_FILE)
    if storage.exists(path):
        log.info("allocation: reusing the one saved by an earlier attempt")
        return storage.read_json(path)
    q = config.quantization
    source = q.budget.sensitivity_from
    measured = q.budget.distortion is Distortion.MEASURED
    stats_key = errors_key = None
    linear_stats: dict[str, dict[str, float]] | None = None
    timing: dict[str, Any] = {}
    if source is not None:
        log.info("allocation: sensitivity statistics from %s (no sensitivity pass)", source)
        timing = {"reused_from": source}
    else:
        assert calib is not None  # run_calibration reads it when a sensitivity pass may run
        stats_key = statistics_cache.statistics_key(model_path, calib, q.budget, config.cluster)
        cached = user_cache.read(statistics_cache.STATISTICS, stats_key) or {}
        if isinstance(cached.get("linears"), dict) and isinstance(cached.get("timing"), dict):
            linear_stats = cached["linears"]
            where = user_cache.entry_path(statistics_cache.STATISTICS, stats_key)
            took = cached["timing"].get("seconds")
            timing = {"reused_from": where, "measured_seconds": took}
            log.info("allocation: sensitivity statistics from the user cache %s (the pass took "
                     "%s when they were measured)", where,
                     f"{took:.1f}s" if isinstance(took, (int, float)) else "?")
    errors = None
    if measured:
        errors_key = statistics_cache.errors_key(model_path, parts, q, config.cluster)
        cached = user_cache.read(statistics_cache.ERRORS, errors_key) or {}
        if isinstance(cached.get("errors"), dict):
            errors = cached["errors"]
            log.info("allocation: RTN errors of %d linears from the user cache %s", len(errors),
                     user_cache.entry_path(statistics_cache.ERRORS, errors_key))
    if (source is None and linear_stats is None) or (measured and errors is None):
        stages, group = start_stages(plan, config.cluster)
        try:
            if source is None and linear_stats is None:
                assert calib is not None and stats_key is not None
                linear_stats, timing = sensitivity_pass(stages, model_path, calib, q.budget)
                user_cache.write(statistics_cache.STATISTICS, stats_key,
                                 {"linears": linear_stats, "timing": timing})
            if measured and errors is None:
                assert errors_key is not None
                start = time.perf_counter()
                errors = measure_errors(stages, model_path, q)
                user_cache.write(statistics_cache.ERRORS, errors_key,
                                 {"errors": errors, "seconds": time.perf_counter() - start})
        finally:
            runtime.release(stages.actors, group)
    if source is not None:
        assert saved is not None
        stats = saved
    else:
        assert linear_stats is not None
        stats = unit_statistics(parts, linear_stats)
    allocation = budget.solve(parts, stats, q, errors)
    allocation["sensitivity"] = timing
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


METHOD_ERRORS = (TrainingError, HessianError)


STAGE_FAILURES = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError,
                  ray.exceptions.WorkerCrashedError)


def stage_failed(error: BaseException, attempt: int, max_retries: int,
                 history: dict[str, Any]) -> None:
    """Record a dead stage; give up (RuntimeError, with the resume hint) after max_retries."""
    reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
    history["stage_failures"].append(reason)
    if attempt == max_retries:
        raise RuntimeError(
            f"a stage failed {attempt + 1} times, giving up ({reason}); every finished "
            "block is kept: run the same command again to resume") from error
    log.warning("a stage failed (%s); restarting the stages and resuming from the "
                "finished blocks (retry %d of %d)", reason, attempt + 1, max_retries)


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
        try:  # a stage may die while it starts, too (start_stages releases what it started)
            stages, group = start_stages(plan, config.cluster)
        except STAGE_FAILURES as e:
            stage_failed(e, attempt, config.cluster.max_retries, history)
            continue
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
            stage_failed(e, attempt, config.cluster.max_retries, history)
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

    fit.check_memory(parts.reader.config, config.quantization,
                            config.calibration.num_samples, config.calibration.seq_len,
                            config.cluster.workers, config.cluster.resolved_schedule,
                            config.cluster.activation_memory_bytes,
                            psutil.virtual_memory().total // config.cluster.workers,
                            config.eval.block_errors,
                            advise=lambda: fit.fewer_local_workers(
                                parts.reader.config, config, config.cluster.workers),
                            chunk_size=config.cluster.chunk_size,
                            compute_dtype=config.cluster.compute_dtype)


def local_device_check(cluster: ClusterConfig) -> None:
    """cluster.device cuda on a local Ray: this machine must have a GPU per worker, or the
    refusal would only come once Ray is up and the output opened."""
    if cluster.device is not Device.CUDA or cluster.address or os.environ.get("RAY_ADDRESS"):
        return
    gpus = torch.cuda.device_count()
    if gpus < cluster.workers:
        raise ConfigError(f"cluster.device: cuda, but this machine has {gpus} CUDA GPU(s) for "
                          f"the {cluster.workers} worker(s) of a local Ray; use cluster.device: "
                          "cpu or auto, at most that many workers, or a GPU cluster's "
                          "cluster.address")


def quantize(config: RunConfig, restart: bool = False) -> dict[str, Any]:
    """Run the whole job; returns the report (also written to OUTPUT/report.json)."""
    start = time.time()
    progress.note("phase", "", name="prepare")
    if (warning := job_working_dir_warning(config.output, os.getcwd())) is not None:
        log.warning("%s", warning)
    config = dataclasses.replace(config, output=absolute(config.output))
    model_path = absolute(resolve_model_path(config.model.path))
    parts = open_model(model_path, config.cluster.compute_dtype)
    parts.check_shapes()
    formats, saved = check_recipe(parts, config)
    plan = make_plan(parts, model_path, config.cluster.workers)
    local_memory_check(config, parts)
    local_device_check(config.cluster)
    streamed = calibration.streams_needed(config.quantization, config.eval.block_errors)
    calib = calibration.run_calibration(model_path, config)
    if not streamed:
        log.info("data-free: %s needs no calibration stream; blocks are quantized straight "
                 "from storage, all stages at once (eval.block_errors: true streams them to "
                 "measure each block's output error)", config.quantization.method.value)
    eval_ids = (calibration.eval_windows_for(model_path, config.eval) if config.eval.enabled
                else None)
    if calib is None and eval_ids is None:  # the output ships the tokenizer: it must load
        calibration.load_tokenizer(model_path)
    depth_ids = (calibration.eval_windows_for(model_path, config.eval)[: config.eval.depth_errors]
                 if config.eval.depth_errors else None)
    if depth_ids is not None and depth_ids.shape[0] < config.eval.depth_errors:
        raise ConfigError(f"eval.depth_errors: {config.eval.depth_errors} exceeds the "
                          f"{depth_ids.shape[0]} evaluation windows (eval.corpus, eval.seq_len, "
                          f"eval.max_windows); use at most {depth_ids.shape[0]}")
    if config.eval.enabled and config.eval.corpus == config.calibration.corpus:
        log.warning("eval.corpus is the calibration corpus (%s): perplexity on the text the "
                    "method was fitted to flatters it; evaluate on held-out text",
                    config.eval.corpus)
    runtime.check_cluster_address(config.cluster)  # before anything is written
    manifest = prepare_output(config, parts, plan, calib, restart)
    allocation = None
    with runtime.ray_session(config.cluster):
        if config.quantization.budget.average_bits is not None:
            allocation = allocate_bits(plan, config, parts, model_path, calib, saved)
            config = dataclasses.replace(config, quantization=budget.apply(
                config.quantization, parts, allocation))
            formats = validate_schemes(parts, config.quantization, config.export.formats,
                                       recipe_overrides=False)
            allocation["plot"] = budget.write_plot(config.output, allocation)
        phases = {"prepare": time.time() - start}
        mark = time.time()
        progress.note("phase", "", name="quantize")
        stages, group, markers, history = quantize_with_retries(plan, config, parts, model_path,
                                                                calib, formats)
        phases["quantize"] = time.time() - mark
        try:
            mark = time.time()
            progress.note("phase", "", name="finish")
            exported = finish_output(config.output, parts, model_path, markers,
                                     config.export.formats, config.quantization.lorc)
            phases["finish"] = time.time() - mark
            depth = None
            if depth_ids is not None:
                mark = time.time()
                progress.note("phase", "", name="depth errors")
                depth = output_depth_errors(stages, config, model_path, depth_ids)
                phases["depth_errors"] = time.time() - mark
            mark = time.time()
            progress.note("phase", "", name="evaluate")
            perplexity = evaluate_run(stages, config, model_path, eval_ids)
            phases["evaluate"] = time.time() - mark
        finally:
            runtime.release(stages.actors, group)
    report = {"schema_version": REPORT_SCHEMA_VERSION,
              "output": config.output, "method": config.quantization.method.value,
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
    if depth is not None:
        for block, error in zip(report["blocks"], depth, strict=True):
            block["output_depth_error"] = error
        report["depth_errors"] = {"corpus": config.eval.corpus,
                                  "windows": int(depth_ids.shape[0]),  # type: ignore[union-attr]
                                  "seq_len": config.eval.seq_len}
    report["stages"] = stages.places  # which node and process held which blocks
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
    report["bits_per_weight"] = lorc_block.model_bits(parts, config.quantization)
    if config.quantization.lorc is not None:
        report["lorc"] = lorc_block.lorc_report(config.quantization.lorc, markers,
                                                  report["bits_per_weight"], perplexity)
    if config.quantization.abits < 16:
        report["activation_quantization"] = {
            "abits": config.quantization.abits, "kind": "per-token dynamic asymmetric fake-quant",
            "exported": False,
            "note": "the perplexity includes activation quantization; the checkpoint holds the "
                    "quantized weights only (evaluate it with the same abits)"}
    write_report(config.output, report)
    try:
        page = report_html.write_html(config.output, report)
        if page is not None:
            log.info("report: %s", page)
    except Exception as e:  # noqa: BLE001  the JSON report is the record; the page only shows it
        log.warning("report.html not written (%s: %s); report.json is complete",
                    type(e).__name__, e)
    return report
