"""What a run will cost before it starts: per worker, the memory it needs (block weights,
streams, training state, Hessians: `pipeline/planning/memory_model.py`) and the time per block
and for the run, from the model's config alone (shapes from the meta device, no weights read),
the recipe, the schedule and the device's measured rates.

Time is counted in the work a block costs, at rates a micro-benchmark measures on the device
(`pipeline.planning.device_rates.measure_device`): dense float32 matmul FLOP/s, float64 matmul
FLOP/s (GPTQ's Hessians and sweep on CPU), elementwise bytes/s (the quantizer, the optimizer),
disk read bytes/s (the block's weights), network bytes/s (the collectives). The structural
constants (a backward pass costs two forward passes; the learned quantizer touches each weight a
fixed number of times) are stated where they are used, not fitted to runs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from pipeline.config import (
    Autocast,
    Method,
    Observer,
    QuantizationConfig,
    Rounding,
    Schedule,
)
from pipeline.formats.affine import MSE_GRID, MSE_MAX_SHRINK
from pipeline.planning.memory_model import (
    hessian_float64,
    solve_float64,
    worker_memory,
)

__all__ = ["hessian_float64", "solve_float64", "worker_memory"]  # re-exported: the memory side of the model

# float32 words moved per weight of a linear in one learned step (the fused fake-quant: about
# 14 elementwise passes forward and 18 backward, each a read and a write; LET's transform and
# the optimizer's update and clamp about 6 more), once per step whatever the batch
QUANTIZER_PASSES = 80
# the same with `compile_quantizer`: its forward and backward fused (on an H200 the compiled
# fake-quant of a 7B-sized weight took 0.66-0.84 ms against 1.83-4.57 ms eagerly,
# benchmarks/results/cuda_speed.json: about 14 words per weight instead of some 68), LET's
# transform and the optimizer's update as before
QUANTIZER_PASSES_FUSED = 26
# Ray's start and the model's first reads before the first block (a run's "prepare" phase),
# counted in a run's prediction but not in its quantize phase (which starts the stages:
# `Device.stage_start_seconds`)
STARTUP_SECONDS = 15.0
# bytes moved per weight by the mse observer's search where no rate was measured: each of its
# round trips about 12 elementwise float32 passes (divide, round, clamp, dequantize, error,
# power, sum and the running best)
SEARCH_BYTES = int(MSE_MAX_SHRINK * MSE_GRID) * 12 * 4


@dataclasses.dataclass(frozen=True)
class Device:
    """One worker's device: its rates and memory."""

    name: str
    forward_flops: float  # FLOP/s a block's forward pass reaches (matmuls, attention, norms)
    train_flops: float  # FLOP/s of a block's forward + backward (counted as 3 forwards)
    fp64_flops: float  # FLOP/s, dense float64 matmul (GPTQ on CPU)
    elementwise_bytes: float  # bytes/s through simple elementwise kernels
    disk_bytes: float  # bytes/s reading the model's shards
    network_bytes: float  # bytes/s of one collective link between workers
    memory_bytes: int  # what one worker may use (host share, or the GPU's memory)
    gptq_float64: bool = True  # GPTQ's sums in float64 (CPU) or float32 (GPU)
    column_seconds: float = 60e-6  # GPTQ's fixed cost per column (a few small kernels)
    # weights/s through the data-free path (read slice, min-max, codes, packing; on the host)
    rtn_params: float = 100e6
    # weights/s through the mse observer's search (`quantization.observer: mse`); None: from
    # elementwise_bytes at SEARCH_BYTES per weight
    search_params: float | None = None
    # FLOP/s of GPTQ's factorization (`pipeline.methods.gptq.inverse_factor`: a Cholesky and
    # a triangular inversion, factor_flops), which runs below the matmul rate, in float64 (CPU
    # solves of narrow inputs) and float32 (wide ones, GPUs)
    cholesky64_flops: float = 5e12
    cholesky32_flops: float = 10e12
    # the sizes those rates were measured at (`device_rates`); None: presets, taken as they are
    cholesky64_n: int | None = None
    cholesky32_n: int | None = None
    # starting the stages, at the head of the quantize phase: each actor's process imports
    # torch and relayquant and opens the model (they start at once; measured on the host by
    # timing a process that imports them)
    stage_start_seconds: float = 5.0
    # bytes/s writing a block's shard and marker (checksummed, renamed into place), and the
    # fixed cost per block of doing so
    write_bytes: float = 500e6
    block_write_seconds: float = 0.05
    # a host (CPU) worker: data-parallel workers of one node split the learned quantizer
    # through shared memory (`quantization.omniquant.shard_quantizer`); GPUs through NCCL
    host: bool = True
    # bytes/s of a collective among the devices of one node (NVLink through NVSwitch), where
    # it differs from `network_bytes` (between nodes); a one-node cluster's collectives use it
    node_link_bytes: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class BlockShape:
    """One transformer block as the cost model sees it."""

    linears: tuple[tuple[str, int, int], ...]  # name, out_features, in_features
    hidden: int
    heads: int
    head_dim: int
    params: int  # every parameter of the block (norms included)
    stored_bytes_per_param: float  # as in the checkpoint (2 for bf16)

    @property
    def linear_params(self) -> int:
        return sum(o * i for _, o, i in self.linears)

    @property
    def intermediate(self) -> int:
        return max(o for _, o, _ in self.linears)

    def hessian_columns(self, shared: list[list[str]]) -> list[int]:
        """The in_features of each distinct Hessian (linears fed by one norm share one)."""
        sharing = {n for group in shared for n in group[1:]}
        return [i for n, _, i in self.linears if n not in sharing]


