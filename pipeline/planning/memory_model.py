"""The memory side of the cost model (`pipeline/planning/cost_model.py`): the bytes one worker
holds at its peak, by part (process, block weights, streams, Hessians, training state, activations),
from the block's shapes, the recipe and the workload alone."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from pipeline.config import Method, Optimizer, QuantizationConfig, Rounding, Schedule

if TYPE_CHECKING:
    from pipeline.planning.cost_model import BlockShape, Device, Workload

# bytes a Python worker process holds before any block (interpreter, torch, Ray worker)
PROCESS_BASE_BYTES = 600 * 2**20
# saved activations per token of one block for backward, in hidden-size units (norms, q/k/v/o
# inputs and outputs, the residuals) plus intermediate-size units (gate, up, act, product)
SAVED_HIDDEN_UNITS, SAVED_INTERMEDIATE_UNITS = 12, 5
# the data-free path's float32 slice of rows and its quantizer temporaries (codes, scaled copy,
# packing's int64 words): pipeline/data_free.SLICE_VALUES weights, about 6 words each
DATA_FREE_SLICE_BYTES = (1 << 24) * 4 * 6


def hessian_float64(device: Device, columns: int) -> bool:
    """GPTQ's rule for the Hessian's sums (`pipeline.methods.gptq.hessian_dtype`): float64 on
    CPU unless the matrix would exceed FLOAT64_HESSIAN_BYTES."""
    from pipeline.methods.gptq import FLOAT64_HESSIAN_BYTES

    return device.gptq_float64 and columns * columns * 8 <= FLOAT64_HESSIAN_BYTES


def solve_float64(device: Device, columns: int) -> bool:
    """GPTQ's rule for its factorization and sweep (`pipeline.methods.gptq.solve_dtype`):
    float64 on CPU up to FLOAT64_SOLVE_BYTES."""
    from pipeline.methods.gptq import FLOAT64_SOLVE_BYTES

    return device.gptq_float64 and columns * columns * 8 <= FLOAT64_SOLVE_BYTES


def learnable_params(shape: BlockShape, q: QuantizationConfig) -> int:
    cfg = q.omniquant
    groups = sum(o * (i // (q.group_size or i)) for _, o, i in shape.linears)
    count = 2 * groups if cfg.lwc else 0
    if cfg.let:
        count += 4 * shape.hidden
    if cfg.rounding is Rounding.LEARNED:
        count += shape.linear_params
    if cfg.sde is not None:  # the band's vectors and the dense block, per linear
        band, k = cfg.sde.band, cfg.sde.block
        count += sum((2 * band + 1) * min(o, i) + min(k, o, i) ** 2 for _, o, i in shape.linears)
    return count


def worker_memory(shape: BlockShape, q: QuantizationConfig, work: Workload,
                  shared_hessians: list[list[str]], device: Device) -> dict[str, int]:
    """Bytes one worker holds at its peak, by part."""
    dp = work.schedule is Schedule.DATA_PARALLEL and work.workers > 1
    share = math.ceil(work.windows / work.workers) if dp else work.windows
    if not work.windows:
        # data-free: one stored linear, one slice of its rows in float32 with the quantizer's
        # temporaries, and the block's packed output (pipeline/data_free.py)
        largest = max(o * i for _, o, i in shape.linears)
        packed = shape.linear_params * (q.bits / 8 + 0.1) + (shape.params -
                                                             shape.linear_params) * 4
        return {"process": PROCESS_BASE_BYTES,
                "block_weights": int(largest * shape.stored_bytes_per_param + packed
                                     + DATA_FREE_SLICE_BYTES)}
    weights = int(shape.params * (4 + shape.stored_bytes_per_param))  # fp32 copy + read
    out = {"process": PROCESS_BASE_BYTES, "block_weights": weights}
    if work.windows:
        stream = share * work.seq_len * shape.hidden * 4
        # each stream in and out while a block is worked on (the FP one only where carried)
        streams = (4 if work.fp_stream else 2) * stream
        if work.activation_memory_bytes is not None and dp:
            out["streams_on_disk"] = max(0, streams - work.activation_memory_bytes)
            streams = min(streams, work.activation_memory_bytes)
        out["streams"] = streams
    if q.method is Method.GPTQ or (q.method is Method.OMNIQUANT and (
            q.omniquant.rounding is Rounding.GPTQ or q.omniquant.round_init == "gptq")):
        hessians = shape.hessian_columns(shared_hessians)
        width = {c: 8 if hessian_float64(device, c) else 4 for c in hessians}
        solve = {c: 8 if solve_float64(device, c) else 4 for c in hessians}

        def working(c: int) -> float:
            # the factorization (`pipeline.methods.gptq.inverse_factor`): the reordered copy
            # (gathered in the sums' precision, then converted), factorized and inverted in
            # place with half a matrix more
            gather = width[c] + solve[c] if width[c] != solve[c] else solve[c]
            return c * c * max(gather, 1.5 * solve[c])

        # every Hessian of the block, plus the largest factorization's working copies
        out["hessians"] = int(sum(c * c * width[c] for c in hessians)
                              + max(working(c) for c in hessians))
    if q.method is Method.OMNIQUANT:
        learnable = learnable_params(shape, q)
        state = 2 if q.omniquant.optimizer is Optimizer.ADAMW else 0
        keep = 1 if q.omniquant.keep_best else 0
        # parameter, gradient, float64 sum (2 words), optimizer state, kept best
        out["training_state"] = learnable * 4 * (2 + 2 + state + keep)
        out["quantized_weights"] = 3 * shape.linear_params * 4  # transformed, clipped, fake
        if q.omniquant.sde is not None:  # U and Vh of every linear, the expanded weights
            out["sde"] = sum(4 * min(o, i) * (o + i) for _, o, i in shape.linears) + \
                2 * shape.linear_params * 4
        if q.omniquant.cross_layer is not None:  # the next blocks (float32) and their targets
            depth = q.omniquant.cross_layer.depth
            out["cross_layer"] = depth * (int(shape.params * (4 + shape.stored_bytes_per_param))
                                          + share * work.seq_len * shape.hidden * 4)
        per_token = SAVED_HIDDEN_UNITS * shape.hidden + SAVED_INTERMEDIATE_UNITS * \
            shape.intermediate
        attention = shape.heads * work.seq_len  # one score row per token and head
        out["activations"] = work.seq_len * (per_token + attention) * 4
    return out


def resident_blocks(shape: BlockShape, blocks: int, workers: int, memory_bytes: int,
                    compute_dtype: str = "float32") -> tuple[int, int]:
    """(blocks per stage, how many of them stay loaded) in CVXQ's sensitivity pass: the pass
    places the blocks on min(workers, blocks) stages; each stage's backward keeps as many
    loaded as fit `RESIDENT_FRACTION` of its memory (at least one) and reads the others again
    for every chunk (`pipeline.block_pass.ResidentBlocks`)."""
    from pipeline.block_pass import RESIDENT_FRACTION

    per_stage = math.ceil(blocks / max(1, min(workers, blocks)))
    block = shape.params * dtype_bytes(compute_dtype)
    return per_stage, max(1, min(per_stage, int(memory_bytes * RESIDENT_FRACTION) // block))


def dtype_bytes(dtype: str) -> int:
    """Bytes per value of a dtype named as in configs (`bfloat16`, `torch.float16`; 4 if
    unknown)."""
    return {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype.removeprefix("torch."), 4)


def sensitivity_memory(shape: BlockShape, blocks: int, windows: int, seq_len: int,
                       workers: int, device: Device, chunk_size: int = 8,
                       compute_dtype: str = "float32") -> dict[str, int]:
    """Bytes one stage holds at the peak of CVXQ's sensitivity pass, by part: the blocks it
    keeps loaded (`resident_blocks`, at the compute dtype), one block's linear gradients, each
    of its blocks' input for one chunk and one block's saved activations for that chunk; on a
    host worker also its input stream and the gradient stream (on a GPU they stay in host
    memory)."""
    word = dtype_bytes(compute_dtype)
    per_stage, kept = resident_blocks(shape, blocks, workers, device.memory_bytes, compute_dtype)
    chunk_tokens = min(chunk_size, windows) * seq_len
    per_token = SAVED_HIDDEN_UNITS * shape.hidden + SAVED_INTERMEDIATE_UNITS * shape.intermediate
    out = {"process": PROCESS_BASE_BYTES,
           "block_weights": kept * shape.params * word,
           "weight_gradients": shape.linear_params * word,
           "chunk_inputs": per_stage * chunk_tokens * shape.hidden * word,
           "activations": chunk_tokens * (per_token + shape.heads * seq_len) * word}
    if device.host:
        out["streams"] = 2 * windows * seq_len * shape.hidden * word
    return out
