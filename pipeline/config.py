"""Typed, frozen run configuration. One tree per run; YAML maps onto it through `build_config`.

Every class validates itself in `__post_init__` and raises `ConfigError` naming the field and the
allowed values. Unknown keys are errors.
"""
from __future__ import annotations

import dataclasses
import enum
import re
from typing import Any


class ConfigError(ValueError):
    """Bad input from the user: a message that names the field and what is allowed."""


class Method(str, enum.Enum):
    RTN = "rtn"
    GPTQ = "gptq"
    OMNIQUANT = "omniquant"


class Rounding(str, enum.Enum):
    NEAREST = "nearest"
    GPTQ = "gptq"
    LEARNED = "learned"


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


class ExportFormat(str, enum.Enum):
    COMPRESSED_TENSORS = "compressed-tensors"  # the output folder itself
    GPTQ = "gptq"  # OUTPUT/gptq/
    FAKE_QUANT = "fake_quant"  # OUTPUT/fake_quant/: dequantized weights in the model's dtype
    # OUTPUT/fake_quant_lorc/: the same with LoRC's B·A folded into each corrected weight (for
    # evaluation; needs quantization.lorc)
    FAKE_QUANT_LORC = "fake_quant_lorc"


class ExportTarget(str, enum.Enum):
    # refuse, before any work, a recipe whose output vLLM has no kernel for
    VLLM = "vllm"


