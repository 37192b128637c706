"""CVXQ's sensitivity statistics, computed stage by stage: the mean squared gradient of an output
objective with respect to each decision unit's weights, and the unit's weight variance.

The forward pass streams the calibration windows through the stages as usual (each stage keeps
only its input stream). The last stage turns its output into the objective:
- `pca` (the reference's): the final hidden states (after the final norm) projected onto their
  top principal directions V (from the covariance of the same data), summed with random signs
  r_{t,k}: L_c = sum r (h V). Because E[(r . g)^2] = sum g^2, the squared weight gradient of
  L_c is an unbiased estimate of the summed squared gradients of every projected output, which
  the reference gets from one backward call per output;
- `lm_loss`: the summed next-token loss.
Gradients then stream back stage to stage. A stage recomputes its blocks chunk by chunk
(one forward without a graph to get each block's input, then block by block from the last:
forward with a graph and backward), so it holds its blocks' weights plus one chunk's
activations. Per chunk the squared weight gradients are accumulated per linear; only the small
per-unit statistics leave the stage.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.block_pass import ResidentBlocks
from pipeline.config import Objective
from pipeline.model_parts import ModelParts, run_block, run_head
from pipeline.streams import ChunkStore


def projection_signs(shape: torch.Size, seed: int, chunk: int) -> torch.Tensor:
    """The random +-1 weights of chunk `chunk`'s projected outputs (part of the objective's
    definition: the same for any number of stages)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + chunk)
    return torch.randint(0, 2, tuple(shape), generator=gen, dtype=torch.int8).float() * 2 - 1


def final_hidden_modules(parts: ModelParts) -> list[nn.Module]:
    """The head without its output projection (the final norm; OPT also project_out)."""
    return parts.load_head()[:-1]


@torch.no_grad()
def hidden_covariance(parts: ModelParts, stream: list[Any], store: ChunkStore) -> torch.Tensor:
    modules = final_hidden_modules(parts)
    cov = None
    for h in stream:
        y = run_head(modules, store.get(h).to(parts.device)).double()
        y = y.reshape(-1, y.shape[-1])
        cov = y.T @ y if cov is None else cov + y.T @ y
    assert cov is not None
    return cov


def pca_directions(cov: torch.Tensor, dims: int) -> torch.Tensor:
    """Top `dims` eigenvectors of the covariance, [hidden, dims] (float32)."""
    values, vectors = torch.linalg.eigh(cov)
    order = torch.argsort(values, descending=True, stable=True)[: min(dims, cov.shape[0])]
    return vectors[:, order].float()


def objective_grads(parts: ModelParts, stream: list[Any], ids_chunks: list[torch.Tensor],
                    store: ChunkStore, objective: Objective, directions: torch.Tensor | None,
                    seed: int) -> list[Any]:
    """Gradient of each chunk's objective w.r.t. the last block's output."""
    modules = parts.load_head()
    for p in (q for m in modules for q in m.parameters()):
        p.requires_grad_(False)
    out = []
    for c, (h, ids) in enumerate(zip(stream, ids_chunks, strict=True)):
        x = store.get(h).to(parts.device).detach().requires_grad_(True)
        if objective is Objective.PCA:
            assert directions is not None
            y = run_head(modules[:-1], x).float() @ directions.to(parts.device)
            loss = (y * projection_signs(y.shape, seed, c).to(y.device)).sum()
        else:
            logits = run_head(modules, x).float()
            ids = ids.to(logits.device)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
        out.append(store.put(grad.detach().cpu()))
    return out


