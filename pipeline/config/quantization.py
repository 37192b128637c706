"""The `quantization` section: the method and its settings (GPTQ, OmniQuant, LoRC; CVXQ's bit
budget is `budget`), the grid, the per-linear overrides."""
from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

from pipeline.config.base import _require, check_module_pattern
from pipeline.config.budget import BudgetConfig


class Method(str, enum.Enum):
    RTN = "rtn"
    GPTQ = "gptq"
    OMNIQUANT = "omniquant"


class Rounding(str, enum.Enum):
    NEAREST = "nearest"
    GPTQ = "gptq"
    LEARNED = "learned"


class Observer(str, enum.Enum):
    """How rtn and gptq choose each group's range (pipeline/formats/affine.py)."""
    MINMAX = "minmax"  # the group's extremes
    # the extremes shrunk by the factor (1 down to 0.21) whose round trip errs least
    MSE = "mse"


class Optimizer(str, enum.Enum):
    ADAMW = "adamw"  # the reference's (OmniQuant), constant learning rates
    # AutoRound's: p -= lr * sign(grad), the learning rates decayed linearly to 0 over the run
    SIGNSGD = "signsgd"


class ClipParam(str, enum.Enum):
    SIGMOID = "sigmoid"  # the reference's (OmniQuant): factor = sigmoid(logit)
    # AutoRound's: the factor itself is the parameter, clamped to [0, 1] after every step
    DIRECT = "direct"


class Autocast(str, enum.Enum):
    # float16 autocast with loss scaling on CUDA (float32 where a width is 8 to 15 bits, whose
    # fake-quant overflows float16 gradients: the reference's rule), float32 on the CPU
    AUTO = "auto"
    FLOAT32 = "float32"  # no autocast
    # the block's matmuls and attention in bfloat16, the quantizer, loss and parameters in
    # float32 (AutoRound's default, on the CPU too)
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"  # the same in float16, with loss scaling


OVERRIDE_KEYS = ("bits", "group_size", "symmetric")
SYMMETRIC_RANGES = (None, "restricted", "full")


@dataclasses.dataclass(frozen=True)
class GPTQConfig:
    # dampening added to the Hessian diagonal, as a fraction of its mean; multiplied by 10 each
    # time the Cholesky factorization fails (the damping used is logged and reported)
    damp: float = 0.01
    block_size: int = 128  # columns updated lazily together
    act_order: bool = False  # columns in order of decreasing Hessian diagonal (static groups)

    def __post_init__(self) -> None:
        _require(0 < self.damp < 1, f"quantization.gptq.damp: {self.damp}; must be in (0, 1)")
        _require(self.block_size >= 1,
                 f"quantization.gptq.block_size: {self.block_size}; must be >= 1")


@dataclasses.dataclass(frozen=True)
class SDEConfig:
    """CQE+'s singular-value diagonal expansion: every quantized linear's weight is trained as
    U (diag(S) + Δ) Vh, Δ on a band of diagonals (plus an optional dense block over the largest
    singular directions), starting at 0 (pipeline/methods/sde.py)."""

    band: int = 1  # off-diagonals on each side of Δ's diagonal (0 with block 0: LSI)
    block: int = 0  # k: a dense k x k correction over the k largest singular directions
    # learning rate of Δ (relative units; LSI used 2e-4 on absolute ones, with AdamW)
    lr: float = 1e-3
    # Δ's entry (i, j) in units of sqrt(S_i S_j) (one rate moves every layer by the same
    # fraction); false: absolute (LSI's parametrization)
    relative: bool = True
    # weight of the penalty sum over the linears of ||ΔW||_F^2 / ||W||_F^2, added to each
    # step's loss: keeps the weights near the original (0: none)
    penalty: float = 0.0

    def __post_init__(self) -> None:
        where = "quantization.omniquant.sde"
        for name in ("band", "block"):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                     f"{where}.{name}: {value!r}; must be an integer >= 0")
        _require(self.lr > 0, f"{where}.lr: {self.lr}; must be > 0")
        _require(self.penalty >= 0, f"{where}.penalty: {self.penalty}; must be >= 0")


