"""GPTQ over one block: Hessians of every quantized linear from the quantized stream (summed
over the data-parallel workers), then each linear solved by one worker and broadcast."""
from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from pipeline.config import QuantizationConfig
from pipeline.export import QuantizedLinear
from pipeline.formats import AffineFormat, QuantParams
from pipeline.methods.gptq import Hessian, InverseFactor, gptq_quantize, inverse_factor
from pipeline.methods.hooks import activation_quant, input_hooks, quantized_names
from pipeline.model_parts import ModelParts, run_block
from pipeline.parallel.collective import Collective, Solo
from pipeline.streams import ChunkStore

log = logging.getLogger(__name__)


class _InputsTaken(Exception):
    """Every watched linear has read its input: the block's forward stops there."""


@torch.no_grad()
def collect_hessians(parts: ModelParts, block: nn.Module, names: list[str], q_in: list[Any],
                     store: ChunkStore, abits: int, group: Collective | None = None
                     ) -> dict[str, torch.Tensor]:
    """Each named linear's Hessian from the quantized stream through `block` as it is now. The
    consumers of one norm read the same input and share one Hessian (one tensor). Each
    window's forward stops once the last linear has read its input (a block's linears run
    once per forward), which spares the down projection's product. With several
    data-parallel workers, every worker's sums are added (float64 on CPU, so the total does not
    depend on how the windows were shared)."""
    shared: dict[str, str] = {}
    for _norm, consumers in parts.adapter.norm_to_linears:
        members = [n for n in consumers if n in names]
        shared.update({n: members[0] for n in members[1:]})
    watched = [n for n in names if n not in shared]
    hessians = {n: Hessian(block.get_parameter(f"{n}.weight").shape[1], parts.device)
                for n in watched}

    taken: set[str] = set()

    def visit(name: str, x: torch.Tensor) -> None:
        hessians[name].add(x)
        taken.add(name)
        if len(taken) == len(watched):  # the rest of the forward (down_proj on) is not needed
            raise _InputsTaken

    with activation_quant(block, names, abits), input_hooks(block, watched, visit):
        for h in q_in:
            taken.clear()
            try:
                run_block(parts, block, store.get(h).to(parts.device))
            except _InputsTaken:
                pass
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
    # linears that read one input share its Hessian and so its factor: factorized once, by
    # each worker that solves one of them, and freed after the last of them
    mine = [n for n, o in zip(names, owners, strict=True) if o == group.rank]
    sharer = {n: next(m for m in names if hessians[m] is hessians[n]) for n in names}
    left = {k: sum(1 for n in mine if sharer[n] == k) for k in set(sharer.values())}
    factors: dict[str, InverseFactor] = {}
    for name, owner in zip(names, owners, strict=True):
        fmt = formats[name]
        assert fmt is not None
        weight = block.get_parameter(f"{name}.weight")
        # each Hessian is handed over, not kept: freed once its factor is made (a 70B
        # down_proj's is 3.3 GB, and the factorization holds one more and half of one)
        if owner == group.rank:
            h = hessians.pop(name)
            key = sharer[name]
            if key not in factors:
                factors[key] = inverse_factor(h, cfg.damp, cfg.act_order)
            del h
            factor = factors[key]
            left[key] -= 1
            if not left[key]:
                del factors[key]
            result = gptq_quantize(weight, None, fmt, damp=cfg.damp, block_size=cfg.block_size,
                                   act_order=cfg.act_order, scale_dtype=dtypes[f"{name}.weight"],
                                   factor=factor)
            del factor
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
