"""What a stage does to one block, or to the embedding and head, over whole streams.

Each function loads what it needs, walks the chunks one at a time through a `ChunkStore`, and
frees the block before returning, so a stage's memory is one block plus the chunks in flight,
whatever the model's depth.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import psutil
import torch

from pipeline.config import ExportFormat, Method, QuantizationConfig
from pipeline.export import FOLDERS, QuantizedLinear, block_tensors
from pipeline.formats import AffineFormat, QuantParams
from pipeline.formats.gptq import zero_overflow as gptq_zero_overflow
from pipeline.formats.peft_adapter import block_lora
from pipeline.methods import lorc_block
from pipeline.methods.rtn import rtn_quantize
from pipeline.model_parts import ModelParts, embed, run_block, token_nll
from pipeline.parallel.collective import Collective, Solo, sum_scalars
from pipeline.parallel.shares import WindowShare
from pipeline.reconstruct import (
    activation_quant,
    gptq_block,
    input_hooks,
    input_stats,
    quantized_names,
    train_block,
)
from pipeline.reporting.process_memory import peak_rss_bytes, private_bytes
from pipeline.schemes import block_formats
from pipeline.storage import CheckpointReader
from pipeline.streams import ChunkStore
from pipeline.training.precision import stream_block_dtype, stream_precision


@torch.no_grad()
def embed_stream(parts: ModelParts, ids_chunks: list[torch.Tensor], store: ChunkStore) -> list[Any]:
    modules = parts.load_embedding()
    return [store.put(embed(parts, modules, ids).cpu()) for ids in ids_chunks]


def stored_quantized(parts: ModelParts, index: int) -> list[str]:
    """The block's linears stored quantized (those whose inputs abits < 16 fake-quantizes)."""
    path = parts.block_path(index)
    return [n for n in parts.adapter.linears if f"{path}.{n}" in parts.packed]


@torch.no_grad()
def forward_block(parts: ModelParts, index: int, stream: list[Any], store: ChunkStore,
                  abits: int = 16) -> list[Any]:
    """The stream through one block; with abits < 16 the input of every linear stored quantized
    is fake-quantized per token (the weight-activation accuracy path)."""
    block = parts.load_block(index)
    with activation_quant(block, stored_quantized(parts, index), abits):
        return [store.put(_run(parts, block, store, h)) for h in stream]


@torch.no_grad()
def forward_saved_block(output: str, index: int, files: dict[str, Any], config: dict[str, Any],
                        stream: list[Any], store: ChunkStore, compute_dtype: torch.dtype,
                        device: str, abits: int = 16) -> list[Any]:
    """Forward through a finished block read back from its shards in a run's output (`files`:
    its marker's; used to rebuild the quantized stream when a run resumes), with its LoRC
    factors added when it has them."""
    lora = (block_lora(output, files[lorc_block.STATE_FOLDER]["file"])
            if lorc_block.STATE_FOLDER in files else None)
    parts = ModelParts(CheckpointReader(output, config=config, files=[files[""]["file"]]),
                       compute_dtype, device, lora)
    return forward_block(parts, index, stream, store, abits)


# the share of the memory available at its start that a pass keeps blocks loaded in
RESIDENT_FRACTION = 0.25


