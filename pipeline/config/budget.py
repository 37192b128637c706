"""`quantization.budget`: CVXQ's one average-bit budget over the whole model, what a unit's
sensitivity is measured on and how its error at each width is counted."""
from __future__ import annotations

import dataclasses
import enum

from pipeline.config.base import _require, check_seed


class Objective(str, enum.Enum):
    PCA = "pca"  # random signs on the final hidden states' top principal directions (CVXQ)
    LM_LOSS = "lm_loss"  # the next-token loss


class Distortion(str, enum.Enum):
    MODEL = "model"  # CVXQ's high-resolution model: G^2 S^2 2^(-2b) per weight
    # G^2 times the unit's measured RTN error per weight at each option (width, group size)
    MEASURED = "measured"


@dataclasses.dataclass(frozen=True)
class BudgetConfig:
    """CVXQ: one average-bit budget over the whole model, allocated per decision unit (the
    fused groups q/k/v, o, gate/up, down of every block)."""

    average_bits: float | None = None  # null: no allocation, every unit gets quantization.bits
    # the bit widths a unit may get
    choices: list[int] = dataclasses.field(default_factory=lambda: [2, 3, 4, 8])
    # count scales and zero points in the budget (bits per weight of side information)
    count_side_info: bool = False
    # what a unit's sensitivity is measured on: the final hidden states' principal directions
    # (pca, CVXQ's) or the language-model loss
    objective: Objective = Objective.PCA
    pca_dims: int = 1024  # principal directions of the final hidden states (capped at hidden)
    seed: int = 0  # random signs of the projected objective
    # reuse the per-unit sensitivity statistics of an earlier run of the same model (its
    # report.json or .relayquant/allocation.json, path or fsspec URL) instead of running the
    # sensitivity pass; the allocation is solved again for this budget
    sensitivity_from: str | None = None
    # a unit's error at each width: model (G^2 S^2 2^(-2b), CVXQ's) or measured (its RTN error)
    distortion: Distortion = Distortion.MODEL
    # group sizes the allocator may give a unit along with its width (null = per-channel), the
    # side information of each counted in its cost; empty = the recipe's group size everywhere.
    # Needs distortion: measured (the high-resolution model has no group-size term)
    group_sizes: list[int | None] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        where = "quantization.budget"
        _require(all(g is None or (isinstance(g, int) and g >= 1) for g in self.group_sizes)
                 and len(set(self.group_sizes)) == len(self.group_sizes),
                 f"{where}.group_sizes: {self.group_sizes}; give distinct positive integers "
                 "(each dividing every quantized linear's in_features) or null for per-channel")
        _require(not self.group_sizes or self.distortion is Distortion.MEASURED,
                 f"{where}.group_sizes: needs {where}.distortion: measured (the model "
                 "distortion G^2 S^2 2^(-2b) does not depend on the group size)")
        _require(self.sensitivity_from is None or self.average_bits is not None,
                 f"{where}.sensitivity_from: needs {where}.average_bits")
        _require(bool(self.choices) and all(isinstance(c, int) and 2 <= c <= 8
                                            for c in self.choices)
                 and len(set(self.choices)) == len(self.choices),
                 f"{where}.choices: {self.choices}; give distinct bit widths from 2 to 8")
        if self.average_bits is not None:
            _require(min(self.choices) <= self.average_bits,
                     f"{where}.average_bits: {self.average_bits} is below the smallest choice "
                     f"{min(self.choices)}")
        _require(self.pca_dims >= 1, f"{where}.pca_dims: {self.pca_dims}; must be >= 1")
        check_seed(self.seed, f"{where}.seed")
