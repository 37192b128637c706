"""CVXQ's allocation on the stages (driver side): the sensitivity pass streamed forward and
backward through them, the measured RTN errors, and the run's allocation from the saved one,
`budget.sensitivity_from`, the user cache or those passes."""
from __future__ import annotations

import logging
import time
from typing import Any

import ray
import torch

from cluster import runtime
from cluster.evaluation import pipelined_forward
from cluster.stages import Stages, start_stages
from pipeline import storage, user_cache
from pipeline.checkpoint import STATE_DIR
from pipeline.config import BudgetConfig, Distortion, Objective, QuantizationConfig, RunConfig
from pipeline.cvxq import budget, statistics_cache
from pipeline.cvxq.sensitivity import unit_statistics
from pipeline.plan import Plan
from pipeline.streams import split_windows

log = logging.getLogger(__name__)


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
