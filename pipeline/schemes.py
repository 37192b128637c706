"""Which format each quantized linear gets: the recipe's format, changed by the ordered
per-module overrides (exact name first, then the first matching `re:` regex; null = keep the
linear in full precision). Checked on the meta device before any heavy work."""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from torch import nn

from pipeline.config import ConfigError, ExportFormat, QuantizationConfig
from pipeline.formats import AffineFormat, valid_group_sizes
from pipeline.formats.compressed_tensors import vllm_kernel
from pipeline.model_parts import ModelParts

log = logging.getLogger(__name__)


def override_for(name: str, quantization: QuantizationConfig) -> str | None:
    """The override that sets linear `name`'s format: its exact name, else the first `re:`
    pattern that matches it; None: the recipe's format."""
    if name in quantization.overrides:
        return name
    return next((p for p in quantization.overrides
                 if p.startswith("re:") and re.fullmatch(p[3:], name)), None)


def format_for(name: str, quantization: QuantizationConfig) -> AffineFormat | None:
    pattern = override_for(name, quantization)
    change = {} if pattern is None else quantization.overrides[pattern]
    if change is None:
        return None
    return AffineFormat(change.get("bits", quantization.bits),
                        change.get("group_size", quantization.group_size),
                        change.get("symmetric", quantization.symmetric),
                        full_range=quantization.symmetric_range == "full",
                        observer=quantization.observer.value)


def block_formats(parts: ModelParts, index: int, quantization: QuantizationConfig
                  ) -> dict[str, AffineFormat | None]:
    """Relative linear name -> format (None: full precision) for one block."""
    path = parts.block_path(index)
    return {name: format_for(f"{path}.{name}", quantization) for name in parts.adapter.linears}


def validate_schemes(parts: ModelParts, quantization: QuantizationConfig,
                     formats: list[ExportFormat], recipe_overrides: bool = True
                     ) -> dict[str, AffineFormat | None]:
    """Every linear's group size divides its in_features; fused linears share one scheme;
    GPTQ export gets one scheme for all; something is quantized. With `recipe_overrides` (the
    user's, not an allocation's exact names added to them) every override takes effect.
    Returns full name -> format."""
    out: dict[str, AffineFormat | None] = {}
    in_features = {}
    for i in range(parts.num_blocks):
        block = parts.meta.get_submodule(parts.block_path(i))
        chosen = block_formats(parts, i, quantization)
        for group in parts.adapter.fused_groups:
            if len({chosen[name] for name in group}) > 1:
                detail = ", ".join(f"{n}: {_describe(chosen[n])}" for n in group)
                raise ConfigError(
                    f"quantization.overrides: {parts.block_path(i)} gives the fused linears "
                    f"different schemes ({detail}); inference engines fuse them into one "
                    "matrix, so give them the same scheme")
        for name, fmt in chosen.items():
            full = f"{parts.block_path(i)}.{name}"
            linear = block.get_submodule(name)
            assert isinstance(linear, nn.Linear)
            out[full], in_features[full] = fmt, linear.in_features
    for full, fmt in out.items():
        if fmt is not None and fmt.group_size and in_features[full] % fmt.group_size:
            options = ", ".join(str(g) for g in valid_group_sizes(list(in_features.values())))
            pattern = override_for(full, quantization)
            field = ("quantization.group_size" if pattern is None or "group_size" not in
                     (quantization.overrides[pattern] or {})
                     else f"quantization.overrides[{pattern!r}].group_size")
            raise ConfigError(
                f"{field}: {fmt.group_size} does not divide in_features "
                f"{in_features[full]} of {full}; choose one of {options or '(none)'}, or null "
                "for per-channel")
    if ExportFormat.GPTQ in formats and len(set(out.values())) > 1:
        raise ConfigError("export.formats: gptq needs one scheme for every linear (it has no "
                          "per-module schemes); drop the overrides or drop gptq")
    odd = [n for n, f in out.items() if f is not None and in_features[n] % 32]
    if ExportFormat.GPTQ in formats and odd:
        raise ConfigError(f"export.formats: gptq packs the input dimension 32 values at a time, "
                          f"but {odd[0]} has in_features {in_features[odd[0]]}; drop gptq (the "
                          "compressed-tensors folder has no such limit)")
    if out and all(fmt is None for fmt in out.values()):
        raise ConfigError(f"quantization.overrides: keep all {len(out)} linears of the model in "
                          "full precision, so nothing would be quantized; narrow the null "
                          "overrides")
    if recipe_overrides:
        _require_overrides_match(quantization, list(out))
    servable, why = vllm_servable(out.values())
    if not servable:  # export.target: vllm refused such a recipe already
        log.warning("vLLM cannot serve this output: %s (export.target: vllm refuses such a "
                    "recipe before any work)", why)
    return out


def _require_overrides_match(quantization: QuantizationConfig, linears: list[str]) -> None:
    """An override that names no linear of the model is a typo, not a no-op; so is one whose
    every linear an earlier pattern (or an exact name) takes first."""
    winners = {n: override_for(n, quantization) for n in linears}
    for pattern in quantization.overrides:
        regex = pattern[3:] if pattern.startswith("re:") else None
        matched = [n for n in linears
                   if (re.fullmatch(regex, n) if regex is not None else n == pattern)]
        if not matched:
            raise ConfigError(
                f"quantization.overrides[{pattern!r}]: matches none of this model's "
                f"{len(linears)} quantizable linears (e.g. {linears[0]}); give an exact module "
                "name or re: and a regex matched against the whole name")
        if all(winners[n] != pattern for n in matched):
            raise ConfigError(
                f"quantization.overrides[{pattern!r}]: every linear it matches is taken first "
                f"by another override (e.g. {matched[0]} by {winners[matched[0]]!r}; exact "
                "names first, then the first matching re: pattern), so it changes nothing; "
                "move it before that pattern, or drop it")


def vllm_servable(formats: Iterable[AffineFormat | None]) -> tuple[bool, str]:
    """Whether current vLLM has a kernel for every quantized linear's format, and why not.
    (Different schemes inside a fused group never get this far: validate_schemes refuses
    them for every target.)"""
    missing = sorted({f for f in formats if f is not None and not vllm_kernel(f)},
                     key=lambda f: (f.bits, f.group_size or 0))
    if not missing:
        return True, ("every quantized linear has a vLLM wNa16 kernel (symmetric 2-8 bits, "
                      "asymmetric 4 or 8 bits)")
    return False, (f"no vLLM kernel for {', '.join(_describe(f) for f in missing)}: vLLM serves "
                   "asymmetric weights only at 4 and 8 bits; quantize with symmetric: true "
                   "(2-8 bits) or at 4 or 8 bits")


def _describe(fmt: AffineFormat | None) -> str:
    if fmt is None:
        return "full precision"
    group = "per-channel" if fmt.group_size is None else f"g{fmt.group_size}"
    return f"w{fmt.bits} {group} {'sym' if fmt.symmetric else 'asym'}"