class Device(str, enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class Schedule(str, enum.Enum):
    # the streams travel stage to stage, one block range per worker (the reference; for models
    # whose block cannot fit one worker); forward-only passes are pipelined chunk by chunk
    SEQUENTIAL = "sequential"
    # every worker keeps its share of the calibration windows for the whole run and all workers
    # work on every block together (gradients averaged each step, Hessians summed)
    DATA_PARALLEL = "data_parallel"


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_module_pattern(pattern: str, where: str) -> None:
    """A module name, or `re:` and a regular expression that must compile."""
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as e:
            raise ConfigError(f"{where}: {pattern[3:]!r} is not a valid regular expression "
                              f"({e}); write re: followed by a Python regex matched against "
                              "the whole module name") from e


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # model folder, fsspec URL (s3://..., memory://...) or asset:smollm2-135m (P1's model)
    path: str = ""

    def __post_init__(self) -> None:
        _require(bool(self.path), "model.path: required; give a model folder or an fsspec URL")


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    # sotu:train, sotu:test, dataset:NAME[:CONFIG]:SPLIT, or a .txt/.jsonl/.parquet path or URL
    corpus: str = "sotu:train"
    num_samples: int = 128  # calibration windows
    seq_len: int = 512  # tokens per window (at most the model's context)
    seed: int = 0  # which windows are drawn from the corpus
    text_field: str = "text"  # the record field of a .jsonl/.parquet/dataset corpus

    def __post_init__(self) -> None:
        _require(self.num_samples >= 1, f"calibration.num_samples: {self.num_samples}; must be >= 1")
        _require(self.seq_len >= 2, f"calibration.seq_len: {self.seq_len}; must be >= 2")


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
class OmniQuantConfig:
    lwc: bool = True  # learnable weight clipping
    let: bool = False  # learnable equivalent transformation
    epochs: int = 20  # passes over the calibration windows per block
    batch_size: int = 1  # calibration windows per optimizer step
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
    # the precision of the block's forward and backward while training (the learned parameters,
    # the quantizer and the loss stay float32); the probes, the fold and the streams are
    # unaffected
    autocast: Autocast = Autocast.AUTO

    def __post_init__(self) -> None:
        where = "quantization.omniquant"
        _require(self.lwc or self.let or self.rounding is Rounding.LEARNED,
                 f"{where}: lwc and let are both false and rounding is not learned; enable at "
                 "least one, or use quantization.method rtn")
        _require(self.epochs >= 0, f"{where}.epochs: {self.epochs}; must be >= 0")
        _require(self.batch_size >= 1, f"{where}.batch_size: {self.batch_size}; must be >= 1")
        for name in ("lwc_lr", "let_lr", "round_lr"):
            value = getattr(self, name)
            _require(value > 0, f"{where}.{name}: {value}; must be > 0")
        _require(self.round_init in ("nearest", "gptq"),
                 f"{where}.round_init: {self.round_init!r} is not allowed; choose nearest or gptq")
        _require(self.round_init == "nearest" or (self.rounding is Rounding.LEARNED
                                                  and not self.let),
                 f"{where}.round_init: gptq needs rounding: learned and let: false")
        _require(self.weight_decay >= 0,
                 f"{where}.weight_decay: {self.weight_decay}; must be >= 0")
        _require(0 <= self.alpha <= 1, f"{where}.alpha: {self.alpha}; must be in [0, 1]")


class Objective(str, enum.Enum):
    PCA = "pca"  # random signs on the final hidden states' top principal directions (CVXQ)
    LM_LOSS = "lm_loss"  # the next-token loss


class Distortion(str, enum.Enum):
    MODEL = "model"  # CVXQ's high-resolution model: G^2 S^2 2^(-2b) per weight
    # G^2 times the unit's measured RTN error per weight at each option (width, group size)
    MEASURED = "measured"


@dataclasses.dataclass(frozen=True)
class BudgetConfig:
    """CVXQ: one average-bit budget over the whole model, allocated per decision unit (the
    fused groups q/k/v, o, gate/up, down of every block)."""

    average_bits: float | None = None  # null: no allocation, every unit gets quantization.bits
    # the bit widths a unit may get
    choices: list[int] = dataclasses.field(default_factory=lambda: [2, 3, 4, 8])
    # count scales and zero points in the budget (bits per weight of side information)
    count_side_info: bool = False
    # what a unit's sensitivity is measured on: the final hidden states' principal directions
    # (pca, CVXQ's) or the language-model loss
    objective: Objective = Objective.PCA
    pca_dims: int = 1024  # principal directions of the final hidden states (capped at hidden)
    seed: int = 0  # random signs of the projected objective
    # reuse the per-unit sensitivity statistics of an earlier run of the same model (its
    # report.json or .relayquant/allocation.json, path or fsspec URL) instead of running the
    # sensitivity pass; the allocation is solved again for this budget
    sensitivity_from: str | None = None
    # a unit's error at each width: model (G^2 S^2 2^(-2b), CVXQ's) or measured (its RTN error)
    distortion: Distortion = Distortion.MODEL
    # group sizes the allocator may give a unit along with its width (null = per-channel), the
    # side information of each counted in its cost; empty = the recipe's group size everywhere.
    # Needs distortion: measured (the high-resolution model has no group-size term)
    group_sizes: list[int | None] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        where = "quantization.budget"
        _require(all(g is None or (isinstance(g, int) and g >= 1) for g in self.group_sizes)
                 and len(set(self.group_sizes)) == len(self.group_sizes),
                 f"{where}.group_sizes: {self.group_sizes}; give distinct positive integers "
                 "(each dividing every quantized linear's in_features) or null for per-channel")
        _require(not self.group_sizes or self.distortion is Distortion.MEASURED,
                 f"{where}.group_sizes: needs {where}.distortion: measured (the model "
                 "distortion G^2 S^2 2^(-2b) does not depend on the group size)")
        _require(self.sensitivity_from is None or self.average_bits is not None,
                 f"{where}.sensitivity_from: needs {where}.average_bits")
        _require(bool(self.choices) and all(isinstance(c, int) and 2 <= c <= 8
                                            for c in self.choices),
                 f"{where}.choices: {self.choices}; give bit widths from 2 to 8")
        if self.average_bits is not None:
            _require(min(self.choices) <= self.average_bits,
                     f"{where}.average_bits: {self.average_bits} is below the smallest choice "
                     f"{min(self.choices)}")
        _require(self.pca_dims >= 1, f"{where}.pca_dims: {self.pca_dims}; must be >= 1")


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
            _require(group is None or (isinstance(group, int) and group >= 1),
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


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    # the folders written: compressed-tensors (vLLM, transformers) in OUTPUT, others beside it
    formats: list[ExportFormat] = dataclasses.field(
        default_factory=lambda: [ExportFormat.COMPRESSED_TENSORS])
    # the engine the output must run on; null: any (a plan vLLM cannot serve is only warned
    # about, and the report says so)
    target: ExportTarget | None = None

    def __post_init__(self) -> None:
        _require(ExportFormat.COMPRESSED_TENSORS in self.formats,
                 "export.formats: must include compressed-tensors (the output folder itself is "
                 "that checkpoint); gptq and fake_quant are written beside it")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    # also write both streams at each finished block's boundary, so a resumed run reads them
    # instead of recomputing them through every finished block (costs disk: 2 streams)
    save_streams: bool = False


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    corpus: str = "sotu:test"  # as calibration.corpus; held-out text
    seq_len: int = 512  # tokens per perplexity window
    max_windows: int | None = None  # null: every window of the corpus
    fp: bool = True  # also the unquantized model's perplexity (cached per model and corpus)
    enabled: bool = True  # perplexity after quantizing
    # each block's output error against the FP stream; null: on where the method streams the
    # calibration windows anyway, off in the data-free path (RTN), where it would be the only
    # reason to stream them
    block_errors: bool | None = None

    def __post_init__(self) -> None:
        _require(self.seq_len >= 2, f"eval.seq_len: {self.seq_len}; must be >= 2")
        _require(self.max_windows is None or self.max_windows >= 1,
                 f"eval.max_windows: {self.max_windows}; must be >= 1 or null (all windows)")


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    workers: int = 1  # stage actors (one per GPU, or a share of the CPUs)
    # Ray cluster: null (RAY_ADDRESS, else a local Ray), auto, local, HOST:PORT, ray://HOST:PORT
    address: str | None = None
    chunk_size: int = 8  # calibration windows per stream chunk
    device: Device = Device.AUTO  # auto: cuda where the cluster has GPUs
    dashboard: bool = False  # a local Ray's dashboard
    compute_dtype: str = "float32"  # float32, bfloat16 or float16
    # torch threads per stage; None = every core of the stage's node on CPU (one stage computes
    # at a time in the sequential schedule), the reserved CPUs on GPU stages
    threads: int | None = None
    # how often a run restarts its stages after one dies before it gives up
    max_retries: int = 2
    # null: data_parallel when workers > 1, else sequential
    schedule: Schedule | None = None
    # bytes of stream chunks a data-parallel worker keeps in memory; the rest goes to its local
    # disk. null: a quarter of the node's memory divided among the workers
    activation_memory_bytes: int | None = None

    @property
    def resolved_schedule(self) -> Schedule:
        if self.schedule is not None:
            return self.schedule
        return Schedule.DATA_PARALLEL if self.workers > 1 else Schedule.SEQUENTIAL

    def __post_init__(self) -> None:
        _require(self.max_retries >= 0, f"cluster.max_retries: {self.max_retries}; must be >= 0")
        _require(self.threads is None or self.threads >= 1,
                 f"cluster.threads: {self.threads}; must be >= 1 or null (automatic)")
        _require(self.workers >= 1, f"cluster.workers: {self.workers}; must be >= 1")
        _require(self.chunk_size >= 1, f"cluster.chunk_size: {self.chunk_size}; must be >= 1")
        _require(self.activation_memory_bytes is None or self.activation_memory_bytes >= 0,
                 f"cluster.activation_memory_bytes: {self.activation_memory_bytes}; must be >= 0 "
                 "(0: every chunk on disk) or null (a share of the node's memory)")
        allowed = ("float32", "bfloat16", "float16")
        _require(self.compute_dtype in allowed,
                 f"cluster.compute_dtype: {self.compute_dtype!r}; choose one of {', '.join(allowed)}")
        if self.address is not None:
            check_ray_address(self.address, "cluster.address")


# what ray.init accepts as an address: a running cluster found on this node, a fresh local
# one, the head's GCS (host:port) or a Ray Client server (ray://host:port)
_RAY_ADDRESS = re.compile(r"^(ray://)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


def check_ray_address(address: str, field: str) -> None:
    _require(isinstance(address, str) and (address in ("auto", "local") or bool(
        (m := _RAY_ADDRESS.match(address)) and 0 < int(m.group(3)) < 65536)),
        f"{field}: {address!r} is not a Ray address; give auto, local, HOST:PORT (the head's "
        "GCS, e.g. 10.0.0.1:6379) or ray://HOST:PORT (Ray Client, e.g. ray://10.0.0.1:10001)")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    output: str = ""  # output folder or fsspec URL
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)
    quantization: QuantizationConfig = dataclasses.field(default_factory=QuantizationConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        _require(bool(self.output), "output: required; give a folder or an fsspec URL")
        _require(ExportFormat.FAKE_QUANT_LORC not in self.export.formats
                 or self.quantization.lorc is not None,
                 "export.formats: fake_quant_lorc needs quantization.lorc (the factors it folds)")
        omni = self.quantization.omniquant
        _require(self.quantization.method is not Method.OMNIQUANT
                 or omni.batch_size <= self.calibration.num_samples,
                 f"quantization.omniquant.batch_size: {omni.batch_size} exceeds "
                 f"calibration.num_samples {self.calibration.num_samples}; a step cannot take "
                 "more windows than there are (lower it, or calibrate on more windows)")
        if self.export.target is ExportTarget.VLLM:
            _require_vllm_schemes(self.quantization)


VLLM_ASYMMETRIC_BITS = (4, 8)  # vLLM's wNa16 kernels: symmetric 2-8 bits, asymmetric 4 and 8


def _require_vllm_schemes(q: QuantizationConfig) -> None:
    """export.target vllm: every (bits, symmetric) the recipe can produce has a vLLM kernel.
    Mixed schemes inside a fused group are refused for every target (pipeline.schemes)."""
    sources = [("quantization.bits", q.bits, q.symmetric)]
    for pattern, change in q.overrides.items():
        if change is not None:
            sources.append((f"quantization.overrides[{pattern!r}]", change.get("bits", q.bits),
                            change.get("symmetric", q.symmetric)))
    if q.budget.average_bits is not None:
        sources += [("quantization.budget.choices", bits, symmetric) for bits in q.budget.choices
                    for _, _, symmetric in list(sources)]
    for where, bits, symmetric in sources:
        _require(symmetric or bits in VLLM_ASYMMETRIC_BITS,
                 f"export.target: vllm has no kernel for asymmetric {bits}-bit weights (from "
                 f"{where}); vLLM serves symmetric weights at 2-8 bits and asymmetric ones at 4 "
                 "and 8: set symmetric: true, or bits 4 or 8, or drop export.target")
