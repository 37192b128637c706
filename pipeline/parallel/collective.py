"""Sums, maxima and broadcasts of tensors among the data-parallel workers.

`Solo` is the one-worker case (every operation a no-op, so the single-worker results are the
reference bit for bit); `TorchCollective` runs them through `torch.distributed` (gloo on CPU,
NCCL on GPU) in the worker processes, and large CPU sums among workers that share one node
through shared memory (`SharedMemorySum`: a fixed-order sum, about three memory passes instead
of gloo's loopback sockets). Both time what they spend waiting, so the report can show each
worker's compute time next to its time in collectives.
"""
from __future__ import annotations

import datetime
import math
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from pipeline.parallel.exchange import DistributedShards, SharedMemoryShards


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


SHM_FOLDER = "/dev/shm"
SHM_MIN_BYTES = 1 << 18  # smaller sums go through gloo: two barriers cost more than they save


def node_identity() -> str:
    """The same string on every process of one machine (one kernel boot), and only there."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class SharedMemorySum:
    """Sums of CPU tensors among the workers of one node through shared memory. Each worker
    writes its buffer into its own memory-mapped file; after a barrier each sums one slice of
    every worker's buffer, in worker order, into a shared result; after a second barrier all
    copy the result out. The files are unlinked as soon as every worker has mapped them, so a
    killed worker leaves nothing behind. Every worker ends with the same bits, summed in a
    fixed order (worker 0 + worker 1 + ...): for two workers exactly gloo's a + b."""

    def __init__(self, dist: Any, rank: int, world: int, token: str, folder: str = SHM_FOLDER):
        self.dist, self.rank, self.world = dist, rank, world
        self.stem = os.path.join(folder, f"relayquant-sum-{token}")
        self.capacity = 0
        self.inputs: list[torch.Tensor] = []
        self.out = torch.empty(0, dtype=torch.uint8)

    def _grow(self, nbytes: int) -> None:
        """Every worker calls this with the same size (the sums are collective)."""
        capacity = max(nbytes, 2 * self.capacity)
        self.dist.barrier()  # nobody still reads the old result
        mine = f"{self.stem}-{self.capacity}-{self.rank}"
        with open(mine, "wb") as f:
            f.truncate(capacity)
        result = f"{self.stem}-{self.capacity}-sum"
        if self.rank == 0:
            with open(result, "wb") as f:
                f.truncate(capacity)
        self.dist.barrier()
        self.inputs = [torch.from_file(f"{self.stem}-{self.capacity}-{r}", shared=True,
                                       size=capacity, dtype=torch.uint8)
                       for r in range(self.world)]
        self.out = torch.from_file(result, shared=True, size=capacity, dtype=torch.uint8)
        self.dist.barrier()  # all mapped: the names can go (the mappings stay)
        os.unlink(mine)
        if self.rank == 0:
            os.unlink(result)
        self.capacity = capacity

    def sum_(self, flat: torch.Tensor) -> None:
        """`flat` (1-D, contiguous, CPU) <- its sum over the workers."""
        nbytes = flat.numel() * flat.element_size()
        if nbytes > self.capacity:
            self._grow(nbytes)
        views = [t[:nbytes].view(flat.dtype) for t in self.inputs]
        out = self.out[:nbytes].view(flat.dtype)
        views[self.rank].copy_(flat)
        self.dist.barrier()
        n = flat.numel()
        lo, hi = n * self.rank // self.world, n * (self.rank + 1) // self.world
        torch.add(views[0][lo:hi], views[1][lo:hi], out=out[lo:hi])
        for other in views[2:]:
            out[lo:hi].add_(other[lo:hi])
        self.dist.barrier()
        flat.copy_(out)


def shared_memory_possible(world: int, nbytes: int = 1 << 30) -> bool:
    """/dev/shm exists and has room for every worker's buffer and the result at `nbytes`."""
    try:
        stat = os.statvfs(SHM_FOLDER)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize > (world + 1) * nbytes


class TorchCollective:
    """The default `torch.distributed` process group of this worker process."""

    def __init__(self, address: str, rank: int, world: int, backend: str,
                 timeout_s: float = 1800.0, shared_memory: bool = True):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world, self.wait_seconds = rank, world, 0.0
        # NCCL reduces device tensors only: small CPU tensors (counts, losses) go through the
        # GPU and back; gloo takes both
        self.device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
                       else None)
        dist.init_process_group(backend, init_method=address, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        self.shm: SharedMemorySum | None = None
        if backend == "gloo" and shared_memory:
            # every worker on this node, with room in /dev/shm on every one of them
            seen: list[Any] = [None] * world
            dist.all_gather_object(seen, (node_identity(), shared_memory_possible(world),
                                          secrets.token_hex(8)))
            if len({s[0] for s in seen}) == 1 and all(s[1] for s in seen):
                self.shm = SharedMemorySum(dist, rank, world, seen[0][2])

    def _room_for(self, nbytes: int) -> bool:
        """Whether the shared-memory sum can take `nbytes` (growing its files when needed);
        decided by all workers together, and for good once /dev/shm is too small (a write
        past a full tmpfs would kill the process)."""
        assert self.shm is not None
        if nbytes <= self.shm.capacity:
            return True
        room = torch.tensor([float(shared_memory_possible(
            self.world, max(nbytes, 2 * self.shm.capacity) * 5 // 4))])
        self.dist.all_reduce(room, op=self.dist.ReduceOp.MIN)
        if room.item() < 1:
            self.shm = None
        return self.shm is not None

    def shards(self, shapes: dict[str, torch.Size], owners: dict[str, int], itemsize: int = 8
               ) -> SharedMemoryShards | DistributedShards:
        """The exchanges of a step with a split quantizer over tensors of `shapes` (gradients
        summed at `itemsize` bytes): through shared memory where every worker is on this node
        and /dev/shm has room (decided by all workers together), else through
        `torch.distributed` (several nodes, GPUs)."""
        if self.shm is not None and self._room_for(
                max(itemsize, 4) * sum(math.prod(s) for s in shapes.values()) + 4096):
            assert self.shm is not None
            return SharedMemoryShards(self.shm, shapes, owners, self)
        return DistributedShards(self.dist, self.rank, self.world, shapes, owners,
                                 self.device, self)

    def small_sum_(self, tensor: torch.Tensor) -> None:
        """A sum through the process group only (never the shared buffers: safe during a
        split step); through the GPU and back under NCCL."""
        start = time.perf_counter()
        if self.device is not None and tensor.device != self.device:
            moved = tensor.to(self.device)
            self.dist.all_reduce(moved, op=self.dist.ReduceOp.SUM)
            tensor.copy_(moved)
        else:
            self.dist.all_reduce(tensor, op=self.dist.ReduceOp.SUM)
        self.wait_seconds += time.perf_counter() - start

    def close(self) -> None:
        self.shm = None
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
        def total(b: torch.Tensor) -> None:
            nbytes = b.numel() * b.element_size()
            if (self.shm is not None and b.device.type == "cpu" and b.is_floating_point()
                    and nbytes >= SHM_MIN_BYTES and self._room_for(nbytes)):
                self.shm.sum_(b)
            else:
                self.dist.all_reduce(b, op=self.dist.ReduceOp.SUM)

        self._flat(tensors, total)

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
