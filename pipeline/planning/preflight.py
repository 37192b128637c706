"""A recipe checked against the model it will quantize, from the model's config and shard
headers (no weights read): the schemes and the overrides, LoRC's targets and rank, the CVXQ
budget. `relayquant quantize` refuses a bad recipe with these before any work, and
`relayquant plan` with the same messages."""
from __future__ import annotations

from typing import Any

from pipeline.config import RunConfig
from pipeline.cvxq import budget
from pipeline.formats import AffineFormat
from pipeline.methods import lorc_block
from pipeline.model_parts import ModelParts
from pipeline.schemes import validate_schemes


def check_recipe(parts: ModelParts, config: RunConfig
                 ) -> tuple[dict[str, AffineFormat | None], list[dict[str, Any]] | None]:
    """(each linear's format, the sensitivity statistics of `budget.sensitivity_from` or
    None), or a ConfigError naming the field."""
    q = config.quantization
    formats = validate_schemes(parts, q, config.export.formats)
    if q.lorc is not None:
        lorc_block.require_targets_match(q.lorc, {
            n: (int(shape[0]), int(shape[1]))
            for n, f in formats.items() if f is not None
            for shape in [parts.meta.get_submodule(n).get_parameter("weight").shape]})
    saved = None
    if q.budget.average_bits is not None:
        budget.check_feasible(parts, q)
        if q.budget.sensitivity_from is not None:  # read now: a --restart may clear its folder
            saved = budget.load_statistics(parts, q)
    return formats, saved