@dataclasses.dataclass(frozen=True)
class CrossLayerConfig:
    """CQE+'s cross-layer learning: while a block trains, its output also goes through the next
    `depth` blocks (full precision, frozen, read from storage), and the loss adds `weight` times
    the error there against their FP outputs (pipeline/methods/cross_layer.py)."""

    weight: float = 1.0  # of each downstream block's error in the loss
    depth: int = 1  # how many blocks ahead (1 or 2); the model's last blocks use what exists

    def __post_init__(self) -> None:
        where = "quantization.omniquant.cross_layer"
        _require(self.weight >= 0, f"{where}.weight: {self.weight}; must be >= 0")
        _require(self.depth in (1, 2), f"{where}.depth: {self.depth!r} is not allowed; "
                 "choose 1 or 2")


@dataclasses.dataclass(frozen=True)
class OmniQuantConfig:
    lwc: bool = True  # learnable weight clipping
    let: bool = False  # learnable equivalent transformation
    epochs: int = 20  # passes over the calibration windows per block
    batch_size: int = 1  # calibration windows per optimizer step
    # optimizer steps per block, in place of epochs (AutoRound's iters): the windows are gone
    # through in order, batch_size per step, as many passes as the steps need, the last one
    # cut short (e.g. 192 steps of 1 over 128 windows: 1.5 passes); null: epochs passes
    steps: int | None = None
    lwc_lr: float = 1e-2  # learning rate of the clipping parameters
    let_lr: float = 5e-3  # learning rate of the equivalent transforms
    weight_decay: float = 0.0  # AdamW's, on every learned parameter
    alpha: float = 0.5  # SmoothQuant migration strength of the LET scale init
    aug_loss: bool = False  # also fit the FP block applied to the quantized stream
    # clipping factor init (sigmoid(4.0) = 0.982, the reference's)
    lwc_init: float = 4.0
    # how a clipping factor is parametrized: sigmoid (the reference's logit) or direct (the
    # factor itself, started at sigmoid(lwc_init) and kept in [0, 1], as AutoRound's min/max
    # scales; with sign gradients a sigmoid factor started near 1 barely moves)
    clip_param: ClipParam = ClipParam.SIGMOID
    # rounding onto the learned grid: nearest (the reference), gptq (GPTQ's error feedback on
    # the folded weights, Hessians from the quantized stream), or learned (a per-weight offset
    # in [-0.5, 0.5] trained with the other parameters on the block loss, as AutoRound does)
    rounding: Rounding = Rounding.NEAREST
    round_lr: float = 5e-3  # learning rate of the rounding offsets
    # where learned rounding starts: nearest (offsets 0, AutoRound's) or gptq (offsets that
    # reproduce GPTQ's codes on the initial grid, Hessians from the quantized stream)
    round_init: str = "nearest"
    optimizer: Optimizer = Optimizer.ADAMW  # signsgd: AutoRound's sign gradients, lr decayed to 0
    # keep the parameters of the step with the lowest training loss instead of the last ones
    # (AutoRound's rule; the loss of a step is that of the parameters before its update)
    keep_best: bool = False
    # what keep_best judges by: 0, each step's loss on its own batch (AutoRound's rule; the
    # batches differ, so a lucky batch can win); N > 0, the loss on a fixed set (the block's
    # first 16 windows, the probe's, with the cross-layer terms when on) measured in float32
    # before training, every N steps and after the last one, the parameters of the lowest kept
    # (the start included, so the block never ends worse than the host method's point there)
    keep_best_every: int = 0
    # data-parallel workers split the quantizer: each computes and trains its share of the
    # linears' fake-quant (the others read it: shared memory on one node, else
    # torch.distributed) instead of all of it; false: every worker computes the whole
    # quantizer (the reference for the split)
    shard_quantizer: bool = True
    # the precision of the block's forward and backward while training (the learned parameters,
    # the quantizer and the loss stay float32); the probes, the fold and the streams are
    # unaffected. auto: on the CPU bfloat16 where it has bfloat16 kernels (AVX-512/AMX), else
    # float32; on CUDA float16 (float32 at 8 bits)
    autocast: Autocast = Autocast.AUTO
    # windows per forward and backward pass while training (at most batch_size): 1 keeps every
    # window's gradient on its own, so 1 and N data-parallel workers take bit-identical steps;
    # more batches a worker's windows of a step into fewer, larger passes (faster; the steps
    # then match those of another worker count to float rounding only)
    micro_batch: int = 1
    # the block's calibration stream passes (the FP targets, the quantized stream onward) in
    # the training precision too, as AutoRound does (faster in bfloat16; false: float32)
    stream_autocast: bool = False
    # the block's training forward and backward compiled with torch.compile (inductor), once
    # per process: the block is an input of the compiled call, so every block of the same
    # class and shapes reuses the code (regional compilation); activation-quantized recipes
    # (abits < 16) and the probes, the fold and the streams stay eager. Costs one compilation
    # per worker process (about 25 s for a P1 block on a 2-core CPU), needs a C++ compiler on
    # the CPU (where it cannot compile, the call runs eagerly with a warning)
    compile: bool = False
    # the learned fake-quant of the block's weights (clipping, the learned rounding) compiled
    # with torch.compile into fused loops, forward and backward: the step's cost outside the
    # windows' passes (one compilation per weight shape and worker process, cached on disk by
    # inductor; needs a C++ compiler on the CPU, else it runs eagerly with a warning)
    compile_quantizer: bool = False
    # with bfloat16 training (autocast), the block itself in bfloat16 while training: its
    # weights (the fake-quantized ones included) cast once per step and the windows'
    # activations, residual stream included, in bfloat16, as AutoRound runs a block on the CPU,
    # instead of float32 activations cast op by op; the loss, the gradients' sums, the
    # quantizer and the learned parameters stay float32. No effect in float32 or float16
    cast_block: bool = False
    # with stream_autocast in bfloat16, the block's stream passes (the FP targets, the
    # quantized stream onward) with the block cast to bfloat16 too, residual stream included
    # (faster; on P1 W4 it cost accuracy: the targets' rounding in the large channels)
    stream_cast_block: bool = False
    # CQE+'s singular-value diagonal expansion (null: off)
    sde: SDEConfig | None = None
    # CQE+'s cross-layer learning (null: off)
    cross_layer: CrossLayerConfig | None = None

    def __post_init__(self) -> None:
        where = "quantization.omniquant"
        _require(self.lwc or self.let or self.rounding is Rounding.LEARNED
                 or self.sde is not None,
                 f"{where}: lwc and let are both false, rounding is not learned and sde is "
                 "null; enable at least one, or use quantization.method rtn")
        _require(self.sde is None or self.round_init == "nearest",
                 f"{where}.round_init: gptq cannot be combined with sde (the offsets reproduce "
                 "GPTQ's codes of the unexpanded weight); use nearest")
        _require(self.epochs >= 0, f"{where}.epochs: {self.epochs}; must be >= 0")
        _require(self.steps is None or (isinstance(self.steps, int) and self.steps >= 0),
                 f"{where}.steps: {self.steps!r}; must be null or an integer >= 0")
        _require(self.batch_size >= 1, f"{where}.batch_size: {self.batch_size}; must be >= 1")
        _require(1 <= self.micro_batch <= self.batch_size,
                 f"{where}.micro_batch: {self.micro_batch}; must be in [1, batch_size "
                 f"({self.batch_size})]")
        for name in ("lwc_lr", "let_lr", "round_lr"):
            value = getattr(self, name)
            _require(value > 0, f"{where}.{name}: {value}; must be > 0")
        _require(self.round_init in ("nearest", "gptq"),
                 f"{where}.round_init: {self.round_init!r} is not allowed; choose nearest or gptq")
        _require(self.round_init == "nearest" or (self.rounding is Rounding.LEARNED
                                                  and not self.let),
                 f"{where}.round_init: gptq needs rounding: learned and let: false")
        _require(isinstance(self.keep_best_every, int) and self.keep_best_every >= 0,
                 f"{where}.keep_best_every: {self.keep_best_every!r}; must be an integer >= 0 "
                 "(0: each step's own batch)")
        _require(self.keep_best_every == 0 or self.keep_best,
                 f"{where}.keep_best_every: {self.keep_best_every} needs keep_best: true")
        _require(self.weight_decay >= 0,
                 f"{where}.weight_decay: {self.weight_decay}; must be >= 0")
        _require(0 <= self.alpha <= 1, f"{where}.alpha: {self.alpha}; must be in [0, 1]")

    def total_steps(self, windows: int) -> int:
        """Optimizer steps per block over `windows` calibration windows."""
        if self.steps is not None:
            return self.steps
        return self.epochs * math.ceil(windows / self.batch_size)

    def window_passes(self, windows: int) -> float:
        """Window forward-and-backward passes per block, in units of the whole set of
        `windows` (epochs, fractional when `steps` ends a pass early)."""
        per_pass = math.ceil(windows / self.batch_size)
        steps = self.total_steps(windows)
        whole, rest = divmod(steps, per_pass) if per_pass else (0, 0)
        return whole + min(rest * self.batch_size, windows) / windows if windows else 0.0


