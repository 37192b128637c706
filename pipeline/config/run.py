"""The run: the model, the calibration and evaluation text, the export, the checkpoint and the
cluster, with the quantization section (`pipeline/config/quantization.py`) inside."""
from __future__ import annotations

import dataclasses
import enum
import re

from pipeline.config.base import _require, check_seed
from pipeline.config.quantization import Method, QuantizationConfig


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


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # model folder, fsspec URL (s3://..., memory://...) or asset:smollm2-135m (P1's model)
    path: str = ""

    def __post_init__(self) -> None:
        _require(bool(self.path), "model.path: required; give a model folder or an fsspec URL")


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    # sotu:train, sotu:test, mail:test, dataset:NAME[:CONFIG]:SPLIT, or a .txt/.jsonl/.parquet
    # path or URL
    corpus: str = "sotu:train"
    num_samples: int = 128  # calibration windows
    seq_len: int = 512  # tokens per window (at most the model's context)
    seed: int = 0  # which windows are drawn from the corpus
    text_field: str = "text"  # the record field of a .jsonl/.parquet/dataset corpus

    def __post_init__(self) -> None:
        _require(self.num_samples >= 1, f"calibration.num_samples: {self.num_samples}; must be >= 1")
        _require(self.seq_len >= 2, f"calibration.seq_len: {self.seq_len}; must be >= 2")
        check_seed(self.seed, "calibration.seed")
        _require(bool(self.text_field.strip()), "calibration.text_field: empty; give the name "
                 "of the record field that holds the text (default text)")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    # the folders written: compressed-tensors (vLLM, transformers) in OUTPUT, others beside it
    formats: list[ExportFormat] = dataclasses.field(
        default_factory=lambda: [ExportFormat.COMPRESSED_TENSORS])
    # the engine the output must run on; null: any (a plan vLLM cannot serve is only warned
    # about, and the report says so)
    target: ExportTarget | None = None

    def __post_init__(self) -> None:
        _require(len(set(self.formats)) == len(self.formats),
                 f"export.formats: {', '.join(f.value for f in self.formats)} names a format "
                 "twice; list each once")
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
    # each block's output error against the FP stream; null: on for learned methods (they
    # carry the FP stream as their targets anyway), off for GPTQ and RTN, where it would cost
    # an FP stream (a forward pass per block and its memory) or, for data-free RTN, streaming
    # the calibration at all
    block_errors: bool | None = None
    # each block's error carried to the model's output depth (its quantized output through the
    # FP blocks after it, against the FP model's last hidden state), measured on this many of
    # the evaluation windows after quantizing; 0: off. Costs about (blocks / 2 + 2) forward
    # passes of the model over those windows (pipeline/evaluation/depth_errors.py)
    depth_errors: int = 0
    # with quantization.lorc: also the perplexity without the adapter (the same quantized
    # weights; a second evaluation pass over the windows); false: the adapted model's only
    without_lorc: bool = True

    def __post_init__(self) -> None:
        _require(self.seq_len >= 2, f"eval.seq_len: {self.seq_len}; must be >= 2")
        _require(isinstance(self.depth_errors, int) and not isinstance(self.depth_errors, bool)
                 and self.depth_errors >= 0,
                 f"eval.depth_errors: {self.depth_errors!r}; must be an integer >= 0 (windows; "
                 "0: off)")
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
