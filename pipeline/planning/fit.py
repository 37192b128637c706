"""Whether a run fits before it starts: the memory refusal (exit 2) that `relayquant plan` and
`quantize`'s pre-flight share, naming the parts that do not fit and what to change."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from pipeline.config import ConfigError, QuantizationConfig, Schedule
from pipeline.planning.cost_model import Device
from pipeline.planning.run_estimate import plan_run


def memory_only(memory_bytes: int) -> Device:
    """A device for memory questions alone (its rates are never read)."""
    return Device("memory only", 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, memory_bytes)


def check_memory(config: dict[str, Any], q: QuantizationConfig, windows: int, seq_len: int,
                 workers: int, schedule: Schedule, activation_memory_bytes: int | None,
                 memory_bytes: int, block_errors: bool | None = None,
                 advise: Callable[[], str | None] | None = None, chunk_size: int = 8,
                 compute_dtype: str = "float32") -> dict[str, Any]:
    """Refuse, before any work, a run whose workers would need more memory than each has;
    returns the estimate (rates are not needed for memory). `advise`: asked only on a
    refusal, the change known to fit (e.g. fewer workers sharing one host), named first."""
    device = memory_only(memory_bytes)
    result = plan_run(config, q, windows, seq_len, workers, schedule, activation_memory_bytes,
                      device, block_errors, chunk_size, compute_dtype)
    sensitivity = sum(result["memory_sensitivity_pass"].values())
    if sensitivity > memory_bytes and result["memory_per_worker_bytes"] <= memory_bytes:
        parts = sorted(result["memory_sensitivity_pass"].items(), key=lambda kv: -kv[1])
        biggest = ", ".join(f"{k} {v / 2**30:.1f} GiB" for k, v in parts[:3])
        stages = min(workers, result["blocks"])
        raise ConfigError(
            f"plan: CVXQ's sensitivity pass would need {sensitivity / 2**30:.1f} GiB per stage "
            f"but a worker has {memory_bytes / 2**30:.1f} GiB ({biggest}) on {stages} "
            f"stage(s) of {math.ceil(result['blocks'] / stages)} blocks; use more workers "
            "(cluster.workers), machines with more memory, fewer calibration windows or a "
            "smaller cluster.chunk_size, or the statistics of an earlier run "
            "(quantization.budget.sensitivity_from)")
    if not result["fits"]:
        parts = sorted(result["memory_per_worker"].items(), key=lambda kv: -kv[1])
        biggest = ", ".join(f"{k} {v / 2**30:.1f} GiB" for k, v in parts[:3])
        advice = advise() if advise is not None else None
        raise ConfigError(
            f"plan: a worker would need {result['memory_per_worker_bytes'] / 2**30:.1f} GiB "
            f"but has {memory_bytes / 2**30:.1f} GiB ({biggest}); "
            + (f"{advice}; or " if advice else "")
            + "use machines with more memory, more workers (cluster.workers) with "
            "cluster.schedule data_parallel, cluster.activation_memory_bytes to spill the "
            "streams to disk, or a method without Hessians")
    return result


def fewer_local_workers(model_config: dict[str, Any], run: Any, workers: int) -> str | None:
    """On one machine the workers share its memory, so more of them only makes each share
    smaller: the most workers (fewer than `workers`) whose share fits this machine, named as
    the change to make, or None. `run`: the RunConfig."""
    if workers < 2:
        return None
    import psutil

    total = psutil.virtual_memory().total
    for fewer in range(workers - 1, 0, -1):
        schedule = dataclasses.replace(run.cluster, workers=fewer).resolved_schedule
        share = memory_only(total // fewer)
        r = plan_run(model_config, run.quantization, run.calibration.num_samples,
                     run.calibration.seq_len, fewer, schedule,
                     run.cluster.activation_memory_bytes, share, run.eval.block_errors,
                     run.cluster.chunk_size, run.cluster.compute_dtype)
        if r["fits"]:
            return (f"cluster.workers: {fewer} fits this machine (each worker "
                    f"{r['memory_per_worker_bytes'] / 2**30:.1f} GiB of its "
                    f"{share.memory_bytes / 2**30:.1f} GiB share; workers on one machine share "
                    "its memory)")
    return None
