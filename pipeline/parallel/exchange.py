"""The exchanges of a training step whose quantizer is split among the data-parallel workers
(`pipeline.training.steps.QuantizerShards`): through shared memory on one node, through
torch.distributed otherwise. `TorchCollective.shards` picks one."""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from pipeline.parallel.collective import SharedMemorySum


class SharedMemoryShards:
    """The exchanges of a training step whose quantizer is split among the workers of one node
    (`pipeline.training.steps.QuantizerShards`): every tensor of the step has one owner, which
    computes it and, once the window gradients are summed, sends the sum back through the
    quantizer. `gather` publishes each worker's own tensors and returns every tensor as a view
    of shared memory (valid until the next `gather`); `reduce` returns the sums over the
    workers of the gradients of this worker's own tensors, in worker order (worker 0 + 1 +
    ...: the bits `SharedMemorySum` gives). Uses the buffers of `memory`: no `SharedMemorySum.sum_`
    may run between a `gather` and the end of the step's window passes, and two `reduce`s must
    have a `gather` (its barrier) between them, or a fast worker would overwrite what a slow
    one still reads."""

    def __init__(self, memory: SharedMemorySum, shapes: dict[str, torch.Size],
                 owners: dict[str, int], clock: Any = None):
        self.memory, self.owners, self.clock = memory, owners, clock
        self.shapes = shapes
        self.offsets: dict[str, int] = {}
        total = 0
        for key, shape in shapes.items():
            self.offsets[key] = total
            total += math.prod(shape)
        self.numel = total

    def _room(self, nbytes: int) -> None:
        if nbytes > self.memory.capacity:
            self.memory._grow(nbytes)

    def _view(self, buffer: torch.Tensor, key: str, dtype: torch.dtype) -> torch.Tensor:
        start = self.offsets[key] * dtype.itemsize
        end = start + math.prod(self.shapes[key]) * dtype.itemsize
        return buffer[start:end].view(dtype).view(self.shapes[key])

    def gather(self, own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every key's tensor (float32), each written by its owner."""
        self._room(self.numel * 4)
        start = time.perf_counter()
        for key, value in own.items():
            self._view(self.memory.out, key, torch.float32).copy_(value)
        self.memory.dist.barrier()
        self._count(start)
        return {key: self._view(self.memory.out, key, torch.float32) for key in self.shapes}

    def reduce(self, grads: dict[str, torch.Tensor | None], dtype: torch.dtype,
               extra: torch.Tensor) -> dict[str, torch.Tensor]:
        """{own key: the sum over the workers of its gradient (None counts as zero)}; `extra`
        (a few float64 numbers, the same length everywhere) <- its sum over the workers."""
        tail = -(-self.numel * dtype.itemsize // 8) * 8  # the extras after them, 8-aligned
        self._room(tail + 8 * extra.numel())
        start = time.perf_counter()
        rank = self.memory.rank
        mine = self.memory.inputs[rank]
        for key in self.shapes:
            if self.owners[key] == rank:  # its owner reads its own part where it is
                continue
            view = self._view(mine, key, dtype)
            g = grads.get(key)
            if g is None:
                view.zero_()
            else:
                view.copy_(g)
        extras = [b[tail:tail + 8 * extra.numel()].view(torch.float64)
                  for b in self.memory.inputs]
        extras[rank].copy_(extra)
        self.memory.dist.barrier()
        extra.copy_(extras[0])
        for other in extras[1:]:
            extra.add_(other)
        out = {}
        for key, owner in self.owners.items():
            if owner != rank:
                continue
            own = grads.get(key)
            parts = [(own.to(dtype) if own is not None else
                      torch.zeros(self.shapes[key], dtype=dtype)) if r == rank
                     else self._view(b, key, dtype) for r, b in enumerate(self.memory.inputs)]
            total = torch.add(parts[0], parts[1]) if len(parts) > 1 else parts[0].clone()
            for other in parts[2:]:
                total.add_(other)
            out[key] = total
        self._count(start)
        return out

    def _count(self, start: float) -> None:
        if self.clock is not None:
            self.clock.wait_seconds += time.perf_counter() - start


class DistributedShards:
    """The exchanges of `SharedMemoryShards` for workers that share no memory (CPU workers on
    several nodes through gloo, GPUs through NCCL), through `torch.distributed`: `gather`
    broadcasts each owner's tensors to every worker; `reduce` gathers every worker's gradients
    of each owner's tensors to that owner, which adds them in worker order (worker 0 + 1 +
    ...: the bits `SharedMemoryShards` gives), `chunk` values per worker at a time so that the
    owner's buffers stay small (on GPUs NCCL's reduce instead); the extras are all-gathered
    and added in the same order on every worker. Tensors live on `device` (the GPU for NCCL;
    None: the host)."""

    def __init__(self, dist: Any, rank: int, world: int, shapes: dict[str, torch.Size],
                 owners: dict[str, int], device: torch.device | None = None,
                 clock: Any = None, chunk: int = 1 << 24):
        self.dist, self.rank, self.world = dist, rank, world
        self.shapes, self.owners, self.clock, self.chunk = shapes, owners, clock, chunk
        self.device = device or torch.device("cpu")
        # gathers summed in worker order (exact), or NCCL's reduce (GPUs: less traffic)
        self.ordered = self.device.type != "cuda"
        self.by_owner = {r: [k for k in shapes if owners[k] == r] for r in range(world)}

    def _split(self, flat: torch.Tensor, keys: list[str]) -> dict[str, torch.Tensor]:
        out, offset = {}, 0
        for key in keys:
            size = math.prod(self.shapes[key])
            out[key] = flat[offset:offset + size].view(self.shapes[key])
            offset += size
        return out

    def gather(self, own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every key's tensor (float32), each broadcast by its owner."""
        start = time.perf_counter()
        out: dict[str, torch.Tensor] = {}
        for owner, keys in self.by_owner.items():
            if not keys:
                continue
            if owner == self.rank:
                flat = torch.cat([own[k].detach().reshape(-1).to(self.device, torch.float32)
                                  for k in keys])
            else:
                flat = torch.empty(sum(math.prod(self.shapes[k]) for k in keys),
                                   dtype=torch.float32, device=self.device)
            self.dist.broadcast(flat, src=owner)
            out.update(self._split(flat, keys))
        self._count(start)
        # in the keys' own order, not the owners': a step sums the shared parameters'
        # contributions in this order, and one worker sums them in it
        return {key: out[key] for key in self.shapes}

    def reduce(self, grads: dict[str, torch.Tensor | None], dtype: torch.dtype,
               extra: torch.Tensor) -> dict[str, torch.Tensor]:
        """{own key: the sum over the workers of its gradient (None counts as zero)}; `extra`
        (a few float64 numbers, the same length everywhere) <- its sum over the workers."""
        start = time.perf_counter()
        out: dict[str, torch.Tensor] = {}
        for owner, keys in self.by_owner.items():
            if not keys:
                continue
            flat = torch.cat([
                (g.detach().to(self.device, dtype) if (g := grads.get(k)) is not None else
                 torch.zeros(self.shapes[k], dtype=dtype, device=self.device)).reshape(-1)
                for k in keys])
            if not self.ordered:
                # NCCL's reduce: no fixed order, but ~1/N of the gathers' traffic into each
                # owner; exact wherever at most two workers add a non-zero gradient (global
                # batches of up to two windows, the float32 sums), as NCCL's all-reduce is
                self.dist.reduce(flat, dst=owner)
                if owner == self.rank:
                    out.update(self._split(flat, keys))
                continue
            total = torch.empty_like(flat) if owner == self.rank else None
            for a in range(0, flat.numel(), self.chunk):
                piece = flat[a:a + self.chunk]
                parts = ([torch.empty_like(piece) for _ in range(self.world)]
                         if owner == self.rank else None)
                self.dist.gather(piece, gather_list=parts, dst=owner)
                if parts is not None and total is not None:
                    acc = total[a:a + piece.numel()]
                    torch.add(parts[0], parts[1], out=acc)
                    for other in parts[2:]:
                        acc.add_(other)
            if total is not None:
                out.update(self._split(total, keys))
        every = [torch.empty(extra.shape, dtype=torch.float64, device=self.device)
                 for _ in range(self.world)]
        self.dist.all_gather(every, extra.to(self.device, torch.float64))
        summed = every[0].clone()
        for other in every[1:]:
            summed.add_(other)
        extra.copy_(summed.to(extra.device))
        self._count(start)
        return out

    def _count(self, start: float) -> None:
        if self.clock is not None:
            self.clock.wait_seconds += time.perf_counter() - start
