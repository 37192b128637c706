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
from cluster.allocation import allocate_bits
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
    STAGE_FAILURES,
    Stages,
    absolute,
    gather,
    job_working_dir_warning,
    report_progress,
    start_stages,
)
from pipeline import calibration
from pipeline.assets import resolve_model_path
from pipeline.checkpoint import verified_markers
from pipeline.config import (
    ClusterConfig,
    ConfigError,
    Device,
    ExportFormat,
    RunConfig,
)
from pipeline.cvxq import budget
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

log = logging.getLogger(__name__)
REPORT_SCHEMA_VERSION = 2  # docs/report.md


METHOD_ERRORS = (TrainingError, HessianError)


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
