"""Plan a run from the config and the checkpoint's index alone: which blocks, how heavy, which
stage owns which, and whether the format fits every layer (checked on the meta device)."""
from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from pipeline import storage
from pipeline.config import ConfigError, QuantizationConfig
from pipeline.formats import valid_group_sizes
from pipeline.model_parts import DTYPES, ModelParts


@dataclasses.dataclass(frozen=True)
class Plan:
    model_path: str
    architecture: str
    num_blocks: int
    block_bytes: tuple[int, ...]
    stages: tuple[tuple[int, int], ...]  # [start, end) block ranges, one per worker

    def to_dict(self) -> dict[str, Any]:
        return {"model_path": self.model_path, "architecture": self.architecture,
                "num_blocks": self.num_blocks, "block_bytes": list(self.block_bytes),
                "stages": [list(s) for s in self.stages]}


def open_model(path: str, compute_dtype: str = "float32", device: str = "cpu") -> ModelParts:
    if not storage.exists(path):
        raise ConfigError(f"model.path: {path!r} does not exist")
    return ModelParts(storage.CheckpointReader(path), DTYPES[compute_dtype], device)


def validate_format(parts: ModelParts, quantization: QuantizationConfig) -> None:
    """Every quantized linear's in_features must be divisible by the group size."""
    if quantization.group_size is None:
        return
    layers = []
    for i in range(parts.num_blocks):
        block = parts.meta.get_submodule(parts.block_path(i))
        for name in parts.adapter.linears:
            linear = block.get_submodule(name)
            assert isinstance(linear, nn.Linear)
            layers.append((f"{parts.block_path(i)}.{name}", linear.in_features))
    for full, in_features in layers:
        if in_features % quantization.group_size:
            options = ", ".join(str(g) for g in valid_group_sizes([n for _, n in layers]))
            raise ConfigError(
                f"quantization.group_size: {quantization.group_size} does not divide in_features "
                f"{in_features} of {full}; choose one of {options or '(none)'}, or null for "
                "per-channel")


def split_stages(block_bytes: list[int], workers: int) -> list[tuple[int, int]]:
    """Contiguous ranges minimizing the heaviest stage (linear partition, exact)."""
    n = len(block_bytes)
    if workers > n:
        raise ConfigError(f"cluster.workers: {workers} exceeds the model's {n} blocks; use at most {n}")
    prefix = [0]
    for b in block_bytes:
        prefix.append(prefix[-1] + b)
    inf = float("inf")
    # best[k][i]: min over splits of blocks[:i] into k stages of the heaviest stage
    best = [[inf] * (n + 1) for _ in range(workers + 1)]
    cut = [[0] * (n + 1) for _ in range(workers + 1)]
    best[0][0] = 0
    for k in range(1, workers + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    ranges, i = [], n
    for k in range(workers, 0, -1):
        ranges.append((cut[k][i], i))
        i = cut[k][i]
    return ranges[::-1]


def make_plan(parts: ModelParts, model_path: str, quantization: QuantizationConfig | None,
              workers: int) -> Plan:
    if quantization is not None:
        validate_format(parts, quantization)
    sizes = [parts.part_nbytes(parts.block_path(i)) for i in range(parts.num_blocks)]
    return Plan(model_path, parts.architecture, parts.num_blocks, tuple(sizes),
                tuple(split_stages(sizes, workers)))
