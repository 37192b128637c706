"""Block reconstruction: the methods that set one block's quantized weights from its two input
streams, the full-precision one (targets) and the quantized one (what the quantized model sees).

- `gptq_block`: Hessians of every quantized linear from the quantized stream, then GPTQ.
- `train_block` (OmniQuant): learnable clipping (LWC) and/or equivalent transforms (LET), trained
  with AdamW to minimize the MSE between the quantized block's output on the quantized stream
  and the FP block's output on the FP stream (plus, with `aug_loss`, the FP block's output on
  the quantized stream), then folded into plain weights and integer parameters.

Every method takes a `Collective`: with several data-parallel workers the training step sums
their weighted gradients (and losses) after backward and before the optimizer step, and the
Hessians and statistics are summed over them. Activation quantization (abits < 16) is a forward pre-hook on every quantized linear.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from pipeline import events
from pipeline.config import ClipParam, GPTQConfig, OmniQuantConfig, QuantizationConfig, Rounding
from pipeline.export import QuantizedLinear
from pipeline.formats import AffineFormat, QuantParams
from pipeline.methods.gptq import Hessian, gptq_quantize
from pipeline.methods.let import ActStats, EquivalentTransform
from pipeline.methods.lwc import ClippingFactors, round_ste
from pipeline.model_parts import ModelParts, run_block
from pipeline.parallel.collective import Collective, Solo, sum_scalars
from pipeline.parallel.shares import WindowShare
from pipeline.streams import ChunkStore
from pipeline.training import Batches, StepGradients, make_optimizer, training_precision

log = logging.getLogger(__name__)

class TrainingError(RuntimeError):
    """Training of one block diverged (NaN/inf loss)."""


def fake_quant_tokens(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token dynamic asymmetric min-max fake-quant (straight-through rounding)."""
    qmax = 2**bits - 1
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / qmax).clamp(min=1e-8).detach()
    zero = torch.round(-lo / scale).detach()
    q = (round_ste(x / scale) + zero).clamp(0, qmax)
    return (q - zero) * scale


@contextlib.contextmanager
def activation_quant(block: nn.Module, names: list[str], abits: int) -> Iterator[None]:
    """Fake-quantize the inputs of the named linears while the context is open (no-op at 16)."""
    if abits >= 16:
        yield
        return
    hooks = [block.get_submodule(n).register_forward_pre_hook(
        lambda _m, args: (fake_quant_tokens(args[0], abits), *args[1:])) for n in names]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def input_hooks(block: nn.Module, names: list[str],
                visit: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    hooks = [block.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: visit(n, args[0])) for n in names]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def input_stats(block: nn.Module, names: list[str]) -> tuple[dict[str, ActStats], Callable]:
    """Stats dict filled by the visitor that `input_hooks` calls."""
    stats: dict[str, ActStats] = {}

    def visit(name: str, x: torch.Tensor) -> None:
        if name not in stats:
            stats[name] = ActStats.empty(x.shape[-1], x.device)
        stats[name].update(x)

    return stats, visit


def quantized_names(formats: dict[str, AffineFormat | None]) -> list[str]:
    return [n for n, f in formats.items() if f is not None]


# --- GPTQ ---------------------------------------------------------------------------------------