def available_bytes(device: str | torch.device) -> int:
    """Free memory where blocks on `device` live: the GPU's own on CUDA, else the host's."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    return int(psutil.virtual_memory().available)


class ResidentBlocks:
    """A stage's blocks (and the head) kept loaded through a pass over many chunks (the
    pipelined forward passes, CVXQ's sensitivity backward), so it reads each block once, not
    once per chunk, as long as they fit `budget_bytes` (default: a quarter of the memory
    available when the pass starts, the GPU's on CUDA). Beyond it the oldest loaded block is
    dropped and read again when next needed: a 70B-width stage of 9 blocks would otherwise hold
    ~30 GB."""

    def __init__(self, parts: ModelParts, budget_bytes: int | None = None):
        self.parts = parts
        self.blocks: dict[int, torch.nn.Module] = {}
        self.head: list[torch.nn.Module] | None = None
        self.embedding: list[torch.nn.Module | None] | None = None
        self.budget = (budget_bytes if budget_bytes is not None
                       else int(available_bytes(parts.device) * RESIDENT_FRACTION))
        self.loads = 0
        self.sizes: dict[int, int] = {}  # bytes of each loaded block

    def block(self, index: int) -> torch.nn.Module:
        if index not in self.blocks:
            block = self.blocks[index] = self.parts.load_block(index)
            self.loads += 1
            self.sizes[index] = sum(t.numel() * t.element_size()
                                    for t in [*block.parameters(), *block.buffers()])
            for oldest in list(self.blocks)[:-1]:
                if sum(self.sizes.values()) <= self.budget:
                    break
                del self.blocks[oldest], self.sizes[oldest]
        return self.blocks[index]

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.embedding is None:
            self.embedding = self.parts.load_embedding()
        return embed(self.parts, self.embedding, ids).cpu()

    @torch.no_grad()
    def forward(self, start: int, end: int, h: torch.Tensor, abits: int = 16) -> torch.Tensor:
        h = h.to(self.parts.device)
        for i in range(start, end):
            block = self.block(i)
            with activation_quant(block, stored_quantized(self.parts, i), abits):
                h = run_block(self.parts, block, h)
        return h.cpu()

    @torch.no_grad()
    def score(self, h: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
        if self.head is None:
            self.head = self.parts.load_head()
        return token_nll(self.head, h.to(self.parts.device), ids)


@torch.no_grad()
def score_stream(parts: ModelParts, stream: list[Any], ids_chunks: list[torch.Tensor],
                 store: ChunkStore) -> tuple[float, int]:
    """Summed next-token NLL and token count over the stream (the last stage's job)."""
    modules = parts.load_head()
    total, count = 0.0, 0
    for h, ids in zip(stream, ids_chunks, strict=True):
        nll, n = token_nll(modules, store.get(h).to(parts.device), ids)
        total += nll
        count += n
    return total, count


def _run(parts: ModelParts, block: torch.nn.Module, store: ChunkStore, handle: Any,
         cast: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The block on one stored chunk, the output stored in the chunk's dtype; `cast`: the
    block's parameters in a lower precision (`cast_parameters`), the chunk cast to it too."""
    h = store.get(handle)
    x = h.to(parts.device)
    if cast:
        x = x.to(next(iter(cast.values())).dtype)
    return run_block(parts, block, x, cast).to(h.dtype).cpu()


def cast_parameters(block: torch.nn.Module, dtype: torch.dtype | None
                    ) -> dict[str, torch.Tensor] | None:
    """The block's parameters in `dtype` for a stream pass (`training.stream_block_dtype`);
    None: the block as it is."""
    if dtype is None:
        return None
    return {n: p.detach().to(dtype) for n, p in block.named_parameters()}


@dataclasses.dataclass
class BlockResult:
    fp_out: list[Any] | None  # None: the run carries no FP stream
    q_out: list[Any]
    exports: dict[ExportFormat, dict[str, torch.Tensor]]  # layout -> full name -> tensor
    schemes: dict[str, list[Any] | None]  # linear -> [bits, group_size, symmetric] or None
    metrics: dict[str, Any]
    adapter: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # LoRC's

    def folder_exports(self) -> dict[str, dict[str, torch.Tensor]]:
        """Output folder ("" = the output itself) -> the block's tensors written there."""
        out = {FOLDERS[layout]: tensors for layout, tensors in self.exports.items()}
        if self.adapter:
            out[lorc_block.STATE_FOLDER] = self.adapter
        return out


@torch.no_grad()
def quantize_linears_(block: torch.nn.Module, formats: dict[str, AffineFormat | None],
                      dtypes: dict[str, torch.dtype]) -> dict[str, QuantizedLinear]:
    """Quantize the block's linears in place (fake-quant weights) and return their codes.
    Scales are rounded to the stored dtype first, so the export reproduces these weights."""
    out = {}
    for name, fmt in formats.items():
        if fmt is None:
            continue
        weight = block.get_parameter(f"{name}.weight")
        fake, codes, qparams = rtn_quantize(weight, fmt, scale_dtype=dtypes[f"{name}.weight"])
        weight.copy_(fake)
        out[name] = QuantizedLinear(codes.cpu(), QuantParams(qparams.scale.cpu(),
                                                             qparams.zero_point.cpu()), fmt)
    return out


@torch.no_grad()
def correct_biases_(parts: ModelParts, block: torch.nn.Module,
                    original: dict[str, torch.Tensor], q_in: list[Any], store: ChunkStore,
                    abits: int, group: Collective | None = None) -> int:
    """b <- b - (W_q - W) E[x] for the linears in `original` (name -> weight before
    quantization), E[x] over the quantized stream through the quantized block (over every
    worker's windows); returns how many were corrected."""
    names = list(original)
    sums = {n: torch.zeros(original[n].shape[1], dtype=torch.float64, device=parts.device)
            for n in names}
    counts = torch.zeros(len(names), dtype=torch.float64)

    def visit(name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        sums[name] += x.sum(0)
        counts[names.index(name)] += x.shape[0]

    with input_hooks(block, names, visit), activation_quant(block, names, abits):
        for h in q_in:
            _run(parts, block, store, h)
    if group is not None and group.world > 1:
        group.sum_([*sums.values(), counts.to(parts.device)])
    for i, (name, weight) in enumerate(original.items()):
        quantized = block.get_parameter(f"{name}.weight")
        bias = block.get_parameter(f"{name}.bias")
        mean = (sums[name] / counts[i].item()).to(weight.device)
        shift = (quantized.double() - weight.double()) @ mean
        bias.sub_(shift.to(bias.dtype))
    return len(original)


def reduce_stats_(stats: dict[str, Any], block: torch.nn.Module, names: list[str],
                  group: Collective, device: str) -> None:
    """Every worker's per-channel input statistics combined (max / min), in `names` order."""
    from pipeline.methods.let import ActStats

    for n in names:
        if n not in stats:
            stats[n] = ActStats.empty(block.get_parameter(f"{n}.weight").shape[1], device)
    group.max_([t for n in names for t in (stats[n].absmax, stats[n].maximum)])
    group.min_([stats[n].minimum for n in names])


def quantize_block_weights(parts: ModelParts, index: int, quantization: QuantizationConfig,
                           layouts: list[ExportFormat]) -> BlockResult:
    """The data-free path: the block's linears rounded to nearest straight from storage, no
    stream read or written (the same codes as `quantize_block` with RTN)."""
    start = time.perf_counter()
    block = parts.load_block(index)
    loaded = time.perf_counter()
    path = parts.block_path(index)
    dtypes = parts.stored_dtypes(path)
    formats = block_formats(parts, index, quantization)
    lorc = quantization.lorc
    reference = lorc_block.references(block, quantized_names(formats), path, lorc)
    linears = quantize_linears_(block, formats, dtypes)
    held: dict[str, Any] = {}
    adapter: dict[str, torch.Tensor] = {}
    metrics: dict[str, Any] = {}
    if lorc is not None:
        held, adapter, metrics["lorc"] = lorc_block.compensate_(parts, block, path, reference,
                                                                  lorc, dtypes)
    result = lay_out(path, block, linears, formats, dtypes, layouts, held, adapter)
    result.metrics.update({**metrics, "index": index, "data_free": True,
                           "seconds": time.perf_counter() - start,
                           "load_seconds": loaded - start, "peak_rss_bytes": peak_rss_bytes(),
                           "peak_private_bytes": private_bytes()})
    return result


def lay_out(path: str, block: torch.nn.Module, linears: dict[str, QuantizedLinear],
            formats: dict[str, AffineFormat | None], dtypes: dict[str, torch.dtype],
            layouts: list[ExportFormat], lorc: dict[str, Any] | None = None,
            adapter: dict[str, torch.Tensor] | None = None) -> BlockResult:
    """The finished block's tensors in every export layout (`lorc`: linear -> its LoRC
    factors, folded into the fake_quant_lorc layout) and its linears' schemes (no streams
    yet)."""
    state = block.state_dict()
    corrections = {n: f.product() for n, f in (lorc or {}).items()}
    exports = {f: block_tensors(path, state, linears, dtypes, f, corrections) for f in layouts}
    schemes = {f"{path}.{n}": None if f is None else [f.bits, f.group_size, f.symmetric]
               for n, f in formats.items()}
    metrics: dict[str, Any] = {}
    if ExportFormat.GPTQ in layouts:
        metrics["gptq_zero_wraps"] = sum(gptq_zero_overflow(q.qparams, q.fmt)
                                         for q in linears.values())
    return BlockResult([], [], exports, schemes, metrics, adapter or {})


def quantize_block(parts: ModelParts, index: int, fp_in: list[Any] | None, q_in: list[Any],
                   quantization: QuantizationConfig, layouts: list[ExportFormat],
                   store: ChunkStore, group: Collective | None = None,
                   share: WindowShare | None = None) -> BlockResult:
    """Run the FP stream through the block (the targets), quantize its linears with the
    configured method, run the quantized stream through the quantized block, and measure the
    block's output error against the FP target. `fp_in` None: the run carries no FP stream
    (`calibration.fp_stream_needed`): no targets and no output error. With several
    data-parallel workers (`group`), the streams are this worker's share of the windows and
    every statistic is combined over the workers, so all of them end with the same block."""
    group = group or Solo()
    start = time.perf_counter()
    block = parts.load_block(index)
    loaded = time.perf_counter()
    path = parts.block_path(index)
    dtypes = parts.stored_dtypes(path)
    formats = block_formats(parts, index, quantization)
    names = quantized_names(formats)
    method, omni = quantization.method, quantization.omniquant
    stats, visit = input_stats(block, names)
    collect = method is Method.OMNIQUANT and omni.let
    if fp_in is None and method is Method.OMNIQUANT:
        raise ValueError("a learned method needs the FP stream (its targets)")
    fp_out: list[Any] | None = None if fp_in is None else []
    private = private_bytes()
    low = stream_block_dtype(parts.device, formats, quantization)
    cast = cast_parameters(block, low) if fp_in else None
    with torch.no_grad(), input_hooks(block, names if collect else [], visit), \
            stream_precision(parts.device, formats, quantization):
        for h in fp_in or []:
            fp_out.append(store.put(_run(parts, block, store, h, cast)))  # type: ignore[union-attr]
            private = max(private, private_bytes())
    if collect and group.world > 1:
        reduce_stats_(stats, block, names, group, parts.device)
    metrics: dict[str, Any] = {"index": index}
    original = ({n: block.get_parameter(f"{n}.weight").detach().clone() for n in names
                 if block.get_submodule(n).bias is not None}
                if quantization.bias_correction else {})
    lorc = quantization.lorc
    # the FP weights LoRC corrects toward; OmniQuant gives them after LET (the exported basis)
    reference = (lorc_block.references(block, names, path, lorc)
                 if method is not Method.OMNIQUANT else {})
    if method is Method.RTN:
        linears = quantize_linears_(block, formats, dtypes)
    elif method is Method.GPTQ:
        linears, extra = gptq_block(parts, block, formats, q_in, store, quantization, dtypes,
                                    group)
        metrics.update(extra)
    else:
        aug = None
        if omni.aug_loss:
            with torch.no_grad(), stream_precision(parts.device, formats, quantization):
                aug = [store.put(_run(parts, block, store, h, cast)) for h in q_in]
        # learned methods always carry the FP stream (`calibration.fp_stream_needed`)
        assert fp_out is not None, "a learned reconstruction needs the FP targets"
        linears, extra = train_block(parts, index, block, formats, q_in, fp_out, aug, stats,
                                     quantization, store, dtypes, group, share,
                                     reference if lorc is not None else None)
        reference = {n: w for n, w in reference.items()
                     if lorc is not None and lorc_block.is_target(f"{path}.{n}", lorc)}
        metrics.update(extra)
    held: dict[str, Any] = {}
    adapter: dict[str, torch.Tensor] = {}
    if lorc is not None:  # before bias correction, which then corrects what is left
        held, adapter, metrics["lorc"] = lorc_block.compensate_(
            parts, block, path, reference, lorc, dtypes, q_in, store, group)
    private = max(private, private_bytes())
    if quantization.bias_correction:
        metrics["bias_corrected"] = correct_biases_(parts, block, original, q_in, store,
                                                    quantization.abits, group)
    q_out, err, ref, numel = [], 0.0, 0.0, 0
    if fp_out is not None and len(fp_out) != len(q_in):
        raise ValueError(f"{len(fp_out)} FP chunks for {len(q_in)} quantized ones")
    cast = cast_parameters(block, low)  # the quantized block's
    with torch.no_grad(), activation_quant(block, names, quantization.abits), \
            stream_precision(parts.device, formats, quantization):
        for k, hq in enumerate(q_in):
            y = _run(parts, block, store, hq, cast)
            if fp_out is not None:
                target = store.get(fp_out[k])
                err += (y - target).double().pow(2).sum().item()
                ref += target.double().pow(2).sum().item()
                numel += target.numel()
            private = max(private, private_bytes())
            q_out.append(store.put(y))
    errors = {}
    if fp_out is not None:  # the same on every worker: the run's setting, not its data
        err, ref, total = sum_scalars(group, [err, ref, float(numel)])
        errors = {"output_mse": err / max(int(total), 1),
                  "output_relative_error": err / ref if ref else 0.0}
    result = lay_out(path, block, linears, formats, dtypes, layouts, held, adapter)
    metrics.update({
        "seconds": time.perf_counter() - start,
        "load_seconds": loaded - start,
        **errors,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_private_bytes": private,
        **result.metrics,
    })
    if torch.cuda.is_available() and parts.device.startswith("cuda"):
        metrics["peak_device_bytes"] = torch.cuda.max_memory_allocated()
    return BlockResult(fp_out, q_out, result.exports, result.schemes, metrics, adapter)
