"""From the stages' sensitivity statistics to per-module bit widths: decision units with their
side information, the global allocation, the quantization config that carries it (as exact
per-module overrides), and what the report and the plot show."""
from __future__ import annotations

import dataclasses
from typing import Any

from pipeline import storage
from pipeline.allocation import Allocation, Unit, allocate
from pipeline.config import ConfigError, QuantizationConfig
from pipeline.model_parts import ModelParts
from pipeline.plot import bars_png
from pipeline.schemes import format_for

ALLOCATION_FILE = "allocation.json"  # under OUT/.relayquant/, so a resumed run reuses it


def side_information(parts: ModelParts, linear: str, quantization: QuantizationConfig
                     ) -> tuple[float, float]:
    """(bits per weight independent of the width, bits per weight per weight bit): one scale in
    the stored weight dtype per group, plus a zero point of the chosen width when asymmetric."""
    fmt = format_for(linear, quantization)
    assert fmt is not None
    in_features = int(parts.meta.get_submodule(linear).get_parameter("weight").shape[1])
    group = fmt.group_size or in_features
    index, relative = linear.removeprefix(parts.adapter.blocks + ".").split(".", 1)
    dtype = parts.stored_dtypes(parts.block_path(int(index)))[f"{relative}.weight"]
    scale_bits = dtype.itemsize * 8  # scales are stored in the weight's dtype
    return scale_bits / group, (0.0 if fmt.symmetric else 1.0 / group)


def check_feasible(parts: ModelParts, quantization: QuantizationConfig) -> None:
    """Refuse a budget below what the smallest width (plus side information, when counted)
    costs, before any work: the units' sizes and side information are known from the config."""
    b = quantization.budget
    assert b.average_bits is not None
    lowest = min(b.choices)
    total = cost = 0.0
    for i in range(parts.num_blocks):
        for name in parts.adapter.linears:
            linear = f"{parts.block_path(i)}.{name}"
            if format_for(linear, quantization) is None:
                continue
            params = parts.meta.get_submodule(linear).get_parameter("weight").numel()
            side, per_bit = side_information(parts, linear, quantization)
            total += params
            cost += params * (lowest + ((side + per_bit * lowest) if b.count_side_info else 0))
    if total and b.average_bits < cost / total - 1e-12:
        raise ConfigError(
            f"quantization.budget.average_bits: {b.average_bits} is below what the smallest "
            f"choice ({lowest} bits{' plus scales and zero points' if b.count_side_info else ''})"
            f" costs: at least {cost / total:.4f} bits per weight")


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


def solve(parts: ModelParts, stats: list[dict[str, Any]], quantization: QuantizationConfig
          ) -> dict[str, Any]:
    budget = quantization.budget
    assert budget.average_bits is not None
    units = build_units(parts, stats, quantization)
    result: Allocation = allocate([u for u, _ in units], budget.choices, budget.average_bits,
                                  budget.count_side_info)
    return {
        "target_bits": budget.average_bits, "achieved_bits": result.achieved_bits,
        "weight_bits": result.weight_bits, "log_lambda": result.log2_lambda,
        "log_base": 2, "choices": sorted(budget.choices),
        "count_side_info": budget.count_side_info, "objective": budget.objective.value,
        "modelled_distortion": result.distortion,
        "units": [{"name": u.name, "bits": b, "params": u.params, "linears": s["linears"],
                   "block": s["block"], "kind": s["kind"],
                   "grad_sq": u.grad_sq, "weight_var": u.weight_var,
                   "side_bits": u.side_bits + u.side_per_bit * b}
                  for (u, s), b in zip(units, result.bits, strict=True)],
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
    data = storage.read_json(path)
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
            overrides[linear] = {"bits": unit["bits"], "group_size": fmt.group_size,
                                 "symmetric": fmt.symmetric}
    return dataclasses.replace(quantization, overrides=overrides)


def write_plot(output: str, allocation: dict[str, Any]) -> str:
    units = allocation["units"]
    png = bars_png([u["bits"] for u in units], [u["kind"] for u in units],
                   [u["block"] for u in units], top=max(allocation["choices"]))
    path = storage.join(output, "allocation.png")
    storage.write_bytes(path, png)
    return path
