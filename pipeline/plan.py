"""Plan a run from the config and the checkpoint's index alone: which blocks, how heavy, and
which stage owns which."""
from __future__ import annotations

import dataclasses
from typing import Any

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.formats.peft_adapter import read_adapter
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


def open_model(path: str, compute_dtype: str = "float32", device: str = "cpu",
               lorc: str | None = None) -> ModelParts:
    """The model at `path`; with `lorc` (a PEFT LoRA adapter folder) its factors merged into
    the weights as each part loads."""
    storage.require_exists(path, "model.path")
    return ModelParts(storage.CheckpointReader(path), DTYPES[compute_dtype], device,
                      read_adapter(lorc) if lorc is not None else None)


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


def head_cost_bytes(parts: ModelParts, block_bytes: list[int]) -> int:
    """What the head adds to the last stage's work, in block-weight bytes: its matrix
    (vocab x hidden) costs per token what a block's weights of that size cost, whether or not
    it is tied to the embedding."""
    cfg = parts.hf_config
    vocab, hidden = getattr(cfg, "vocab_size", 0), getattr(cfg, "hidden_size", 0)
    if not (vocab and hidden and block_bytes):
        return 0
    params = sum(p.numel() for p in parts.meta.get_submodule(parts.block_path(0)).parameters())
    return int(vocab * hidden * block_bytes[-1] / max(params, 1))


def make_plan(parts: ModelParts, model_path: str, workers: int) -> Plan:
    """Stages balanced by block bytes, the last stage's counting the head (the last stage
    scores the windows), so forward passes pipelined through the stages stay balanced."""
    sizes = [parts.part_nbytes(parts.block_path(i)) for i in range(parts.num_blocks)]
    costs = list(sizes)
    if costs:
        costs[-1] += head_cost_bytes(parts, sizes)
    return Plan(model_path, parts.architecture, parts.num_blocks, tuple(sizes),
                tuple(split_stages(costs, workers)))