def stage_backward(parts: ModelParts, blocks: tuple[int, int], x_stream: list[Any],
                   g_stream: list[Any], store: ChunkStore, need_input_grad: bool = True,
                   resident: ResidentBlocks | None = None
                   ) -> tuple[list[Any], dict[str, dict[str, float]]]:
    """Backward through blocks [a, b) for every chunk: returns the gradient stream at the
    stage's input and, per linear (full name), the summed squared weight gradient over chunks
    (each chunk's gradient squared on its own), the chunk count, the parameter count and the
    weight variance.

    Each chunk goes forward through the blocks (keeping each block's input for that chunk)
    and back. The blocks come from `resident` (default: a new `ResidentBlocks`, a quarter of
    the available memory): as many stay loaded across chunks as fit its budget, the others
    are read again when needed, so a stage wider than its memory still runs (the statistics
    are the same either way)."""
    a, b = blocks
    names = list(parts.adapter.linears)
    resident = resident if resident is not None else ResidentBlocks(parts)

    def block(j: int) -> nn.Module:
        loaded = resident.block(j)
        loaded.requires_grad_(False)
        for n in names:
            loaded.get_parameter(f"{n}.weight").requires_grad_(True)
        return loaded

    sums = {(j, n): torch.zeros((), dtype=torch.float64) for j in range(a, b) for n in names}
    stats: dict[str, dict[str, float]] = {}
    out = []
    for xh, gh in zip(x_stream, g_stream, strict=True):
        x = store.get(xh).to(parts.device)
        inputs: list[torch.Tensor | None] = []
        with torch.no_grad():
            for j in range(a, b):
                inputs.append(x)
                x = run_block(parts, block(j), x)
        g = store.get(gh).to(parts.device)
        for j in reversed(range(a, b)):
            current = block(j)
            saved = inputs[j - a]
            assert saved is not None
            xin = saved.detach().requires_grad_(need_input_grad or j > a)
            y = run_block(parts, current, xin)
            weights = [current.get_parameter(f"{n}.weight") for n in names]
            wanted = ([xin] if xin.requires_grad else []) + weights
            grads = torch.autograd.grad(y, wanted, grad_outputs=g)
            if xin.requires_grad:
                g, grads = grads[0], grads[1:]
            for n, w, gw in zip(names, weights, grads, strict=True):
                sums[(j, n)] += gw.double().pow(2).sum().cpu()
                name = f"{parts.block_path(j)}.{n}"
                if name not in stats:  # the weight's own statistics, once
                    wd = w.detach().double()
                    stats[name] = {"params": wd.numel(), "weight_sum": float(wd.sum()),
                                   "weight_sq_sum": float(wd.pow(2).sum())}
            inputs[j - a] = None  # this chunk's input of block j is spent
        out.append(store.put(g.detach().cpu()) if need_input_grad else None)
    ordered = {}  # block by block, as the stages report them
    for j in range(a, b):
        for n in names:
            name = f"{parts.block_path(j)}.{n}"
            ordered[name] = {"grad_sq_sum": float(sums[(j, n)]), "chunks": len(x_stream),
                             **stats[name]}
    return out, ordered


def unit_statistics(parts: ModelParts, linear_stats: dict[str, dict[str, float]]
                    ) -> list[dict[str, Any]]:
    """Decision units = the fused groups of every block (q/k/v, o, gate/up, down): mean squared
    gradient per weight and per chunk, variance of the unit's weights, parameter count."""
    units = []
    for i in range(parts.num_blocks):
        path = parts.block_path(i)
        for kind, group in enumerate(parts.adapter.fused_groups):
            members = [linear_stats[f"{path}.{n}"] for n in group]
            params = sum(int(m["params"]) for m in members)
            chunks = members[0]["chunks"]
            mean = sum(m["weight_sum"] for m in members) / params
            var = sum(m["weight_sq_sum"] for m in members) / params - mean * mean
            units.append({
                "name": f"{path}.{'+'.join(n.split('.')[-1] for n in group)}",
                "linears": [f"{path}.{n}" for n in group], "block": i, "kind": kind,
                "params": params,
                "grad_sq": sum(m["grad_sq_sum"] for m in members) / (params * chunks),
                "weight_var": max(var, 0.0)})
    return units
