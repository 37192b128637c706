"""CVXQ's statistics of the FP model in the user cache (`pipeline.user_cache`), so that a second
CVXQ run on the same model (another budget, method or width set) skips the passes that made
them:

- `cvxq_statistics`: each linear's sensitivity statistics (gradient and weight sums) from the
  sensitivity pass, keyed by the model, the calibration windows' sha256, the objective (kind,
  PCA directions, seed) and what the pass computes with (compute dtype, chunk size);
- `cvxq_errors`: each quantized linear's RTN error at each (width, group size) option
  (`distortion: measured`), keyed by the model and, per linear, its options, its format's
  other fields (symmetric, full range, observer), its stored dtype and the compute dtype.

Both keys also hold the code version, so any change of the pipeline's sources recomputes them.
"""
from __future__ import annotations

from typing import Any

import torch

from pipeline import user_cache
from pipeline.config import BudgetConfig, ClusterConfig, QuantizationConfig
from pipeline.cvxq.budget import option_key, stored_dtype, unit_options
from pipeline.model_parts import ModelParts
from pipeline.schemes import format_for

STATISTICS, ERRORS = "cvxq_statistics", "cvxq_errors"


def statistics_key(model_path: str, windows: torch.Tensor, budget: BudgetConfig,
                   cluster: ClusterConfig) -> str:
    return user_cache.make_key({
        **user_cache.model_identity(model_path), "windows": user_cache.tensor_digest(windows),
        "objective": budget.objective.value, "pca_dims": budget.pca_dims, "seed": budget.seed,
        "compute_dtype": cluster.compute_dtype, "chunk_size": cluster.chunk_size})


def errors_key(model_path: str, parts: ModelParts, quantization: QuantizationConfig,
               cluster: ClusterConfig) -> str:
    linears: dict[str, Any] = {}
    for i in range(parts.num_blocks):
        for name in parts.adapter.linears:
            linear = f"{parts.block_path(i)}.{name}"
            fmt = format_for(linear, quantization)
            if fmt is None:
                continue
            linears[linear] = {
                "options": [option_key(*o) for o in unit_options(linear, quantization)],
                "symmetric": fmt.symmetric, "full_range": fmt.full_range,
                "observer": fmt.observer, "stored": str(stored_dtype(parts, linear))}
    return user_cache.make_key({**user_cache.model_identity(model_path), "linears": linears,
                                "compute_dtype": cluster.compute_dtype})