@torch.no_grad()
def collect_hessians(parts: ModelParts, block: nn.Module, names: list[str], q_in: list[Any],
                     store: ChunkStore, abits: int, group: Collective | None = None
                     ) -> dict[str, torch.Tensor]:
    """Each named linear's Hessian from the quantized stream through `block` as it is now. The
    consumers of one norm read the same input and share one Hessian (one tensor). With several
    data-parallel workers, every worker's sums are added (float64 on CPU, so the total does not
    depend on how the windows were shared)."""
    shared: dict[str, str] = {}
    for _norm, consumers in parts.adapter.norm_to_linears:
        members = [n for n in consumers if n in names]
        shared.update({n: members[0] for n in members[1:]})
    watched = [n for n in names if n not in shared]
    hessians = {n: Hessian(block.get_parameter(f"{n}.weight").shape[1], parts.device)
                for n in watched}

    def visit(name: str, x: torch.Tensor) -> None:
        hessians[name].add(x)

    with activation_quant(block, names, abits), input_hooks(block, watched, visit):
        for h in q_in:
            run_block(parts, block, store.get(h).to(parts.device))
    if group is not None and group.world > 1:
        counts = torch.tensor([float(h.count) for h in hessians.values()], dtype=torch.float64)
        group.sum_([h.matrix for h in hessians.values()] + [counts])
        for h, c in zip(hessians.values(), counts.tolist(), strict=True):
            h.count = int(c)
    values = {n: h.value() for n, h in hessians.items()}
    return {n: values[shared.get(n, n)] for n in names}


def assign_by_cost(names: list[str], costs: list[float], workers: int) -> list[int]:
    """Each name's worker: the most expensive first, each to the least loaded worker (ties to
    the lowest index), so every worker derives the same assignment."""
    load = [0.0] * workers
    owner = [0] * len(names)
    for i in sorted(range(len(names)), key=lambda i: (-costs[i], i)):
        w = min(range(workers), key=lambda w: (load[w], w))
        owner[i] = w
        load[w] += costs[i]
    return owner


@torch.no_grad()
def gptq_block(parts: ModelParts, block: nn.Module, formats: dict[str, AffineFormat | None],
               q_in: list[Any], store: ChunkStore, quantization: QuantizationConfig,
               dtypes: dict[str, torch.dtype], group: Collective | None = None
               ) -> tuple[dict[str, QuantizedLinear], dict]:
    """Quantize the block's linears in place with GPTQ; Hessians from the quantized stream
    through the still-FP block (linears that read the same input share one Hessian). With
    several workers, the Hessians are summed over all of them, each linear is solved by one
    worker (spread by cost: rows x columns^2) and its result broadcast to the others."""
    group = group or Solo()
    names = quantized_names(formats)
    start = time.perf_counter()
    hessians = collect_hessians(parts, block, names, q_in, store, quantization.abits, group)
    collected = time.perf_counter() - start
    shapes = [block.get_parameter(f"{n}.weight").shape for n in names]
    owners = assign_by_cost(names, [float(r) * c * c for r, c in shapes], group.world)
    out, damps = {}, {}
    cfg = quantization.gptq
    for name, owner in zip(names, owners, strict=True):
        fmt = formats[name]
        assert fmt is not None
        weight = block.get_parameter(f"{name}.weight")
        # each Hessian is handed over, not kept: freed once its linears are solved (a 70B
        # down_proj's is 3.3 GB, and the solve holds up to three more)
        if owner == group.rank:
            result = gptq_quantize(weight, hessians.pop(name), fmt,
                                   damp=cfg.damp, block_size=cfg.block_size,
                                   act_order=cfg.act_order, scale_dtype=dtypes[f"{name}.weight"])
            fake, codes = result.weight, result.codes
            scale, zero = result.qparams.scale, result.qparams.zero_point
            damp = torch.tensor([result.damp], dtype=torch.float64, device=weight.device)
        else:
            del hessians[name]
            rows, columns = weight.shape
            groups = fmt.groups(columns)
            fake, codes = torch.empty_like(weight), torch.empty(
                rows, columns, dtype=torch.int32, device=weight.device)
            scale, zero = (torch.empty(rows, groups, device=weight.device) for _ in range(2))
            damp = torch.empty(1, dtype=torch.float64, device=weight.device)
        if group.world > 1:
            group.broadcast_([fake, codes, scale, zero, damp], owner)
        weight.copy_(fake)
        damps[name] = float(damp.item())
        out[name] = QuantizedLinear(codes.cpu(), QuantParams(scale.cpu(), zero.cpu()), fmt)
    raised = {n: d for n, d in damps.items() if d != cfg.damp}
    if raised:
        log.info("GPTQ: damping raised for %s", raised)
    return out, {"hessian_seconds": collected,
                 "gptq_seconds": time.perf_counter() - start - collected,
                 "damp": max(damps.values(), default=cfg.damp)}


