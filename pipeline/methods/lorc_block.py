"""LoRC on one block: after its linears are final (the method's weights, LET folded), each
targeted linear's error E = W - Ŵ against the weights actually exported gets rank-m factors
(pipeline/methods/lorc.py), rounded to their storage, and the block's weight becomes Ŵ + B·A, so
the quantized stream leaving the block, and every later block's reconstruction, sees the model
that will run. Also: which linears are targeted and what the adapter costs in bits.

With several data-parallel workers, each linear's factors are computed by one worker (spread by
cost) and broadcast, so every worker installs the same bits whatever its SVD library does.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from pipeline.config import ConfigError, LorcConfig, LorcDtype, QuantizationConfig
from pipeline.methods.gptq_block import assign_by_cost
from pipeline.methods.hooks import input_hooks
from pipeline.methods.lorc import (
    LowRankFactors,
    activation_weighted_factors,
    adapter_bits,
    factor_errors,
    low_rank_factors,
    quantize_int8,
    round_factors,
)
from pipeline.model_parts import ModelParts, run_block
from pipeline.parallel.collective import Collective, Solo, sum_scalars
from pipeline.schemes import format_for
from pipeline.streams import ChunkStore

# the run's per-block factor shards (a marker's `files` key, a folder of the output); the
# PEFT adapter folder OUTPUT/lorc/ is assembled from them when the run finishes
STATE_FOLDER = ".relayquant/lorc"
PEFT_PREFIX = "base_model.model."
ERROR_KEYS = ("error_sq", "residual_sq", "stored_residual_sq", "storage_error_sq")
SCALE_BITS = 32  # int8 factors: one fp32 scale per rank component and side


def is_target(name: str, lorc: LorcConfig) -> bool:
    """Whether the linear with this full name is corrected (it must also be quantized)."""
    if lorc.targets is None:
        return True
    return any(re.fullmatch(p[3:], name) if p.startswith("re:") else p == name
               for p in lorc.targets)


def require_targets_match(lorc: LorcConfig, quantized: dict[str, tuple[int, int]]) -> None:
    """A target that names no quantized linear is a typo, not a no-op; and the rank fits
    every targeted linear (`quantized`: full name -> (out_features, in_features))."""
    names = list(quantized)
    for pattern in lorc.targets or []:
        if not any(is_target(n, LorcConfig(targets=[pattern])) for n in names):
            example = names[0] if names else "(none)"
            raise ConfigError(f"quantization.lorc.targets: {pattern!r} matches none of this "
                              f"model's {len(names)} quantized linears (e.g. {example}); give "
                              "an exact module name or re: and a regex matched against the "
                              "whole name")
    for name, shape in quantized.items():
        if is_target(name, lorc) and lorc.rank > min(shape):
            raise ConfigError(f"quantization.lorc.rank: {lorc.rank} exceeds the smaller side of "
                              f"{name} ({shape[0]} x {shape[1]}); a correction of that rank is "
                              f"no smaller than the weight: use at most {min(shape)}, or leave "
                              "that linear out of quantization.lorc.targets")


def storage_dtype(lorc: LorcConfig, weight_dtype: torch.dtype) -> torch.dtype:
    """The adapter's dtype: the recipe's float dtype, or the model's for int8 factors."""
    if lorc.dtype is LorcDtype.INT8:
        return weight_dtype
    return torch.float16 if lorc.dtype is LorcDtype.FLOAT16 else torch.bfloat16


def linear_adapter_bits(lorc: LorcConfig, rows: int, columns: int) -> int:
    if lorc.dtype is LorcDtype.INT8:
        return adapter_bits(lorc.rank, rows, columns, 8, SCALE_BITS)
    return adapter_bits(lorc.rank, rows, columns, 16)


