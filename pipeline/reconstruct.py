"""Learned block reconstruction (OmniQuant and what builds on it): learnable clipping (LWC),
equivalent transforms (LET), learned rounding and CQE+'s singular-value diagonal expansion
(SDE), trained to minimize the MSE between the quantized block's output on the quantized stream
and the FP block's output on the FP stream (plus, with `aug_loss`, the FP block's output on the
quantized stream; with CQE+'s cross-layer learning, the error after the next FP blocks), then
folded into plain weights and integer parameters. The block's learnable parameters are in
`pipeline/methods/learnable.py` (`BlockQuantizer`), GPTQ's block pass is in
`pipeline/methods/gptq_block.py`, the forward hooks in `pipeline/methods/hooks.py` (both
re-exported here).

With several data-parallel workers (a `Collective`) every training step sums the workers'
gradients (and losses) before the optimizer step.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline import events
from pipeline.config import QuantizationConfig, Rounding
from pipeline.export import QuantizedLinear
from pipeline.formats import AffineFormat
from pipeline.methods.cross_layer import Downstream, downstream_targets
from pipeline.methods.gptq_block import assign_by_cost, collect_hessians, gptq_block
from pipeline.methods.hooks import (
    activation_quant,
    fake_quant_tokens,
    input_hooks,
    input_stats,
    quantized_names,
)
from pipeline.methods.learnable import BlockQuantizer, sde_metrics
from pipeline.methods.let import ActStats
from pipeline.methods.lwc import fused_quantizer_compiled
from pipeline.model_parts import ModelParts, run_block
from pipeline.parallel.collective import Collective, Solo, sum_scalars
from pipeline.parallel.exchange import SharedMemoryShards
from pipeline.parallel.shares import WindowShare
from pipeline.streams import ChunkStore
from pipeline.training.compiled import block_call_compiled, compiled_block_call
from pipeline.training.optimizer import make_optimizer
from pipeline.training.precision import training_precision
from pipeline.training.steps import Batches, StepGradients, quantizer_shards

__all__ = ["TrainingError", "activation_quant", "assign_by_cost",
           "block_loss", "collect_hessians", "fake_quant_tokens", "gptq_block", "input_hooks",
           "input_stats", "quantized_names", "train_block"]

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training of one block diverged (NaN/inf loss)."""