# --- OmniQuant ----------------------------------------------------------------------------------

class BlockQuantizer(nn.Module):
    """The learnable parameters of one block and the map to its fake-quantized tensors."""

    def __init__(self, parts: ModelParts, block: nn.Module,
                 formats: dict[str, AffineFormat | None], stats: dict[str, ActStats],
                 cfg: OmniQuantConfig, abits: int):
        super().__init__()
        self.names = quantized_names(formats)
        self.base = {n: p.detach() for n, p in block.named_parameters()}
        init = cfg.lwc_init if cfg.lwc else math.inf
        learned = cfg.rounding is Rounding.LEARNED
        direct = cfg.clip_param is ClipParam.DIRECT
        self.clips = nn.ModuleDict({
            n.replace(".", "__"): ClippingFactors(self.base[f"{n}.weight"].shape, f, init,
                                                  self.base[f"{n}.weight"].device, learned,
                                                  direct)
            for n, f in formats.items() if f is not None})
        for clip in self.clips.values():
            clip.up.requires_grad_(cfg.lwc)
            clip.low.requires_grad_(cfg.lwc)
        self.let = (EquivalentTransform(block, parts.adapter, parts.hf_config, stats, cfg.alpha,
                                        shift=abits < 16) if cfg.let else None)

    def clip(self, name: str) -> ClippingFactors:
        return self.clips[name.replace(".", "__")]  # type: ignore[return-value]

    def groups(self, cfg: OmniQuantConfig) -> list[dict[str, Any]]:
        out = []
        if self.let is not None:
            out.append({"params": self.let.scale_parameters(), "lr": cfg.let_lr})
        if cfg.lwc:
            out.append({"params": [p for c in self.clips.values() for p in (c.up, c.low)],
                        "lr": cfg.lwc_lr})
        offsets = [c.offset for c in self.clips.values() if c.offset is not None]
        if offsets:
            out.append({"params": offsets, "lr": cfg.round_lr})
        return out

    @torch.no_grad()
    def start_rounding_at_gptq_(self, hessians: dict[str, torch.Tensor], gptq: GPTQConfig,
                                dtypes: dict[str, torch.dtype]) -> int:
        """Learned offsets that reproduce GPTQ's codes on the initial (untrained) grid; returns
        how many codes lie beyond the offsets' [-0.5, 0.5] reach."""
        t = self.transformed()
        unreached = 0
        for n in self.names:
            clip = self.clip(n)
            weight = t[f"{n}.weight"].float()
            scale, zero = clip.qparams(weight)
            qparams = QuantParams(scale.to(dtypes[f"{n}.weight"]).float(), zero.float())
            result = gptq_quantize(weight, hessians[n], clip.fmt, damp=gptq.damp,
                                   block_size=gptq.block_size, act_order=gptq.act_order,
                                   scale_dtype=dtypes[f"{n}.weight"], qparams=qparams)
            unreached += clip.start_rounding_at_(weight, result.codes)
        return unreached

    def after_step(self) -> None:
        for name in self.names:
            self.clip(name).clamp_()

    def transformed(self) -> dict[str, torch.Tensor]:
        """The block's tensors after LET (not quantized)."""
        return self.let.transform(self.base) if self.let is not None else dict(self.base)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The block's tensors after LET and differentiable fake-quant."""
        t = self.transformed()
        for n in self.names:
            t[f"{n}.weight"] = self.clip(n).fake_quantize(t[f"{n}.weight"])
        return t

    @torch.no_grad()
    def fold_(self, block: nn.Module, dtypes: dict[str, torch.dtype],
              hessians: Callable[[], dict[str, torch.Tensor]] | None = None,
              gptq: GPTQConfig | None = None) -> dict[str, QuantizedLinear]:
        """Write the transformed, quantized tensors into `block`; return the linears' codes.
        With `hessians`, the rounding onto the learned grid is GPTQ's."""
        t = self.transformed()
        for name, value in t.items():
            block.get_parameter(name).copy_(value)
        h = hessians() if hessians is not None else None
        out = {}
        for n in self.names:
            weight = block.get_parameter(f"{n}.weight")
            clip = self.clip(n)
            fake, codes, qparams = clip.export(weight, dtypes[f"{n}.weight"])
            if h is not None and gptq is not None:
                result = gptq_quantize(weight, h[n], clip.fmt, damp=gptq.damp,
                                       block_size=gptq.block_size, act_order=gptq.act_order,
                                       scale_dtype=dtypes[f"{n}.weight"], qparams=qparams)
                fake, codes = result.weight, result.codes
            weight.copy_(fake)
            out[n] = QuantizedLinear(codes.cpu(), QuantParams(qparams.scale.cpu(),
                                                             qparams.zero_point.cpu()), clip.fmt)
        return out


