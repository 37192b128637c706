"""The pre-flight estimate of a whole run, from the model's config alone: the quantize phase
(`pipeline/planning/cost_model.py`: time per block, memory per worker) and, with a CVXQ budget,
the allocation's passes before it (`pipeline/planning/allocation_cost.py`) and the sensitivity
pass's memory (`pipeline/planning/memory_model.py`). `relayquant plan` prints it; `quantize`'s
pre-flight (`pipeline/planning/fit.py`) refuses what does not fit."""
from __future__ import annotations

from typing import Any

from pipeline.calibration import fp_stream_needed, streams_needed
from pipeline.config import QuantizationConfig, Schedule
from pipeline.planning.allocation_cost import allocation_seconds
from pipeline.planning.cost_model import (
    STARTUP_SECONDS,
    BlockShape,
    Device,
    Workload,
    block_shape,
    estimate,
)
from pipeline.planning.memory_model import dtype_bytes, sensitivity_memory


def model_shape(config: dict[str, Any]) -> tuple[BlockShape, int, list[list[str]]]:
    """The block shape, the block count and the Hessian-sharing groups of a model, from its
    config.json alone (the model is built on the meta device)."""
    from pipeline.model_parts import meta_model

    _, adapter, _, meta, blocks = meta_model(config)
    block = meta.get_submodule(f"{adapter.blocks}.0")
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    width = dtype_bytes(dtype)
    shape = block_shape(block, list(adapter.linears), config, width)
    shared = [list(consumers) for _norm, consumers in adapter.norm_to_linears]
    return shape, blocks, shared


def plan_run(config: dict[str, Any], q: QuantizationConfig, windows: int, seq_len: int,
             workers: int, schedule: Schedule, activation_memory_bytes: int | None,
             device: Device, block_errors: bool | None = None, chunk_size: int = 8,
             compute_dtype: str = "float32") -> dict[str, Any]:
    """The pre-flight estimate of one run: per worker memory by part and whether it fits,
    the quantize phase's predicted seconds and each block's; with a CVXQ budget also the
    allocation's passes (`allocation_seconds`) and, when the sensitivity pass runs, its
    memory per stage (`memory_sensitivity_pass`, which must fit as well)."""
    shape, blocks, shared = model_shape(config)
    allocation = allocation_seconds(shape, blocks, q, windows, seq_len, workers, device,
                                    chunk_size, compute_dtype)
    sensitivity = (sensitivity_memory(shape, blocks, windows, seq_len, workers, device,
                                      chunk_size, compute_dtype)
                   if "sensitivity" in allocation else {})
    if windows and not streams_needed(q, block_errors):
        windows = 0
    work = Workload(windows, seq_len, workers, schedule, activation_memory_bytes,
                    fp_stream_needed(q, block_errors))
    est = estimate(shape, blocks, q, work, device, shared)
    memory = sum(v for k, v in est.memory.items() if k != "streams_on_disk")
    return {"blocks": blocks, "workers": workers, "schedule": schedule.value,
            "data_free": windows == 0, "linear_params_per_block": shape.linear_params,
            "predicted_seconds": est.seconds + sum(allocation.values()),
            "predicted_quantize_phase_seconds": est.seconds - STARTUP_SECONDS,
            # CVXQ's passes before the blocks (not in the quantize phase), by part
            "allocation_seconds": allocation,
            "block_seconds": est.block_seconds[0],
            "memory_per_worker": est.memory, "memory_per_worker_bytes": memory,
            "memory_sensitivity_pass": sensitivity,
            "worker_memory_bytes": device.memory_bytes,
            "fits": est.fits and sum(sensitivity.values()) <= device.memory_bytes,
            "device": device.to_dict()}