def block_loss(parts: ModelParts, block: nn.Module, tensors: dict[str, torch.Tensor] | None,
               batch: list[torch.Tensor], downstream: Downstream | None = None,
               compiled: Callable[..., Any] | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """MSE of the block on batch[0] against the FP target batch[1] (+ batch[2], aug_loss);
    with `downstream` (cross-layer learning), the last len(downstream.blocks) entries of the
    batch are the next blocks' FP outputs and their weighted error is added. `compiled`: the
    block's call compiled (`compiled_block_call`); `dtype`: the block's input's (the loss is
    float32 either way)."""
    down = len(downstream.blocks) if downstream is not None else 0
    own = batch[: len(batch) - down]
    out = run_block(parts, block, own[0].to(dtype), tensors, compiled).float()
    loss = torch.nn.functional.mse_loss(out, own[1].float())
    if len(own) > 2:
        loss = loss + torch.nn.functional.mse_loss(out, own[2].float())
    if downstream is not None and down:
        loss = loss + downstream.loss(parts, out, batch[len(batch) - down:])
    return loss


@torch.no_grad()
def probe_loss(parts: ModelParts, block: nn.Module,
               tensors: Callable[[], dict[str, torch.Tensor]] | None,
               batch: list[torch.Tensor], weight: float, group: Collective,
               downstream: Downstream | None = None) -> float:
    """The training loss on the first few windows, without training (before and after, and
    keep_best's checks); each worker's part weighted by its share of those windows, summed
    over the workers. `downstream`: the batch carries the next blocks' targets too."""
    local = (block_loss(parts, block, tensors() if tensors else None, batch,
                        downstream).item() * weight if batch else 0.0)
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
    learned transforms (SDE, LET), the basis the exported weights live in (for LoRC). With
    cross-layer learning the next blocks are read from storage and the FP targets pushed
    through them once, before training."""
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
    compiled = compiled_block_call(cfg, quantization.abits)
    # the block's weights and activations in bfloat16 while training (cast_block)
    block_dtype = (torch.bfloat16 if cfg.cast_block and precision.dtype is torch.bfloat16
                   else torch.float32)
    scaler = precision.scaler()
    total_steps = cfg.total_steps(share.total)  # the global batch's, on every worker
    optimizer, schedule = (make_optimizer(groups, cfg, lambda: total_steps)
                           if groups else (None, None))
    # with several workers on one node each computes part of the quantizer (not with float16
    # loss scaling: its overflow check needs every gradient on every worker)
    exclusive = model.exclusive()
    taken = {id(p) for ps in exclusive.values() for p in ps}
    shards = (quantizer_shards(model.tensors(), exclusive, group, assign_by_cost,
                               cfg.batch_size)
              if groups and scaler is None and cfg.shard_quantizer else None)
    mine = ({k.removesuffix(".weight") for k in shards.mine()} if shards is not None
            else None)
    step = StepGradients(group, shards, [p for p in learnable if id(p) not in taken])
    best: tuple[float, list[torch.Tensor]] | None = None
    best_step = -1
    own = [q_in, targets] + ([aug_targets] if aug_targets is not None else [])
    downstream = (Downstream.load(parts, index, cfg.cross_layer)
                  if cfg.cross_layer is not None else None)
    streams = own + (downstream_targets(parts, downstream, targets, store)
                     if downstream is not None else [])
    names = model.names
    epoch_losses: list[float] = []
    start = time.perf_counter()
    probe_total = min(16, share.total)
    # the probe measures the block's own loss (comparable with and without cross-layer terms)
    probe = next(iter(Batches(own, store, [share.count_below(probe_total)], parts.device)))
    probe_weight = len(probe[0]) / probe_total if probe else 0.0
    sizes, totals = share.batch_sizes(cfg.batch_size), share.batch_totals(cfg.batch_size)
    unreached = None
    if cfg.rounding is Rounding.LEARNED and cfg.round_init == "gptq":
        unreached = model.start_rounding_at_gptq_(
            collect_hessians(parts, block, names, q_in, store, quantization.abits, group),
            quantization.gptq, dtypes)
    # keep_best_every: the parameters are judged on the probe's windows every N steps (with
    # the next blocks' targets under cross-layer learning), the start included
    every = cfg.keep_best_every if optimizer is not None else 0  # (needs keep_best)
    check = (next(iter(Batches(streams, store, [share.count_below(probe_total)],
                               parts.device))) if every and downstream is not None else probe)
    checks = 0

    def keep(value: float, done: int) -> None:
        """keep_best: these parameters, if `value` is the lowest loss so far."""
        nonlocal best, best_step
        if best is None or value < best[0]:
            best = (value, [p.detach().clone() for p in learnable])
            best_step = done

    def check_tensors() -> dict[str, torch.Tensor]:
        """The block's tensors now; with a split quantizer each read from its owner, as a
        step does (a worker's copies of the others' exclusive parameters are stale until the
        end: the kept copies that count are the owners')."""
        with torch.no_grad():
            if shards is None:
                return model.tensors()
            own = model.tensors(mine)
            return {**own, **shards.exchange.gather({k: own[k] for k in shards.mine()})}

    def check_and_keep(done: int, value: float | None = None) -> None:
        nonlocal checks
        if value is None:
            # on every worker, windows of the set or not: with a split quantizer reading the
            # tensors is a collective
            tensors = check_tensors()
            value = probe_loss(parts, block, lambda: tensors, check, probe_weight, group,
                               downstream)
        checks += 1
        keep(value, done)

    with activation_quant(block, names, quantization.abits):
        loss_before = probe_loss(parts, block, model.tensors, probe, probe_weight, group)
        if every:  # the start (the probe's loss is the check's without the next blocks)
            check_and_keep(0, loss_before if downstream is None else None)
        per_pass = len(sizes)
        passes = -(-total_steps // per_pass) if optimizer is not None and per_pass else 0
        for epoch in range(passes):
            total, steps = 0.0, 0
            assert optimizer is not None
            # the pass's steps: all of them but in a last pass that `steps` cuts short
            count = min(per_pass, total_steps - epoch * per_pass)
            batches = Batches(streams, store, sizes[:count], parts.device)
            for batch, size, whole in zip(batches, sizes[:count], totals[:count],
                                          strict=True):
                optimizer.zero_grad(set_to_none=True)
                # the quantizer in float32, once per step (every worker: each goes back
                # through it with the same summed gradient)
                tensors = step.start(whole, model.tensors(mine))
                if block_dtype is not torch.float32:  # cast once per step, not per window
                    tensors = {k: v.to(block_dtype) if v.is_floating_point() else v
                               for k, v in tensors.items()}
                for w in range(0, size, cfg.micro_batch):
                    n = min(cfg.micro_batch, size - w)  # windows in this pass (mean over them)
                    with precision.autocast():
                        loss = block_loss(parts, block, tensors, [t[w:w + n] for t in batch],
                                          downstream, compiled, block_dtype) * n / whole
                    step.add(loss, scaler.scale(loss) if scaler is not None else loss)
                penalty = model.penalty(mine)
                if penalty is not None:
                    step.add_penalty(penalty, scaler.scale(penalty) if scaler is not None
                                     else penalty)
                value = step.finish()  # the global batch's loss; gradients set
                if not math.isfinite(value):
                    raise TrainingError(
                        f"block {index + 1}/{parts.num_blocks} ({parts.block_path(index)}): "
                        f"the reconstruction loss became {value} at epoch "
                        f"{epoch + 1}, step {steps + 1}; lower quantization.omniquant.lwc_lr / "
                        "let_lr, or train in float32 (quantization.omniquant.autocast: float32)")
                if cfg.keep_best and not every:
                    keep(value, epoch * per_pass + steps)
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
                done = epoch * per_pass + steps
                if every and (done % every == 0 or done == total_steps):
                    check_and_keep(done)
            epoch_losses.append(total / max(steps, 1))
            seconds = time.perf_counter() - start
            events.emit("epoch", f"block {index + 1}: epoch {epoch + 1}/{passes}, loss "
                        f"{epoch_losses[-1]:.4e}, {seconds:.1f}s", block=index, epoch=epoch + 1,
                        epochs=passes, loss=epoch_losses[-1], seconds=seconds)
    if best is not None:
        with torch.no_grad():
            for p, kept in zip(learnable, best[1], strict=True):
                p.copy_(kept)
    if shards is not None:
        shards.share_exclusive_()
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
                               # keep_best: the kept parameters' loss (keep_best_every: on
                               # the fixed set, of how many checks), after how many steps
                               **({"best_check_loss" if every else "best_train_loss": best[0],
                                   "best_step": best_step,
                                   **({"best_checks": checks} if every else {})}
                                  if best is not None else {}),
                               **({"round_init_unreached": unreached}
                                  if unreached is not None else {}),
                               "epochs": len(epoch_losses),
                               "steps": total_steps if optimizer is not None else 0,
                               **({"quantizer_split": shards is not None}
                                  if group.world > 1 else {}),
                               **({"quantizer_exchange": "shared_memory" if isinstance(
                                   shards.exchange, SharedMemoryShards) else "distributed"}
                                  if shards is not None else {}),
                               "train_precision": precision.name,
                               **({"train_block_dtype": "bfloat16"}
                                  if block_dtype is torch.bfloat16 else {}),
                               # false: compiling the block's call failed; it ran eagerly
                               **({"train_compiled": block_call_compiled()}
                                  if compiled is not None else {}),
                               # false: compiling the quantizer failed; it ran eagerly
                               **({"quantizer_compiled": fused_quantizer_compiled()}
                                  if cfg.compile_quantizer else {}),
                               **sde_metrics(model),
                               **({"cross_layer_blocks": downstream.indices}
                                  if downstream is not None else {}),
                               "loss_before": loss_before, "loss_after": loss_after,
                               "loss_windows": probe_total}
    if epoch_losses:
        metrics["loss_first_epoch"] = epoch_losses[0]
        metrics["loss_last_epoch"] = epoch_losses[-1]
    return linears, metrics