class LorcDtype(str, enum.Enum):
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    # int8 codes with one absmax scale per rank component; the PEFT adapter carries them
    # dequantized into the model's dtype (PEFT and vLLM load float LoRA weights only)
    INT8 = "int8"


@dataclasses.dataclass(frozen=True)
class LorcConfig:
    """ZeroQuant-V2's low-rank compensation: each targeted quantized linear gets a rank-`rank`
    correction B·A of its quantization error, carried in the quantized stream and exported as
    a PEFT LoRA adapter (OUTPUT/lorc/)."""

    rank: int = 8  # of each correction B·A
    dtype: LorcDtype = LorcDtype.FLOAT16  # how B and A are stored
    # null: every quantized linear; else exact module names or `re:` regexes (whole name)
    targets: list[str] | None = None
    # with quantization.budget.average_bits: the adapter's bits count in the budget
    count_in_budget: bool = False
    # weight the error by each input channel's rms on the quantized stream (ASVD's scaling;
    # not the paper's): minimizes the output error instead of the weight error
    activation_aware: bool = False

    def __post_init__(self) -> None:
        where = "quantization.lorc"
        _require(isinstance(self.rank, int) and self.rank >= 1,
                 f"{where}.rank: {self.rank!r}; must be an integer >= 1")
        for pattern in self.targets or []:
            check_module_pattern(pattern, f"{where}.targets")
        _require(self.targets is None or bool(self.targets),
                 f"{where}.targets: empty; give module names or re: patterns, or null for "
                 "every quantized linear")


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
    method: Method = Method.RTN
    bits: int = 4  # weight bits, 2 to 8
    group_size: int | None = None  # input columns per scale; null: one per output channel
    symmetric: bool = False  # codes around zero, no zero point (what vLLM serves at 2-8 bits)
    # symmetric grids: null (or "restricted"): scale = absmax / (2^(b-1) - 1), the largest
    # weight exact and code -2^(b-1) unused (llm-compressor's RTN); "full": scale =
    # absmax / 2^(b-1), every code used (AutoRound's; 4 levels instead of 3 at 2 bits)
    symmetric_range: str | None = None
    # how rtn and gptq choose each group's range: minmax (the extremes) or mse (the extremes
    # shrunk by the factor, 1 down to 0.21, whose round trip errs least; costs 80 round trips
    # of each weight). omniquant learns its range instead.
    observer: Observer = Observer.MINMAX
    # per-linear exceptions, first match wins: exact module name or `re:` regex -> a mapping
    # of the keys to change (bits, group_size, symmetric), or null to keep it in full precision
    overrides: dict[str, dict[str, Any] | None] = dataclasses.field(default_factory=dict)
    # activation bits: 16 = weight-only; 4-8 = per-token dynamic fake-quant of every quantized
    # linear's input (accuracy path only: such models are not exported with their activations)
    abits: int = 16
    # CVXQ's bias correction after quantizing a block: b <- b - (W_q - W) E[x], E[x] the mean
    # input of the linear over the quantized stream through the quantized block. Only linears
    # that have a bias in the checkpoint (OPT; Qwen2's q/k/v; ...) are corrected: adding a
    # bias would change the architecture the export declares. Not with omniquant.let (the
    # transform changes the linear's input basis).
    bias_correction: bool = False
    gptq: GPTQConfig = dataclasses.field(default_factory=GPTQConfig)
    omniquant: OmniQuantConfig = dataclasses.field(default_factory=OmniQuantConfig)
    budget: BudgetConfig = dataclasses.field(default_factory=BudgetConfig)
    # null: no low-rank compensation (absent from earlier manifests, which still match)
    lorc: LorcConfig | None = None

    def __post_init__(self) -> None:
        _require(self.symmetric_range in SYMMETRIC_RANGES,
                 f"quantization.symmetric_range: {self.symmetric_range!r} is not allowed; choose "
                 "restricted (or null) or full")
        if self.symmetric_range == "restricted":  # the default's explicit name
            object.__setattr__(self, "symmetric_range", None)
        _require(self.symmetric_range is None or self.symmetric or any(
            isinstance(c, dict) and c.get("symmetric") is True for c in self.overrides.values()),
                 f"quantization.symmetric_range: {self.symmetric_range} applies to symmetric "
                 "grids, but quantization.symmetric is false (and no override sets it); set "
                 "symmetric: true, or drop symmetric_range")
        for name in ("sde", "cross_layer"):
            _require(self.method is Method.OMNIQUANT or getattr(self.omniquant, name) is None,
                     f"quantization.omniquant.{name}: applies to method omniquant only, but "
                     f"quantization.method is {self.method.value}; set method: omniquant, or "
                     f"{name}: null")
        _require(self.observer is Observer.MINMAX or self.method is not Method.OMNIQUANT,
                 f"quantization.observer: {self.observer.value} applies to methods rtn and gptq; "
                 "omniquant learns its range (omniquant.lwc), so leave the observer minmax")
        _require(self.lorc is None or not self.lorc.count_in_budget
                 or self.budget.average_bits is not None,
                 "quantization.lorc.count_in_budget: needs quantization.budget.average_bits")
        _require(self.abits == 16 or 4 <= self.abits <= 8,
                 f"quantization.abits: {self.abits} is not allowed; choose 16 (weight-only) or "
                 "an integer from 4 to 8")
        for pattern, change in self.overrides.items():
            where = f"quantization.overrides[{pattern!r}]"
            check_module_pattern(pattern, where)
            if change is None:
                continue
            _require(isinstance(change, dict), f"{where}: expected a mapping of "
                     f"{', '.join(OVERRIDE_KEYS)} or null (keep in full precision)")
            unknown = sorted(set(change) - set(OVERRIDE_KEYS))
            _require(not unknown, f"{where}.{unknown[0] if unknown else ''}: unknown key; "
                     f"allowed: {', '.join(OVERRIDE_KEYS)}")
            bits = change.get("bits", self.bits)
            _require(isinstance(bits, int) and 2 <= bits <= 8,
                     f"{where}.bits: {bits!r} is not allowed; choose an integer from 2 to 8")
            group = change.get("group_size", self.group_size)
            _require(group is None or (isinstance(group, int) and not isinstance(group, bool)
                                       and group >= 1),
                     f"{where}.group_size: {group!r}; use a positive integer or null")
            _require(isinstance(change.get("symmetric", False), bool),
                     f"{where}.symmetric: expected true or false")
        _require(not (self.bias_correction and self.method is Method.OMNIQUANT
                      and self.omniquant.let),
                 "quantization.bias_correction: not available with quantization.omniquant.let "
                 "true (the transform changes every linear's input basis); set one of them false")
        _require(2 <= self.bits <= 8,
                 f"quantization.bits: {self.bits} is not allowed; choose an integer from 2 to 8")
        _require(self.group_size is None or self.group_size >= 1,
                 f"quantization.group_size: {self.group_size}; use a positive integer that divides "
                 "every layer's in_features, or null for per-channel")