def block_shape(meta_block: torch.nn.Module, linears: list[str], config: dict[str, Any],
                stored_bytes_per_param: float) -> BlockShape:
    rows = [(n, *meta_block.get_parameter(f"{n}.weight").shape) for n in linears]
    hidden = int(config.get("hidden_size", rows[0][2]))
    heads = int(config.get("num_attention_heads", 1))
    head_dim = int(config.get("head_dim") or hidden // heads)
    params = sum(p.numel() for p in meta_block.parameters())
    return BlockShape(tuple((str(n), int(o), int(i)) for n, o, i in rows), hidden, heads,
                      head_dim, params, stored_bytes_per_param)


@dataclasses.dataclass(frozen=True)
class Workload:
    windows: int  # calibration windows (0: data-free)
    seq_len: int
    workers: int
    schedule: Schedule
    activation_memory_bytes: int | None = None
    # the FP stream is carried (`calibration.fp_stream_needed`): learned methods, or
    # eval.block_errors
    fp_stream: bool = True


def forward_flops(shape: BlockShape, tokens: int, seq_len: int) -> float:
    """2 FLOPs per weight per token, plus causal attention (QK^T and AV, half the square)."""
    return tokens * (2.0 * shape.linear_params + 2.0 * seq_len * shape.heads * shape.head_dim)


def block_seconds(shape: BlockShape, q: QuantizationConfig, work: Workload, device: Device,
                  shared_hessians: list[list[str]]) -> dict[str, float]:
    """Seconds per block by part, for one worker of `work` (data-parallel workers split the
    windows; a sequential stage does all of them)."""
    dp = work.schedule is Schedule.DATA_PARALLEL and work.workers > 1
    share = math.ceil(work.windows / work.workers) if dp else work.windows
    tokens = share * work.seq_len
    # data-free workers read different blocks at once and share the node's disk; under the
    # other schedules every worker reads the same block (the page cache serves all but one)
    # or one stage reads at a time
    readers = work.workers if work.windows == 0 else 1
    load = shape.params * shape.stored_bytes_per_param * readers / device.disk_bytes
    out = {"load": load, "write": write_seconds(shape, q.bits, device)}
    quantize_weights = shape.linear_params / device.rtn_params
    if q.observer is Observer.MSE:
        out["observer"] = shape.linear_params / (device.search_params or
                                                 device.elementwise_bytes / SEARCH_BYTES)
    if work.windows == 0:  # data-free RTN
        out["quantize"] = quantize_weights
        return out
    one_pass = forward_flops(shape, tokens, work.seq_len) / device.forward_flops
    # the quantized stream, and the FP targets where the FP stream is carried
    out["streams"] = (2 if work.fp_stream else 1) * one_pass
    if q.method is Method.RTN:
        out["quantize"] = quantize_weights
    elif q.method is Method.GPTQ:
        out["hessians"] = one_pass + hessian_seconds(shape, tokens, device, shared_hessians)
        solve = sweep_seconds(shape, device, shared_hessians)
        out["gptq"] = solve / work.workers if dp else solve
        if dp and "observer" in out:  # searched by each linear's solver only
            out["observer"] /= work.workers
        if dp:  # the broadcast of each solved linear's weight, codes and parameters
            out["collective"] = shape.linear_params * 12 / device.network_bytes
    else:
        out.update(training_seconds(shape, q, work, device, share))
    return out


def _gptq_rate(device: Device, columns: int) -> float:
    return device.fp64_flops if hessian_float64(device, columns) else device.forward_flops


def _solve_rate(device: Device, columns: int) -> float:
    return device.fp64_flops if solve_float64(device, columns) else device.forward_flops


def hessian_seconds(shape: BlockShape, tokens: int, device: Device,
                    shared: list[list[str]]) -> float:
    return sum(2.0 * tokens * c * c / _gptq_rate(device, c)
               for c in shape.hessian_columns(shared))


# the column loop's elementwise traffic per weight, in words of the solve's precision: each
# weight of the working block of 128 columns is updated about 64 times, each update reading and
# writing it and a temporary (calibrated on a Llama-70B-width block on a 2-core AVX2 host: 50-77
# ns per float32 weight at 28 GB/s, 2026-12-02)
SWEEP_WORDS_PER_WEIGHT = 384


def factor_seconds(columns: int, device: Device) -> float:
    """One GPTQ factorization of `columns` inputs. With the rate measured at one size
    (`cholesky*_n`), the time is the flops at the matmul rate (what the factorization tends to
    at large sizes, being blocked into matrix products) plus a part growing as n^2 (its
    panels), sized so that the measured size takes the measured time; presets' rates are
    taken as they are."""
    from pipeline.methods.gptq import factor_flops

    fp64 = solve_float64(device, columns)
    rate = device.cholesky64_flops if fp64 else device.cholesky32_flops
    at = device.cholesky64_n if fp64 else device.cholesky32_n
    if at is None:
        return factor_flops(columns) / rate
    matmul = max(_solve_rate(device, columns), rate)
    overhead = (factor_flops(at) / rate - factor_flops(at) / matmul) / (at * at)
    return factor_flops(columns) / matmul + overhead * columns * columns


def sweep_seconds(shape: BlockShape, device: Device,
                  shared: list[list[str]] | None = None) -> float:
    """GPTQ's solve: per linear, the lazy batches' error feedback (rows x columns^2 flops) at
    the matmul rate, the column loop's elementwise traffic and its fixed cost per column; one
    factorization per distinct Hessian (`shared`: the linears that share one; None: none
    do)."""
    def width(i: int) -> int:
        return 8 if solve_float64(device, i) else 4

    sweeps = sum(float(o) * i * i / _solve_rate(device, i)
                 + float(o) * i * SWEEP_WORDS_PER_WEIGHT * width(i) / device.elementwise_bytes
                 + i * device.column_seconds for _, o, i in shape.linears)
    return sweeps + sum(factor_seconds(i, device) for i in shape.hessian_columns(shared or []))


def write_seconds(shape: BlockShape, bits: int, device: Device) -> float:
    """Writing the finished block: its packed weights (plus scales) and the marker."""
    packed = shape.linear_params * (bits / 8 + 0.1) + (shape.params - shape.linear_params) * 2
    return device.block_write_seconds + packed / device.write_bytes


def training_seconds(shape: BlockShape, q: QuantizationConfig, work: Workload, device: Device,
                     share: int) -> dict[str, float]:
    cfg = q.omniquant
    steps = cfg.total_steps(work.windows)
    passes = cfg.window_passes(work.windows)  # epochs, fractional when steps cuts one short
    window_flops = forward_flops(shape, work.seq_len, work.seq_len)
    per_window = 3.0 * window_flops / device.train_flops  # forward + backward (2x)
    words = QUANTIZER_PASSES_FUSED if cfg.compile_quantizer else QUANTIZER_PASSES
    quantizer = words * 4 * shape.linear_params / device.elementwise_bytes
    # each window runs forward and backward; every step builds the quantized weights once and
    # sends the windows' summed gradient back through the quantizer once (data-parallel
    # workers split that work among them)
    dp = work.schedule is Schedule.DATA_PARALLEL and work.workers > 1
    # (not under float16 loss scaling, as in training)
    split = dp and cfg.shard_quantizer and cfg.autocast is not Autocast.FLOAT16
    train = passes * share * per_window + steps * quantizer / (work.workers if split else 1)
    out = {"train": train,
           "probe": 2 * min(16, share) * window_flops / device.forward_flops}
    if cfg.sde is not None:
        # U Δ Vh per linear once per step, forward and back (3 products of out x r x in), and
        # each linear's thin SVD once (LAPACK's rate: taken as a twentieth of a GEMM's; not
        # validated)
        product = sum(2.0 * o * i * min(o, i) for _, o, i in shape.linears)
        out["sde"] = steps * 3 * product / device.train_flops + \
            10 * product / device.forward_flops
    if cfg.cross_layer is not None:
        # every window also goes forward and back through the next blocks, which are frozen:
        # their backward forms the input's gradient only (about one forward's products, not
        # the two of a backward that also forms the weights'); their FP targets are computed
        # once. (P1 W3 g64, 1 worker x 2 threads, idle machine: p1-cqe-plus-w3g64 predicted
        # 2112 s against 1810.6 s measured, the 6 x 2 best preset with it 4110 s against
        # 3496.9 s; the term it replaced gave about 2440 and 4800 s.)
        depth = cfg.cross_layer.depth
        frozen = 2.0 * window_flops / device.train_flops
        out["cross_layer"] = (passes * share * depth * frozen
                              + depth * share * window_flops / device.forward_flops)
    if cfg.keep_best_every and steps:  # (needs keep_best)
        # keep_best's checks: the probe's windows forward in float32 every N steps and after
        # the last; under cross-layer learning through the next blocks too, and at the start
        # (without it the start's check is the probe's own)
        cl = cfg.cross_layer
        checks = -(-steps // cfg.keep_best_every) + (1 if cl is not None else 0)
        depth = 1 + (cl.depth if cl is not None else 0)
        out["keep_best_checks"] = (checks * depth * min(16, share) * window_flops
                                   / device.forward_flops)
    if q.omniquant.rounding is Rounding.GPTQ or q.omniquant.round_init == "gptq":
        out["gptq"] = sweep_seconds(shape, device)
    if dp:
        # the summed gradient of the block's quantized tensors, float32 for global batches of
        # up to two windows, else float64
        width = 4 if cfg.batch_size <= 2 else 8
        if split and device.host:  # through shared memory: each worker writes its gradient
            # sums and its share of the tensors, and reads the others' part of the sums of its
            # own share
            moved = 4 / work.workers + width * (1 + 1 / work.workers)
            out["collective"] = steps * shape.linear_params * moved / device.elementwise_bytes
        elif split:  # over the links (NCCL): each owner broadcasts its tensors (float32) and
            # the gradient sums are reduced to their owners, each pipelined through a ring
            out["collective"] = steps * shape.linear_params * (4 + width) / device.network_bytes
        else:
            ring = 2.0 * (work.workers - 1) / work.workers
            out["collective"] = steps * shape.params * width * ring / device.network_bytes
    return out


@dataclasses.dataclass(frozen=True)
class Estimate:
    block_seconds: list[dict[str, float]]
    memory: dict[str, int]
    seconds: float
    fits: bool
    device: Device

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "memory_bytes": sum(self.memory.values()),
                "memory": self.memory, "fits": self.fits, "device": self.device.to_dict(),
                "block_seconds": self.block_seconds}


def estimate(shape: BlockShape, blocks: int, q: QuantizationConfig, work: Workload,
             device: Device, shared_hessians: list[list[str]],
             startup_seconds: float = STARTUP_SECONDS) -> Estimate:
    """The run's quantize phase: blocks one after another (every worker on each block under
    data_parallel; one stage at a time under sequential); data-free blocks spread over the
    workers."""
    per_block = block_seconds(shape, q, work, device, shared_hessians)
    total = sum(per_block.values())
    seconds = startup_seconds + device.stage_start_seconds + (
        total * math.ceil(blocks / work.workers) if work.windows == 0 else total * blocks)
    memory = worker_memory(shape, q, work, shared_hessians, device)
    in_memory = sum(v for k, v in memory.items() if k != "streams_on_disk")
    return Estimate([per_block] * blocks, memory, seconds, in_memory <= device.memory_bytes,
                    device)
