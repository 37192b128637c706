"""From the stages' sensitivity statistics to per-module bit widths: decision units with their
side information, the global allocation, the quantization config that carries it (as exact
per-module overrides), and what the report and the plot show."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from pipeline import storage
from pipeline.config import ConfigError, Distortion, QuantizationConfig
from pipeline.cvxq.allocation import Allocation, Unit, allocate, allocate_options
from pipeline.methods.lorc_block import model_bits
from pipeline.methods.rtn import rtn_quantize
from pipeline.model_parts import ModelParts
from pipeline.reporting.plot import bars_png
from pipeline.schemes import format_for

ALLOCATION_FILE = "allocation.json"  # under OUT/.relayquant/, so a resumed run reuses it


def stored_dtype(parts: ModelParts, linear: str) -> torch.dtype:
    index, relative = linear.removeprefix(parts.adapter.blocks + ".").split(".", 1)
    return parts.stored_dtypes(parts.block_path(int(index)))[f"{relative}.weight"]


def side_information(parts: ModelParts, linear: str, quantization: QuantizationConfig,
                     group_size: int | None | str = "recipe") -> tuple[float, float]:
    """(bits per weight independent of the width, bits per weight per weight bit): one scale in
    the stored weight dtype per group, plus a zero point of the chosen width when asymmetric.
    The group size is the linear's format's unless given (None = per-channel)."""
    fmt = format_for(linear, quantization)
    assert fmt is not None
    in_features = int(parts.meta.get_submodule(linear).get_parameter("weight").shape[1])
    group = (fmt.group_size if group_size == "recipe" else group_size) or in_features
    assert isinstance(group, int)
    scale_bits = stored_dtype(parts, linear).itemsize * 8  # scales: the weight's dtype
    return scale_bits / group, (0.0 if fmt.symmetric else 1.0 / group)


def unit_options(linear: str, quantization: QuantizationConfig) -> list[tuple[int, int | None]]:
    """The (width, group size) options of the unit that holds `linear`: every choice of width
    with every allowed group size (the linear's own when the budget names none)."""
    fmt = format_for(linear, quantization)
    assert fmt is not None
    b = quantization.budget
    groups = b.group_sizes or [fmt.group_size]
    return [(bits, group) for bits in sorted(set(b.choices)) for group in groups]


def option_key(bits: int, group: int | None) -> str:
    return f"w{bits}" + (f"g{group}" if group else "pc")


def weight_errors(parts: ModelParts, blocks: tuple[int, int], quantization: QuantizationConfig
                  ) -> dict[str, dict[str, float]]:
    """Per quantized linear of blocks [a, b): the summed squared error of its weight under RTN
    at each of its unit's options (scales rounded to the stored weight dtype), keyed by
    `option_key`. Runs on the stage that holds the blocks; only these numbers leave it."""
    out: dict[str, dict[str, float]] = {}
    for i in range(*blocks):
        block = parts.load_block(i)
        for name in parts.adapter.linears:
            linear = f"{parts.block_path(i)}.{name}"
            fmt = format_for(linear, quantization)
            if fmt is None:
                continue
            w = block.get_submodule(name).get_parameter("weight").detach().float()
            dtype = stored_dtype(parts, linear)
            scale_dtype = dtype if dtype.is_floating_point else torch.float32
            out[linear] = {
                option_key(bits, group): float(
                    (rtn_quantize(w, dataclasses.replace(fmt, bits=bits, group_size=group),
                                  scale_dtype)[0]
                     - w).double().pow(2).sum())
                for bits, group in unit_options(linear, quantization)}
    return out


def option_cost(parts: ModelParts, linear: str, quantization: QuantizationConfig,
                bits: int, group: int | None | str = "recipe") -> float:
    """Bits per weight of `linear` at this width (and group size), side information included
    when the budget counts it."""
    if not quantization.budget.count_side_info:
        return float(bits)
    return bits + _side_bits(parts, linear, quantization, bits, group)


def _side_bits(parts: ModelParts, linear: str, quantization: QuantizationConfig, bits: int,
               group: int | None | str = "recipe") -> float:
    side, per_bit = side_information(parts, linear, quantization, group)
    return side + per_bit * bits


def check_feasible(parts: ModelParts, quantization: QuantizationConfig) -> None:
    """Refuse a budget below what the cheapest option (plus side information, when counted)
    costs, and group sizes that do not divide a quantized linear's in_features, before any work:
    the units' sizes and side information are known from the config."""
    b = quantization.budget
    assert b.average_bits is not None
    total = cost = widest = 0.0
    for i in range(parts.num_blocks):
        for name in parts.adapter.linears:
            linear = f"{parts.block_path(i)}.{name}"
            if format_for(linear, quantization) is None:
                continue
            weight = parts.meta.get_submodule(linear).get_parameter("weight")
            bad = [g for g in b.group_sizes if g and weight.shape[1] % g]
            if bad:
                raise ConfigError(
                    f"quantization.budget.group_sizes: {bad[0]} does not divide in_features "
                    f"{weight.shape[1]} of {linear}; use group sizes that divide every "
                    "quantized linear's in_features, or null for per-channel")
            costs = [option_cost(parts, linear, quantization, bits, group)
                     for bits, group in unit_options(linear, quantization)]
            total += weight.numel()
            cost += weight.numel() * min(costs)
            widest += weight.numel() * max(costs)
    lorc = lorc_bits(parts, quantization)
    if total and b.average_bits < cost / total + lorc - 1e-12:
        raise ConfigError(
            f"quantization.budget.average_bits: {b.average_bits} is below what the smallest "
            f"choice ({min(b.choices)} bits"
            f"{' plus scales and zero points' if b.count_side_info else ''}"
            f"{' plus the LoRC adapter' if lorc else ''}) costs: at least "
            f"{cost / total + lorc:.4f} bits per weight")
    if total and b.average_bits > widest / total + lorc + 1e-12:
        raise ConfigError(
            f"quantization.budget.average_bits: {b.average_bits} is above what the widest "
            f"choice ({max(b.choices)} bits{' with side information' if b.count_side_info else ''}"
            f"{' plus the LoRC adapter' if lorc else ''}) costs, {widest / total + lorc:.4f} bits "
            "per weight: the budget would constrain nothing; give at most that, or drop the "
            f"budget and set quantization.bits: {max(b.choices)}")


def lorc_bits(parts: ModelParts, quantization: QuantizationConfig) -> float:
    """LoRC's adapter bits per quantized weight when the recipe counts them in the budget
    (quantization.lorc.count_in_budget), else 0: fixed by the rank, so the widths share what
    is left of the budget."""
    lorc = quantization.lorc
    if lorc is None or not lorc.count_in_budget:
        return 0.0
    return model_bits(parts, quantization)["lorc"]


def build_units(parts: ModelParts, stats: list[dict[str, Any]],
                quantization: QuantizationConfig) -> list[tuple[Unit, dict[str, Any]]]:
    """Units whose linears are all quantized (a unit kept in full precision is left out), each
    with its statistics entry."""
    out = []
    for s in stats:
        if any(format_for(n, quantization) is None for n in s["linears"]):
            continue
        side, per_bit = side_information(parts, s["linears"][0], quantization)
        out.append((Unit(s["name"], int(s["params"]), float(s["grad_sq"]),
                         float(s["weight_var"]), side, per_bit), s))
    return out


def solve(parts: ModelParts, stats: list[dict[str, Any]], quantization: QuantizationConfig,
          errors: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """The allocation for the report and `apply`. With `distortion: measured`, `errors` (from
    `weight_errors`) gives each unit's RTN error at each of its options."""
    budget = quantization.budget
    assert budget.average_bits is not None
    units = build_units(parts, stats, quantization)
    lorc = lorc_bits(parts, quantization)
    # the widths get the budget less LoRC's adapter; achieved_bits counts the adapter again
    head = {"target_bits": budget.average_bits, "log_base": 2, "choices": sorted(budget.choices),
            "count_side_info": budget.count_side_info, "objective": budget.objective.value,
            "distortion": budget.distortion.value, "lorc_bits": lorc}
    if budget.distortion is Distortion.MEASURED:
        assert errors is not None
        measured = _solve_measured(parts, units, quantization, errors, budget.average_bits - lorc)
        return {**head, **measured, "achieved_bits": measured["achieved_bits"] + lorc}
    result: Allocation = allocate([u for u, _ in units], budget.choices,
                                  budget.average_bits - lorc, budget.count_side_info)
    return {
        **head, "achieved_bits": result.achieved_bits + lorc,
        "weight_bits": result.weight_bits, "log_lambda": result.log2_lambda,
        "modelled_distortion": result.distortion,
        "units": [{"name": u.name, "bits": b, "params": u.params, "linears": s["linears"],
                   "block": s["block"], "kind": s["kind"],
                   "grad_sq": u.grad_sq, "weight_var": u.weight_var,
                   "side_bits": u.side_bits + u.side_per_bit * b}
                  for (u, s), b in zip(units, result.bits, strict=True)],
    }


def _solve_measured(parts: ModelParts, units: list[tuple[Unit, dict[str, Any]]],
                    quantization: QuantizationConfig, errors: dict[str, dict[str, float]],
                    target: float) -> dict[str, Any]:
    """Each unit picks one (width, group size) option; its distortion there is G^2 times the
    measured mean squared RTN error of its weights, its cost the width plus side information."""
    options = [unit_options(s["linears"][0], quantization) for _, s in units]
    cost = torch.tensor([[option_cost(parts, s["linears"][0], quantization, bits, group)
                          for bits, group in opts] for (_, s), opts in zip(units, options)],
                        dtype=torch.float64)
    mse = torch.tensor([[sum(errors[n][option_key(bits, group)] for n in s["linears"]) / u.params
                         for bits, group in opts] for (u, s), opts in zip(units, options)],
                       dtype=torch.float64)
    grad = torch.tensor([u.grad_sq for u, _ in units], dtype=torch.float64)
    result = allocate_options([u.params for u, _ in units], cost, grad[:, None] * mse, target)
    total = sum(u.params for u, _ in units)
    chosen = [opts[j] for opts, j in zip(options, result.choice, strict=True)]
    return {
        "group_sizes": list(quantization.budget.group_sizes),
        "achieved_bits": result.achieved_bits,
        "weight_bits": sum(u.params * b for (u, _), (b, _) in zip(units, chosen)) / total,
        "log_lambda": result.log2_lambda, "modelled_distortion": result.distortion,
        "units": [{"name": u.name, "bits": b, "group_size": g, "params": u.params,
                   "linears": s["linears"], "block": s["block"], "kind": s["kind"],
                   "grad_sq": u.grad_sq, "weight_var": u.weight_var,
                   "side_bits": _side_bits(parts, s["linears"][0], quantization, b, g),
                   "mse": {option_key(*o): float(e) for o, e in zip(opts, unit_mse)}}
                  for (u, s), (b, g), opts, unit_mse in zip(units, chosen, options, mse,
                                                            strict=True)],
    }


def load_statistics(parts: ModelParts, quantization: QuantizationConfig
                    ) -> list[dict[str, Any]]:
    """The per-unit sensitivity statistics saved by an earlier run (`budget.sensitivity_from`:
    its report.json or allocation.json), checked to cover exactly this model's quantized
    linears."""
    where = "quantization.budget.sensitivity_from"
    path = quantization.budget.sensitivity_from
    assert path is not None
    if not storage.exists(path):
        raise ConfigError(f"{where}: {path!r} does not exist")
    data = storage.read_json_file(path, where)
    data = data.get("allocation", data) if isinstance(data, dict) else None
    keys = ("name", "linears", "params", "grad_sq", "weight_var", "block", "kind")
    if (not isinstance(data, dict) or not isinstance(data.get("units"), list)
            or not all(isinstance(u, dict) and all(k in u for k in keys) for u in data["units"])):
        raise ConfigError(f"{where}: {path!r} holds no unit statistics (expected the report.json "
                          "or .relayquant/allocation.json of a run with a budget)")
    expected = sorted(linear for i in range(parts.num_blocks)
                      for linear in (f"{parts.block_path(i)}.{n}" for n in parts.adapter.linears)
                      if format_for(linear, quantization) is not None)
    saved = sorted(n for u in data["units"] for n in u["linears"])
    if saved != expected:
        missing = sorted(set(expected) - set(saved))[:3]
        extra = sorted(set(saved) - set(expected))[:3]
        raise ConfigError(f"{where}: the saved statistics do not cover this model's quantized "
                          f"linears exactly (missing {missing}, unknown {extra})")
    return [{k: u[k] for k in keys} for u in data["units"]]


def apply(quantization: QuantizationConfig, parts: ModelParts, allocation: dict[str, Any]
          ) -> QuantizationConfig:
    """The same config with every allocated linear's width set by an exact-name override."""
    overrides = dict(quantization.overrides)
    for unit in allocation["units"]:
        for linear in unit["linears"]:
            fmt = format_for(linear, quantization)
            assert fmt is not None
            overrides[linear] = {"bits": unit["bits"],
                                 "group_size": unit.get("group_size", fmt.group_size),
                                 "symmetric": fmt.symmetric}
    return dataclasses.replace(quantization, overrides=overrides)


def write_plot(output: str, allocation: dict[str, Any]) -> str:
    units = allocation["units"]
    png = bars_png([u["bits"] for u in units], [u["kind"] for u in units],
                   [u["block"] for u in units], top=max(allocation["choices"]))
    path = storage.join(output, "allocation.png")
    storage.write_bytes(path, png)
    return path
