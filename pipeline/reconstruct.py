"""Block reconstruction: the methods that set one block's quantized weights from its two input
streams, the full-precision one (targets) and the quantized one (what the quantized model sees).

- `gptq_block`: Hessians of every quantized linear from the quantized stream, then GPTQ.
- `train_block` (OmniQuant): learnable clipping (LWC) and/or equivalent transforms (LET), trained
  with AdamW to minimize the MSE between the quantized block's output on the quantized stream
  and the FP block's output on the FP stream (plus, with `aug_loss`, the FP block's output on
  the quantized stream), then folded into plain weights and integer parameters.

The training step takes a `grad_sync` callable, run after backward and before the optimizer
step on the list of learnable tensors, where a data-parallel schedule averages gradients across
workers. Activation quantization (abits < 16) is a forward pre-hook on every quantized linear.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from pipeline.config import ClipParam, GPTQConfig, OmniQuantConfig, QuantizationConfig, Rounding
from pipeline.export import QuantizedLinear
from pipeline.formats import AffineFormat, QuantParams
from pipeline.methods.gptq import Hessian, gptq_quantize
from pipeline.methods.let import ActStats, EquivalentTransform
from pipeline.methods.lwc import ClippingFactors, round_ste
from pipeline.model_parts import ModelParts, run_block
from pipeline.streams import ChunkStore
from pipeline.training import make_optimizer, use_amp

log = logging.getLogger(__name__)

GradSync = Callable[[list[torch.Tensor]], None]


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
                     store: ChunkStore, abits: int) -> dict[str, torch.Tensor]:
    """Each named linear's Hessian from the quantized stream through `block` as it is now. The
    consumers of one norm read the same input and share one Hessian (one tensor)."""
    shared: dict[str, str] = {}
    for _norm, consumers in parts.adapter.norm_to_linears:
        group = [n for n in consumers if n in names]
        shared.update({n: group[0] for n in group[1:]})
    hessians: dict[str, Hessian] = {}

    def visit(name: str, x: torch.Tensor) -> None:
        hessians.setdefault(name, Hessian(x.shape[-1], x.device)).add(x)

    watched = [n for n in names if n not in shared]
    with activation_quant(block, names, abits), input_hooks(block, watched, visit):
        for h in q_in:
            run_block(parts, block, store.get(h).to(parts.device))
    values = {n: h.value() for n, h in hessians.items()}
    return {n: values[shared.get(n, n)] for n in names}


@torch.no_grad()
def gptq_block(parts: ModelParts, block: nn.Module, formats: dict[str, AffineFormat | None],
               q_in: list[Any], store: ChunkStore, quantization: QuantizationConfig,
               dtypes: dict[str, torch.dtype]) -> tuple[dict[str, QuantizedLinear], dict]:
    """Quantize the block's linears in place with GPTQ; Hessians from the quantized stream
    through the still-FP block (linears that read the same input share one Hessian)."""
    names = quantized_names(formats)
    start = time.perf_counter()
    hessians = collect_hessians(parts, block, names, q_in, store, quantization.abits)
    collected = time.perf_counter() - start
    out, damps = {}, {}
    cfg = quantization.gptq
    for name in names:
        fmt = formats[name]
        assert fmt is not None
        weight = block.get_parameter(f"{name}.weight")
        result = gptq_quantize(weight, hessians[name], fmt,
                               damp=cfg.damp, block_size=cfg.block_size,
                               act_order=cfg.act_order, scale_dtype=dtypes[f"{name}.weight"])
        weight.copy_(result.weight)
        damps[name] = result.damp
        out[name] = QuantizedLinear(result.codes.cpu(), QuantParams(
            result.qparams.scale.cpu(), result.qparams.zero_point.cpu()), fmt)
    raised = {n: d for n, d in damps.items() if d != cfg.damp}
    if raised:
        log.info("GPTQ: damping raised for %s", raised)
    return out, {"hessian_seconds": collected,
                 "gptq_seconds": time.perf_counter() - start - collected,
                 "damp": max(damps.values(), default=cfg.damp)}


# --- OmniQuant ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Batches:
    """Minibatches of `size` windows over streams stored as chunks, in order; each chunk is read
    once per pass (the current one is cached)."""

    streams: list[list[Any]]
    store: ChunkStore
    size: int
    device: str

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        pending: list[list[torch.Tensor]] = [[] for _ in self.streams]
        count = 0
        for handles in zip(*self.streams, strict=True):
            chunks = [self.store.get(h) for h in handles]
            for i in range(chunks[0].shape[0]):
                for part, c in zip(pending, chunks, strict=True):
                    part.append(c[i : i + 1])
                count += 1
                if count == self.size:
                    yield [torch.cat(p).to(self.device) for p in pending]
                    pending, count = [[] for _ in self.streams], 0
        if count:
            yield [torch.cat(p).to(self.device) for p in pending]


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
               batch: list[torch.Tensor]) -> float:
    """The training loss on a few windows, without training (before and after)."""
    return block_loss(parts, block, tensors() if tensors else None, batch).item()


def train_block(parts: ModelParts, index: int, block: nn.Module,
                formats: dict[str, AffineFormat | None], q_in: list[Any], targets: list[Any],
                aug_targets: list[Any] | None, stats: dict[str, ActStats],
                quantization: QuantizationConfig, store: ChunkStore,
                dtypes: dict[str, torch.dtype], grad_sync: GradSync | None = None
                ) -> tuple[dict[str, QuantizedLinear], dict[str, Any]]:
    """OmniQuant on one block; leaves `block` holding its folded, quantized weights."""
    cfg = quantization.omniquant
    compute_dtype = next(block.parameters()).dtype
    block.float().requires_grad_(False)
    model = BlockQuantizer(parts, block, formats, stats, cfg, quantization.abits)
    groups = model.groups(cfg)
    learnable = [p for g in groups for p in g["params"]]
    amp = use_amp(parts.device, formats, quantization.abits)
    scaler = torch.amp.GradScaler("cuda") if amp else None

    def total_steps() -> int:
        windows = sum(int(store.get(h).shape[0]) for h in q_in)
        return cfg.epochs * math.ceil(windows / cfg.batch_size)

    optimizer, schedule = make_optimizer(groups, cfg, total_steps) if groups else (None, None)
    best: tuple[float, list[torch.Tensor]] | None = None
    streams = [q_in, targets] + ([aug_targets] if aug_targets is not None else [])
    names = model.names
    epoch_losses: list[float] = []
    start = time.perf_counter()
    probe = next(iter(Batches(streams, store, 16, parts.device)))
    unreached = None
    if cfg.rounding is Rounding.LEARNED and cfg.round_init == "gptq":
        unreached = model.start_rounding_at_gptq_(
            collect_hessians(parts, block, names, q_in, store, quantization.abits),
            quantization.gptq, dtypes)
    with activation_quant(block, names, quantization.abits):
        loss_before = probe_loss(parts, block, model.tensors, probe)
        for epoch in range(cfg.epochs if optimizer is not None else 0):
            total, steps = 0.0, 0
            for batch in Batches(streams, store, cfg.batch_size, parts.device):
                with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                    loss = block_loss(parts, block, model.tensors(), batch)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"block {index + 1}/{parts.num_blocks} ({parts.block_path(index)}): "
                        f"the reconstruction loss became {loss.item()} at epoch "
                        f"{epoch + 1}, step {steps + 1}; lower quantization.omniquant.lwc_lr / "
                        "let_lr, or train in fp32 (cluster.compute_dtype float32)")
                assert optimizer is not None
                if cfg.keep_best and (best is None or loss.item() < best[0]):
                    best = (loss.item(), [p.detach().clone() for p in learnable])
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                if grad_sync is not None:
                    grad_sync([p.grad for p in learnable if p.grad is not None])
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                if schedule is not None:
                    schedule.step()
                model.after_step()
                total += loss.item()
                steps += 1
            epoch_losses.append(total / max(steps, 1))
            log.info("block %d: epoch %d/%d, loss %.4e, %.1fs", index + 1, epoch + 1, cfg.epochs,
                     epoch_losses[-1], time.perf_counter() - start)
    if best is not None:
        with torch.no_grad():
            for p, kept in zip(learnable, best[1], strict=True):
                p.copy_(kept)
    hessians = None
    if cfg.rounding is Rounding.GPTQ:
        def hessians() -> dict[str, torch.Tensor]:
            return collect_hessians(parts, block, names, q_in, store, quantization.abits)
    linears = model.fold_(block, dtypes, hessians, quantization.gptq)
    with activation_quant(block, names, quantization.abits):
        loss_after = probe_loss(parts, block, None, probe)
    block.to(compute_dtype)
    metrics: dict[str, Any] = {"train_seconds": time.perf_counter() - start,
                               **({"best_train_loss": best[0]} if best is not None else {}),
                               **({"round_init_unreached": unreached}
                                  if unreached is not None else {}),
                               "epochs": len(epoch_losses), "amp": amp,
                               "loss_before": loss_before, "loss_after": loss_after,
                               "loss_windows": int(probe[0].shape[0])}
    if epoch_losses:
        metrics["loss_first_epoch"] = epoch_losses[0]
        metrics["loss_last_epoch"] = epoch_losses[-1]
    return linears, metrics
