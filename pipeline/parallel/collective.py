"""Sums, maxima and broadcasts of tensors among the data-parallel workers.

`Solo` is the one-worker case (every operation a no-op, so the single-worker results are the
reference bit for bit); `TorchCollective` runs them through `torch.distributed` (gloo on CPU,
NCCL on GPU) in the worker processes. Both time what they spend waiting, so the report can
show each worker's compute time next to its time in collectives.
"""
from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import Protocol

import torch


class Collective(Protocol):
    rank: int
    world: int
    wait_seconds: float

    def sum_(self, tensors: list[torch.Tensor]) -> None: ...

    def max_(self, tensors: list[torch.Tensor]) -> None: ...

    def min_(self, tensors: list[torch.Tensor]) -> None: ...

    def broadcast_(self, tensors: list[torch.Tensor], source: int) -> None: ...


class Solo:
    """One worker: nothing to combine."""

    rank = 0
    world = 1

    def __init__(self) -> None:
        self.wait_seconds = 0.0

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        pass

    def max_(self, tensors: list[torch.Tensor]) -> None:
        pass

    def min_(self, tensors: list[torch.Tensor]) -> None:
        pass

    def broadcast_(self, tensors: list[torch.Tensor], source: int) -> None:
        pass


def _flat_groups(tensors: list[torch.Tensor]) -> dict[tuple[torch.dtype, torch.device],
                                                       list[int]]:
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    return groups


class TorchCollective:
    """The default `torch.distributed` process group of this worker process."""

    def __init__(self, address: str, rank: int, world: int, backend: str,
                 timeout_s: float = 1800.0):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world, self.wait_seconds = rank, world, 0.0
        # NCCL reduces device tensors only: small CPU tensors (counts, losses) go through the
        # GPU and back; gloo takes both
        self.device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
                       else None)
        dist.init_process_group(backend, init_method=address, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()

    def _flat(self, tensors: list[torch.Tensor], op: Callable[[torch.Tensor], None]) -> None:
        """One call per dtype: the tensors packed into one buffer, reduced, unpacked."""
        start = time.perf_counter()
        for indices in _flat_groups(tensors).values():
            parts = [tensors[i] for i in indices]
            buffer = torch.cat([p.reshape(-1) for p in parts])
            if self.device is not None and buffer.device != self.device:
                buffer = buffer.to(self.device)
            op(buffer)
            offset = 0
            for p in parts:
                p.copy_(buffer[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        self.wait_seconds += time.perf_counter() - start

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        self._flat(tensors, lambda b: self.dist.all_reduce(b, op=self.dist.ReduceOp.SUM))

    def max_(self, tensors: list[torch.Tensor]) -> None:
        self._flat(tensors, lambda b: self.dist.all_reduce(b, op=self.dist.ReduceOp.MAX))

    def min_(self, tensors: list[torch.Tensor]) -> None:
        self._flat(tensors, lambda b: self.dist.all_reduce(b, op=self.dist.ReduceOp.MIN))

    def broadcast_(self, tensors: list[torch.Tensor], source: int) -> None:
        self._flat(tensors, lambda b: self.dist.broadcast(b, src=source))


def sum_scalars(group: Collective, values: list[float]) -> list[float]:
    """The sums of a few numbers over the workers (float64)."""
    if group.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    group.sum_([t])
    return t.tolist()