def block_loss(parts: ModelParts, block: nn.Module, tensors: dict[str, torch.Tensor] | None,
               batch: list[torch.Tensor]) -> torch.Tensor:
    """MSE of the block on batch[0] against the FP target batch[1] (+ batch[2], aug_loss)."""
    out = run_block(parts, block, batch[0].float(), tensors).float()
    loss = torch.nn.functional.mse_loss(out, batch[1].float())
    if len(batch) > 2:
        loss = loss + torch.nn.functional.mse_loss(out, batch[2].float())
    return loss


@torch.no_grad()
def probe_loss(parts: ModelParts, block: nn.Module,
               tensors: Callable[[], dict[str, torch.Tensor]] | None,
               batch: list[torch.Tensor], weight: float, group: Collective) -> float:
    """The training loss on the first few windows, without training (before and after); each
    worker's part weighted by its share of those windows, summed over the workers."""
    local = (block_loss(parts, block, tensors() if tensors else None, batch).item() * weight
             if batch else 0.0)
    return sum_scalars(group, [local])[0]


def train_block(parts: ModelParts, index: int, block: nn.Module,
                formats: dict[str, AffineFormat | None], q_in: list[Any], targets: list[Any],
                aug_targets: list[Any] | None, stats: dict[str, ActStats],
                quantization: QuantizationConfig, store: ChunkStore,
                dtypes: dict[str, torch.dtype], group: Collective | None = None,
                share: WindowShare | None = None,
                references: dict[str, torch.Tensor] | None = None
                ) -> tuple[dict[str, QuantizedLinear], dict[str, Any]]:
    """OmniQuant on one block; leaves `block` holding its folded, quantized weights. With
    several data-parallel workers (`group`), each holds the windows of `share` and every step
    sums their gradients, weighted by their share of the global batch, before the update.
    `references`, when given, is filled with each quantized linear's FP weight after the
    learned transform (LET), the basis the exported weights live in (for LoRC)."""
    cfg = quantization.omniquant
    group = group or Solo()
    if share is None:
        share = WindowShare.whole(sum(int(store.get(h).shape[0]) for h in q_in))
    compute_dtype = next(block.parameters()).dtype
    block.float().requires_grad_(False)
    model = BlockQuantizer(parts, block, formats, stats, cfg, quantization.abits)
    groups = model.groups(cfg)
    learnable = [p for g in groups for p in g["params"]]
    precision = training_precision(parts.device, formats, quantization.abits, cfg.autocast)
    scaler = precision.scaler()
    optimizer, schedule = (make_optimizer(groups, cfg, lambda: cfg.epochs * share.steps(
        cfg.batch_size)) if groups else (None, None))
    step = StepGradients(group)
    best: tuple[float, list[torch.Tensor]] | None = None
    best_step = -1
    streams = [q_in, targets] + ([aug_targets] if aug_targets is not None else [])
    names = model.names
    epoch_losses: list[float] = []
    start = time.perf_counter()
    probe_total = min(16, share.total)
    probe = next(iter(Batches(streams, store, [share.count_below(probe_total)], parts.device)))
    probe_weight = len(probe[0]) / probe_total if probe else 0.0
    sizes, totals = share.batch_sizes(cfg.batch_size), share.batch_totals(cfg.batch_size)
    unreached = None
    if cfg.rounding is Rounding.LEARNED and cfg.round_init == "gptq":
        unreached = model.start_rounding_at_gptq_(
            collect_hessians(parts, block, names, q_in, store, quantization.abits, group),
            quantization.gptq, dtypes)
    with activation_quant(block, names, quantization.abits):
        loss_before = probe_loss(parts, block, model.tensors, probe, probe_weight, group)
        for epoch in range(cfg.epochs if optimizer is not None else 0):
            total, steps = 0.0, 0
            assert optimizer is not None
            batches = Batches(streams, store, sizes, parts.device)
            for batch, size, whole in zip(batches, sizes, totals, strict=True):
                optimizer.zero_grad(set_to_none=True)
                # the quantizer in float32, once per step (every worker: each goes back
                # through it with the same summed gradient)
                tensors = step.start(whole, model.tensors())
                for w in range(size):
                    with precision.autocast():
                        loss = block_loss(parts, block, tensors,
                                          [t[w:w + 1] for t in batch]) / whole
                    step.add(loss, scaler.scale(loss) if scaler is not None else loss)
                value = step.finish()  # the global batch's loss; gradients set
                if not math.isfinite(value):
                    raise TrainingError(
                        f"block {index + 1}/{parts.num_blocks} ({parts.block_path(index)}): "
                        f"the reconstruction loss became {value} at epoch "
                        f"{epoch + 1}, step {steps + 1}; lower quantization.omniquant.lwc_lr / "
                        "let_lr, or train in float32 (quantization.omniquant.autocast: float32)")
                if cfg.keep_best and (best is None or value < best[0]):
                    best = (value, [p.detach().clone() for p in learnable])
                    best_step = epoch * len(sizes) + steps
                if scaler is not None:
                    scaler.unscale_(optimizer)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                if schedule is not None:
                    schedule.step()
                model.after_step()
                total += value
                steps += 1
            epoch_losses.append(total / max(steps, 1))
            seconds = time.perf_counter() - start
            events.emit("epoch", f"block {index + 1}: epoch {epoch + 1}/{cfg.epochs}, loss "
                        f"{epoch_losses[-1]:.4e}, {seconds:.1f}s", block=index, epoch=epoch + 1,
                        epochs=cfg.epochs, loss=epoch_losses[-1], seconds=seconds)
    if best is not None:
        with torch.no_grad():
            for p, kept in zip(learnable, best[1], strict=True):
                p.copy_(kept)
    hessians = None
    if cfg.rounding is Rounding.GPTQ:
        def hessians() -> dict[str, torch.Tensor]:
            return collect_hessians(parts, block, names, q_in, store, quantization.abits, group)
    if references is not None:
        with torch.no_grad():
            transformed = model.transformed()
            references.update({n: transformed[f"{n}.weight"].detach().clone() for n in names})
    linears = model.fold_(block, dtypes, hessians, quantization.gptq)
    with activation_quant(block, names, quantization.abits):
        loss_after = probe_loss(parts, block, None, probe, probe_weight, group)
    block.to(compute_dtype)
    metrics: dict[str, Any] = {"train_seconds": time.perf_counter() - start,
                               **({"best_train_loss": best[0], "best_step": best_step}
                                  if best is not None else {}),
                               **({"round_init_unreached": unreached}
                                  if unreached is not None else {}),
                               "epochs": len(epoch_losses),
                               "train_precision": precision.name,
                               "loss_before": loss_before, "loss_after": loss_after,
                               "loss_windows": probe_total}
    if epoch_losses:
        metrics["loss_first_epoch"] = epoch_losses[0]
        metrics["loss_last_epoch"] = epoch_losses[-1]
    return linears, metrics
