"""The time of CVXQ's passes before the first block, for the cost model
(`pipeline/planning/run_estimate.py`'s `plan_run` prints it apart from the quantize phase):
the sensitivity pass, its re-reads where a stage's blocks do not all stay loaded, and the
measured RTN errors."""
from __future__ import annotations

import math

from pipeline.config import Distortion, Observer, QuantizationConfig
from pipeline.planning.cost_model import SEARCH_BYTES, BlockShape, Device, forward_flops
from pipeline.planning.memory_model import resident_blocks

# forwards' worth of products in CVXQ's sensitivity backward, per block and chunk (see
# allocation_seconds)
SENSITIVITY_FORWARDS = 4.0


def allocation_seconds(shape: BlockShape, blocks: int, q: QuantizationConfig, windows: int,
                       seq_len: int, workers: int, device: Device, chunk_size: int = 8,
                       compute_dtype: str = "float32") -> dict[str, float]:
    """CVXQ's passes before the first block (`quantization.budget.average_bits` set), by part:
    the sensitivity pass over the calibration windows (none with `sensitivity_from`) and, with
    measured distortion, every quantized linear's RTN error at each option. Both are what a run
    that finds nothing in the user cache spends; one that finds them there spends neither."""
    b = q.budget
    if b.average_bits is None:
        return {}
    out = {}
    if b.sensitivity_from is None:
        one = blocks * forward_flops(shape, windows * seq_len, seq_len) / device.forward_flops
        # the forward is pipelined over the stages (all compute at once); the backward goes
        # stage after stage (pipeline.cvxq.sensitivity.stage_backward): per chunk a forward
        # through the stage for the blocks' inputs, then per block a recomputed forward and
        # its backward (two forwards' products: input and weight gradients)
        out["sensitivity"] = one / max(1, min(workers, blocks)) + SENSITIVITY_FORWARDS * one
        per_stage, kept = resident_blocks(shape, blocks, workers, device.memory_bytes,
                                          compute_dtype)
        if kept < per_stage:  # the blocks that do not stay loaded, read twice per chunk
            chunks = math.ceil(windows / max(1, chunk_size))
            out["sensitivity_reads"] = (chunks * 2 * (per_stage - kept) * shape.params
                                        * shape.stored_bytes_per_param / device.disk_bytes)
    if b.distortion is Distortion.MEASURED:
        options = len(set(b.choices)) * max(1, len(b.group_sizes))
        rate = (device.search_params or device.elementwise_bytes / SEARCH_BYTES
                if q.observer is Observer.MSE else device.rtn_params)
        # each stage measures its own blocks, all at once
        out["measured_errors"] = (blocks * shape.linear_params * options / rate
                                  / max(1, min(workers, blocks)))
    return out
