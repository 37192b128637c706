"""`relayquant plan`: before a run, what each worker will need and how long it will take, from
the model's config.json alone (no weights read) and the recipe; on this machine (rates
measured now) or on a cluster described in a small YAML file:

    device: h100-80g        # or a100-80g, a100-40g, "this machine"
    nodes: 4
    devices_per_node: 8
    network_bytes_per_s: 5.0e+10   # optional: one link between workers

A plan that cannot fit is refused (exit 2) naming what does not fit and what to change.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from jobs.recipes import read_yaml
from pipeline.config import ConfigError, RunConfig
from pipeline.config.tree import build_config


def load_cluster(path: str | None) -> Any:
    from pipeline.planning.clusters import ClusterSpec

    if path is None:
        return ClusterSpec()
    data = read_yaml(path, "--cluster")
    if data is not None and not isinstance(data, dict):
        allowed = ", ".join(f.name for f in dataclasses.fields(ClusterSpec))
        raise ConfigError(f"--cluster: {path} must map some of {allowed}")
    try:  # the types (an integer, a number) checked as a recipe's are
        return build_config(ClusterSpec, data)
    except ValueError as e:
        raise ConfigError(f"--cluster: {e}") from e


def local_shards(model_path: str) -> list[str]:
    """The model's weight files when it is a local folder that holds them (the disk probe
    reads a sample of them); none for a URL or a folder of config and index only."""
    if "://" in model_path or not os.path.isdir(model_path):
        return []
    return [os.path.join(model_path, f) for f in sorted(os.listdir(model_path))
            if f.endswith(".safetensors")]


def device_for(spec: Any, config: RunConfig, workers: int, shape: Any,
               model_path: str = "") -> Any:
    from pipeline.planning.device_rates import measure_device

    if spec.device != "this machine":
        device = spec.preset()
    else:
        import psutil

        cores = len(os.sched_getaffinity(0))
        threads = config.cluster.threads or max(1, cores // workers)
        device = measure_device(shape, config.calibration.seq_len, threads,
                                psutil.virtual_memory().total // workers,
                                disk_files=local_shards(model_path))
    if spec.network_bytes_per_s:
        device = dataclasses.replace(device, network_bytes=spec.network_bytes_per_s)
    return device


def check_windows(model_path: str, config: RunConfig) -> None:
    """The calibration and evaluation windows against the model's context, as a run checks
    them when it reads the text."""
    from pipeline.calibration import check_seq_len, streams_needed

    if streams_needed(config.quantization, config.eval.block_errors):
        check_seq_len(model_path, config.calibration.seq_len, "calibration.seq_len")
    if config.eval.enabled or config.eval.depth_errors:
        check_seq_len(model_path, config.eval.seq_len, "eval.seq_len")


def plan(config: RunConfig, spec: Any) -> dict[str, Any]:
    from pipeline import storage
    from pipeline.assets import resolve_model_path
    from pipeline.planning.run_estimate import model_shape, plan_run

    model_path = resolve_model_path(config.model.path)
    storage.require_exists(model_path, "model.path")
    model_config = storage.read_model_config(model_path)
    if local_shards(model_path):  # its headers against config.json, as a run checks them
        from pipeline.plan import open_model
        from pipeline.planning.preflight import check_recipe

        parts = open_model(model_path)
        parts.check_shapes()
        check_recipe(parts, config)  # the recipe's limits that depend on the model
    check_windows(model_path, config)
    if config.output:  # what a run would refuse of its output, without writing anything
        from pipeline.output_dir import check_output_apart, check_output_kind

        check_output_apart(config.output, model_path)
        check_output_kind(config.output)
    workers = (config.cluster.workers if spec.device == "this machine"
               else spec.nodes * spec.devices_per_node)
    shape, blocks, _ = model_shape(model_config)
    if workers > blocks and config.cluster.resolved_schedule.value == "sequential":
        given = (f"cluster.workers: {workers} exceeds" if spec.device == "this machine" else
                 f"--cluster: {spec.nodes} nodes x {spec.devices_per_node} devices_per_node = "
                 f"{workers} workers exceed")
        raise ConfigError(f"{given} the model's {blocks} blocks in the sequential schedule (a "
                          f"block range per worker); use at most {blocks}, or cluster.schedule: "
                          "data_parallel")
    schedule = dataclasses.replace(config.cluster, workers=workers).resolved_schedule
    device = device_for(spec, config, workers, shape, model_path)
    result = plan_run(model_config, config.quantization, config.calibration.num_samples,
                      config.calibration.seq_len, workers, schedule,
                      config.cluster.activation_memory_bytes, device,
                      config.eval.block_errors, config.cluster.chunk_size,
                      config.cluster.compute_dtype)
    result.update(model=model_path, cluster=dataclasses.asdict(spec))
    if not result["fits"]:
        from pipeline.planning.fit import check_memory, fewer_local_workers

        check_memory(model_config, config.quantization, config.calibration.num_samples,
                     config.calibration.seq_len, workers, schedule,
                     config.cluster.activation_memory_bytes, device.memory_bytes,
                     config.eval.block_errors,
                     advise=(lambda: fewer_local_workers(model_config, config, workers))
                     if spec.device == "this machine" else None,
                     chunk_size=config.cluster.chunk_size,
                     compute_dtype=config.cluster.compute_dtype)
    return result


def summarize(r: dict[str, Any]) -> str:
    free = " (data-free)" if r["data_free"] else ""
    head = (f"plan: {r['blocks']} blocks on {r['workers']} worker(s), {r['schedule']}{free}, "
            f"device {r['device']['name']}")
    lines = [head]
    lines.append(f"  memory per worker: {r['memory_per_worker_bytes'] / 2**30:.2f} GiB of "
                 f"{r['worker_memory_bytes'] / 2**30:.1f} GiB")
    for k, v in sorted(r["memory_per_worker"].items(), key=lambda kv: -kv[1]):
        lines.append(f"    {k}: {v / 2**30:.3f} GiB")
    block = sum(r["block_seconds"].values())
    allocation = sum(r.get("allocation_seconds", {}).values())
    if allocation:
        parts = ", ".join(f"{k} {v:.1f}s" for k, v in r["allocation_seconds"].items())
        lines.append(f"  predicted CVXQ allocation: {allocation / 60:.1f} min ({parts}; none for "
                     "what the user cache holds from an earlier run)")
    if r.get("memory_sensitivity_pass"):
        lines.append("  memory per stage in CVXQ's sensitivity pass: "
                     f"{sum(r['memory_sensitivity_pass'].values()) / 2**30:.2f} GiB")
    lines.append(f"  predicted quantize phase: {(r['predicted_seconds'] - allocation) / 60:.1f} min "
                 f"({block:.1f}s per block: " + ", ".join(
                     f"{k} {v:.1f}s" for k, v in r["block_seconds"].items()) + ")")
    return "\n".join(lines)


def run_plan(args: argparse.Namespace) -> dict[str, Any]:
    from jobs.recipes import load_recipe, parse_overrides

    config = load_recipe(args.config, parse_overrides(args.set), warn=True)
    return plan(config, load_cluster(args.cluster))