def model_bits(parts: ModelParts, quantization: QuantizationConfig) -> dict[str, float]:
    """Bits of the quantized linears as stored (codes, one scale of the weight's dtype per
    group, and an integer zero point per group when asymmetric) and of LoRC's factors, over the
    quantized linears' weights: what a row of a benchmark table compares at equal size."""
    weights = stored = lorc_bits = 0.0
    for i in range(parts.num_blocks):
        path = parts.block_path(i)
        dtypes = parts.stored_dtypes(path)
        for name in parts.adapter.linears:
            full = f"{path}.{name}"
            fmt = format_for(full, quantization)
            if fmt is None:
                continue
            rows, columns = parts.meta.get_submodule(full).get_parameter("weight").shape
            groups = rows * (columns // (fmt.group_size or columns))
            scale = dtypes[f"{name}.weight"].itemsize * 8
            weights += rows * columns
            stored += rows * columns * fmt.bits + groups * (scale + (0 if fmt.symmetric
                                                                     else fmt.bits))
            lorc = quantization.lorc
            if lorc is not None and is_target(full, lorc) and rank_fits(lorc.rank, rows,
                                                                       columns):
                lorc_bits += linear_adapter_bits(lorc, rows, columns)
    weights = max(weights, 1.0)
    return {"quantized_weights": weights, "weights": stored / weights,
            "lorc": lorc_bits / weights, "total": (stored + lorc_bits) / weights}


def rank_fits(rank: int, rows: int, columns: int) -> bool:
    """A rank at least min(rows, columns) would store more than the full matrix: skipped."""
    return rank < min(rows, columns)


@torch.no_grad()
def input_rms(parts: ModelParts, block: nn.Module, names: list[str], q_in: list[Any],
              store: ChunkStore, group: Collective) -> dict[str, torch.Tensor]:
    """Each named linear's per-input-channel rms over the quantized stream through the block
    as it is now (every worker's windows summed)."""
    sums = {n: torch.zeros(block.get_parameter(f"{n}.weight").shape[1], dtype=torch.float64,
                           device=parts.device) for n in names}
    counts = torch.zeros(len(names), dtype=torch.float64, device=parts.device)

    def visit(name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        sums[name] += x.pow(2).sum(0)
        counts[names.index(name)] += x.shape[0]

    with input_hooks(block, names, visit):
        for h in q_in:
            run_block(parts, block, store.get(h).to(parts.device))
    if group.world > 1:
        group.sum_([*sums.values(), counts])
    return {n: (sums[n] / counts[i].clamp(min=1)).sqrt().float() for i, n in enumerate(names)}


@torch.no_grad()
def block_factors(block: nn.Module, reference: dict[str, torch.Tensor], lorc: LorcConfig,
                  dtypes: dict[str, torch.dtype], rms: dict[str, torch.Tensor] | None = None,
                  group: Collective | None = None
                  ) -> tuple[dict[str, LowRankFactors], dict[str, Any]]:
    """The stored factors of every linear in `reference` (relative name -> its FP weight in the
    exported basis) against the block's current (quantized) weights: fp32 values as stored
    (int8 factors dequantized), before `adapter_factors` casts them to the adapter's dtype;
    and the summed squared errors over them (of the factors as the adapter holds them)."""
    group = group or Solo()
    names = [n for n in reference if rank_fits(lorc.rank, *reference[n].shape)]
    shapes = [reference[n].shape for n in names]
    owners = assign_by_cost(names, [float(r) * c * min(r, c) for r, c in shapes], group.world)
    out: dict[str, LowRankFactors] = {}
    errors = dict.fromkeys(ERROR_KEYS, 0.0)
    for name, owner, (rows, columns) in zip(names, owners, shapes, strict=True):
        weight = block.get_parameter(f"{name}.weight")
        rank = lorc.rank
        if owner == group.rank:
            error = reference[name].float().to(weight.device) - weight.float()
            exact = (activation_weighted_factors(error, rms[name], rank)
                     if rms is not None else low_rank_factors(error, rank))
            stored = (quantize_int8(exact).dequantized() if lorc.dtype is LorcDtype.INT8
                      else round_factors(exact, storage_dtype(lorc, weight.dtype)))
            held = round_factors(stored, storage_dtype(lorc, dtypes[f"{name}.weight"]))
            for key, value in factor_errors(error, exact, held).items():
                errors[key] += value
            a, b = stored.a.contiguous(), stored.b.contiguous()
        else:
            a = torch.empty(rank, columns, device=weight.device)
            b = torch.empty(rows, rank, device=weight.device)
        if group.world > 1:
            group.broadcast_([a, b], owner)
        out[name] = LowRankFactors(a, b)
    totals = sum_scalars(group, [errors[k] for k in ERROR_KEYS])
    return out, {"linears": len(out), **dict(zip(ERROR_KEYS, totals, strict=True)),
                 "adapter_bits": sum(linear_adapter_bits(lorc, r, c) for r, c in shapes)}


def adapter_factors(factors: dict[str, LowRankFactors], lorc: LorcConfig,
                    dtypes: dict[str, torch.dtype]) -> dict[str, LowRankFactors]:
    """The factors as the adapter holds them (rounded to its dtype), in fp32."""
    return {n: round_factors(f, storage_dtype(lorc, dtypes[f"{n}.weight"]))
            for n, f in factors.items()}


@torch.no_grad()
def install_(block: nn.Module, factors: dict[str, LowRankFactors]) -> None:
    """Ŵ <- Ŵ + B·A in the block (in its compute dtype): what the quantized stream sees."""
    for name, f in factors.items():
        weight = block.get_parameter(f"{name}.weight")
        weight.copy_((weight.float() + f.product().to(weight.device)).to(weight.dtype))


def adapter_tensors(path: str, factors: dict[str, LowRankFactors], lorc: LorcConfig,
                    dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """The block's factors (from `block_factors`) under PEFT's names (`lora_A.weight` [r, in],
    `lora_B.weight` [out, r]) in the adapter's dtype; with int8 factors also their codes and
    scales (`lora_A.int8`, `lora_A.scale`, ...), which the adapter folder keeps in a side
    file."""
    out = {}
    for name, f in factors.items():
        prefix = f"{PEFT_PREFIX}{path}.{name}"
        dtype = storage_dtype(lorc, dtypes[f"{name}.weight"])
        out[f"{prefix}.lora_A.weight"] = f.a.to("cpu", dtype).contiguous()
        out[f"{prefix}.lora_B.weight"] = f.b.to("cpu", dtype).contiguous()
        if lorc.dtype is LorcDtype.INT8:
            q = quantize_int8(f)  # dequantized int8 values re-encode to their codes
            out.update({f"{prefix}.lora_A.int8": q.a_codes.cpu(),
                        f"{prefix}.lora_A.scale": q.a_scale.cpu(),
                        f"{prefix}.lora_B.int8": q.b_codes.cpu(),
                        f"{prefix}.lora_B.scale": q.b_scale.cpu()})
    return out


def references(block: nn.Module, names: list[str], path: str,
               lorc: LorcConfig | None) -> dict[str, torch.Tensor]:
    """Copies of the targeted linears' FP weights, taken before the method changes them."""
    if lorc is None:
        return {}
    return {n: block.get_parameter(f"{n}.weight").detach().clone() for n in names
            if is_target(f"{path}.{n}", lorc)}


@torch.no_grad()
def compensate_(parts: ModelParts, block: nn.Module, path: str, reference: dict[str, torch.Tensor],
                lorc: LorcConfig, dtypes: dict[str, torch.dtype], q_in: list[Any] | None = None,
                store: ChunkStore | None = None, group: Collective | None = None
                ) -> tuple[dict[str, LowRankFactors], dict[str, torch.Tensor], dict[str, Any]]:
    """LoRC on a block whose linears are final: the factors of every targeted linear installed
    in the block (Ŵ + B·A), returned as the adapter holds them (fp32), with the block's adapter
    tensors and metrics. The activation-aware variant reads the quantized stream `q_in`."""
    group = group or Solo()
    rms = None
    if lorc.activation_aware:
        assert q_in is not None and store is not None, "activation_aware needs the stream"
        rms = input_rms(parts, block, list(reference), q_in, store, group)
    factors, metrics = block_factors(block, reference, lorc, dtypes, rms, group)
    held = adapter_factors(factors, lorc, dtypes)
    install_(block, held)
    return held, adapter_tensors(path, factors, lorc, dtypes), metrics


def lorc_report(lorc: LorcConfig, markers: list[dict[str, Any]], bits: dict[str, float],
                perplexity: dict[str, Any] | None) -> dict[str, Any]:
    """The report's LoRC section: rank, dtype, bits, the error left (relative Frobenius norms
    over every corrected linear) and the perplexity with and without the adapter."""
    sums = {k: sum(m["metrics"].get("lorc", {}).get(k, 0.0) for m in markers)
            for k in ERROR_KEYS}
    error = sums["error_sq"] or 1.0
    return {"rank": lorc.rank, "dtype": lorc.dtype.value, "targets": lorc.targets,
            "activation_aware": lorc.activation_aware, "count_in_budget": lorc.count_in_budget,
            "linears": sum(m["metrics"].get("lorc", {}).get("linears", 0) for m in markers),
            "adapter_bits_per_weight": bits["lorc"], "total_bits_per_weight": bits["total"],
            # ‖E - B·A‖_F / ‖E‖_F: with the fp32 factors, with the stored ones; and the
            # storage error ‖B·A - B'·A'‖_F / ‖E‖_F (int8 or float rounding)
            "relative_residual": (sums["residual_sq"] / error) ** 0.5,
            "relative_residual_stored": (sums["stored_residual_sq"] / error) ** 0.5,
            "relative_storage_error": (sums["storage_error_sq"] / error) ** 0.5,
            "perplexity": None if perplexity is None else perplexity["quantized"],
            "perplexity_without": None if perplexity is None
            else perplexity.get("quantized_without_lorc")}
