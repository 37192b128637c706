"""Which calibration windows each data-parallel worker keeps for the whole run.

Window j sits at position p = j mod B of its training batch (B: the global batch); the worker
of index p * W // B keeps it. Every global batch is therefore spread over the workers in
contiguous slices, so the workers together always train on exactly the batch that one worker
would, whatever B and W are: when B does not divide by W some workers hold one window more of
each batch than others, and the gradients are weighted by each worker's share of the batch
(never a different training). With B < W, workers W - B .. W - 1 hold no window and only
join the collectives.
"""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class WindowShare:
    """The global indices (ascending) of the windows one worker keeps, out of `total`."""

    indices: tuple[int, ...]
    total: int

    @classmethod
    def whole(cls, total: int) -> WindowShare:
        return cls(tuple(range(total)), total)

    def steps(self, batch: int) -> int:
        """Optimizer steps in one epoch over all windows (the last batch may be short)."""
        return math.ceil(self.total / batch)

    def batch_sizes(self, batch: int) -> list[int]:
        """This worker's number of windows in each global batch, in order."""
        sizes = [0] * self.steps(batch)
        for j in self.indices:
            sizes[j // batch] += 1
        return sizes

    def batch_totals(self, batch: int) -> list[int]:
        """The number of windows of each global batch (all workers together)."""
        return [min(batch, self.total - k * batch) for k in range(self.steps(batch))]

    def count_below(self, limit: int) -> int:
        return sum(1 for j in self.indices if j < limit)


def split_windows_among(total: int, workers: int, batch: int) -> list[WindowShare]:
    """Every window to exactly one worker, each global batch of `batch` windows spread over
    the workers (see the module docstring)."""
    if workers < 1 or batch < 1:
        raise ValueError(f"workers {workers} and batch {batch} must be >= 1")
    owners: list[list[int]] = [[] for _ in range(workers)]
    for j in range(total):
        owners[(j % batch) * workers // batch].append(j)
    return [WindowShare(tuple(o), total) for o in owners]
