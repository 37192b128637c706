"""A training step over the streams: the minibatches (`Batches`), each step's gradient summed
window by window and over the data-parallel workers (`StepGradients`), and the quantizer split
among those workers (`QuantizerShards`)."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch

from pipeline.parallel.collective import Collective, TorchCollective
from pipeline.parallel.exchange import DistributedShards, SharedMemoryShards
from pipeline.streams import ChunkStore


@dataclasses.dataclass
class Batches:
    """Minibatches over streams stored as chunks, in order: `sizes[k]` windows for step k (0:
    an empty step, a data-parallel worker with no window in that global batch). Each chunk is
    read once per pass (the current one is cached)."""

    streams: list[list[Any]]
    store: ChunkStore
    sizes: list[int]
    device: str

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        sizes = iter(self.sizes)
        want = next(sizes, None)
        while want == 0:
            yield []
            want = next(sizes, None)
        pending: list[list[torch.Tensor]] = [[] for _ in self.streams]
        count = 0
        for handles in zip(*self.streams, strict=True):
            if want is None:
                return
            chunks = [self.store.get(h) for h in handles]
            for i in range(chunks[0].shape[0]):
                for part, c in zip(pending, chunks, strict=True):
                    part.append(c[i : i + 1])
                count += 1
                if count == want:
                    yield [torch.cat(p).to(self.device) for p in pending]
                    pending, count = [[] for _ in self.streams], 0
                    want = next(sizes, None)
                    while want == 0:
                        yield []
                        want = next(sizes, None)
                    if want is None:
                        return


@dataclasses.dataclass
class QuantizerShards:
    """A step's quantizer split among the data-parallel workers. Each of the block's tensors
    in the learnable parameters' graph (`owners`: key -> worker, spread by size) is computed
    by its owner alone, which publishes it (`exchange`: shared memory within a node, else
    torch.distributed) and, once the window gradients are summed, sends the sum back through
    its part of the quantizer.
    The parameters only one tensor depends on (`exclusive`: a linear's clipping factors,
    rounding offsets, SDE factors) are therefore trained by its owner only and sent to the
    other workers after training (`share_exclusive_`); the others (`shared`, e.g. LET's
    scales) get their gradient from every owner's part, summed over the workers. Without
    the split every worker computes the whole quantizer and goes back through all of it."""

    exchange: SharedMemoryShards | DistributedShards
    group: TorchCollective
    exclusive: dict[str, list[torch.nn.Parameter]]

    @property
    def owners(self) -> dict[str, int]:
        return self.exchange.owners

    def mine(self) -> list[str]:
        return [k for k, owner in self.owners.items() if owner == self.group.rank]

    def gather_contributions(self, keys: list[str], shared: list[torch.nn.Parameter],
                             mine: dict[str, list[torch.Tensor | None]]
                             ) -> dict[str, list[torch.Tensor | None]]:
        """Every key's gradient contributions to the shared parameters (`mine`: this worker's
        keys'), each computed by the key's owner. One sum through gloo of a table with one
        row per key, filled by its owner only (zeros elsewhere), so every entry arrives
        exactly (any order: one non-zero addend)."""
        # a row: a flag per parameter (1: a contribution), then the contributions
        spans, start = [], len(shared)
        for p in shared:
            spans.append((start, start + p.numel()))
            start += p.numel()
        table = torch.zeros(len(keys), start, dtype=torch.float64)
        for row, key in enumerate(keys):
            for i, c in enumerate(mine.get(key, [])):
                if c is not None:
                    table[row, i] = 1.0
                    table[row, spans[i][0]:spans[i][1]] = c.reshape(-1)
        self.group.small_sum_(table)
        return {key: [table[row, a:b].to(p.dtype).view_as(p) if table[row, i] > 0 else None
                      for i, (p, (a, b)) in enumerate(zip(shared, spans, strict=True))]
                for row, key in enumerate(keys)}

    def share_exclusive_(self) -> None:
        """Every worker's exclusive parameters to every other worker (after training)."""
        for rank in range(self.group.world):
            params = [p for key, owner in self.owners.items() if owner == rank
                      for p in self.exclusive.get(key, [])]
            if params:
                with torch.no_grad():
                    self.group.broadcast_([p.data for p in params], rank)


def quantizer_shards(tensors: dict[str, torch.Tensor],
                     exclusive: dict[str, list[torch.nn.Parameter]], group: Collective,
                     assign: Callable[[list[str], list[float], int], list[int]],
                     batch: int) -> QuantizerShards | None:
    """The split quantizer for a block whose full step computes `tensors` (global batches of
    up to `batch` windows), or None where it does not apply: one worker, or tensors not in
    float32. Workers of one node exchange through shared memory, others (several nodes,
    GPUs) through torch.distributed (`TorchCollective.shards`)."""
    if group.world == 1 or not isinstance(group, TorchCollective):
        return None
    keys = [k for k, v in tensors.items() if v.requires_grad]
    if not keys or any(tensors[k].dtype != torch.float32 for k in keys):
        return None
    owners = dict(zip(keys, assign(keys, [float(tensors[k].numel()) for k in keys],
                                   group.world), strict=True))
    # the step's gradient sums: float32 up to two windows, float64 above (StepGradients)
    exchange = group.shards({k: tensors[k].shape for k in keys}, owners,
                            4 if batch <= 2 else 8)
    return QuantizerShards(exchange, group, exclusive)


class StepGradients:
    """One optimizer step's gradient of the global batch's loss. The block's tensors are
    computed once per step from the learnable parameters (the quantizer's graph); each window's
    loss (its MSE over the batch size) is differentiated on its own with respect to those
    tensors only; the window gradients are summed, then summed over the data-parallel workers,
    and the sum goes back through the quantizer once. Every window's gradient is the same
    whichever worker computes it, and the sums do not depend on their order at float32
    precision, so one worker and N workers take the same steps (not just close ones): a batch
    of at most two windows is one float32 addition (correctly rounded, whatever the order), a
    larger one is summed in float64 and rounded to float32 once. Every worker then runs the
    same backward through the quantizer on the same sum."""

    def __init__(self, group: Collective, shards: QuantizerShards | None = None,
                 shared: list[torch.nn.Parameter] | None = None):
        self.group, self.shards = group, shards
        self.shared = list(shared or [])
        self.penalty = 0.0

    def start(self, windows: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A step over a global batch of `windows` windows, from the block's `tensors` (some
        in the learnable parameters' graph); returns the tensors the windows' forward passes
        use: the same values, cut from that graph."""
        self.dtype = torch.float32 if windows <= 2 else torch.float64
        self.penalty = 0.0
        if self.shards is not None:
            # this worker's tensors in the graph; every tensor read from its owner
            mine = self.shards.mine()
            self.tensors = {k: tensors[k] for k in mine}
            values = self.shards.exchange.gather({k: tensors[k].detach() for k in mine})
            self.leaves = {k: v.detach().requires_grad_(True) for k, v in values.items()}
        else:
            self.tensors = {k: v for k, v in tensors.items() if v.requires_grad}
            self.leaves = {k: v.detach().requires_grad_(True) for k, v in self.tensors.items()}
        self.sums: dict[str, torch.Tensor | None] = dict.fromkeys(self.leaves)
        self.loss = torch.zeros(1, dtype=torch.float64)
        return {**tensors, **self.leaves}

    def add(self, loss: torch.Tensor, scaled: torch.Tensor) -> None:
        """`loss` of one window; `scaled` is what is differentiated (loss-scaled under AMP)."""
        grads = torch.autograd.grad(scaled, list(self.leaves.values()), allow_unused=True)
        for key, g in zip(self.leaves, grads, strict=True):
            if g is not None:
                total = self.sums[key]
                self.sums[key] = g.to(self.dtype) if total is None else total.add_(g)
        self.loss += loss.detach().double().cpu()

    def _back(self, keys: list[str], used: list[str],
              sums: dict[str, torch.Tensor]) -> None:
        """The summed gradients of the `used` tensors (of this worker's) back through the
        quantizer. With shared parameters (several tensors depend on them: LET's scales) it
        goes tensor by tensor, and each shared parameter's gradient is the sum of the
        tensors' contributions in the order of `keys`: the same additions whichever worker
        computed which tensor, so a split quantizer trains exactly as one worker does."""
        grads = {k: sums[k].to(self.tensors[k].dtype) for k in used}
        if not self.shared:
            if used:
                torch.autograd.backward([self.tensors[k] for k in used],
                                        [grads[k] for k in used])
            return
        kept = [p.grad for p in self.shared]  # (e.g. a penalty's): added last
        for p in self.shared:
            p.grad = None
        mine: dict[str, list[torch.Tensor | None]] = {}
        for i, k in enumerate(used):
            self.tensors[k].backward(grads[k], retain_graph=i < len(used) - 1)
            mine[k] = [p.grad for p in self.shared]
            for p in self.shared:
                p.grad = None
        every = (self.shards.gather_contributions(keys, self.shared, mine)
                 if self.shards is not None else mine)
        for i, p in enumerate(self.shared):
            total = None
            for k in keys:
                c = every.get(k, [None] * len(self.shared))[i]
                if c is not None:
                    total = c.clone() if total is None else total.add_(c)
            own = kept[i]
            if own is not None:
                total = own if total is None else total.add_(own)
            p.grad = total

    def add_penalty(self, penalty: torch.Tensor, scaled: torch.Tensor) -> None:
        """A term of the loss outside the windows (SDE's penalty; `scaled` is what is
        differentiated): with a split quantizer each worker passes its own tensors' part,
        summed over the workers with the loss; otherwise every worker the whole term."""
        scaled.backward()
        self.penalty += float(penalty.item())

    def finish(self) -> float:
        """Sum over the workers; back through the quantizer, setting the learnable
        parameters' gradients; return the batch's loss."""
        keys = list(self.sums)
        seen = torch.tensor([self.sums[k] is not None for k in keys], dtype=torch.float64)
        if self.shards is not None:
            extra = torch.cat([seen, self.loss + self.penalty])
            sums = self.shards.exchange.reduce(self.sums, self.dtype, extra)
            flags = dict(zip(keys, extra[:-1].tolist(), strict=True))
            used = [k for k in self.tensors if flags[k] > 0]
            self._back(keys, used, sums)
            self.tensors, self.leaves, self.sums = {}, {}, {}
            return float(extra[-1].item())
        if self.group.world > 1:
            summed: list[torch.Tensor] = []
            for k in keys:
                part = self.sums[k]
                summed.append(part if part is not None else
                              torch.zeros_like(self.leaves[k], dtype=self.dtype))
            device = summed[0].device if summed else torch.device("cpu")
            extra = torch.cat([seen, self.loss]).to(device)
            self.group.sum_([*summed, extra])
            self.sums = dict(zip(keys, summed, strict=True))
            seen, self.loss = extra[:-1].cpu(), extra[-1:].cpu()
        used = [k for k, flag in zip(keys, seen.tolist(), strict=True) if flag]
        self._back(keys, used, self.sums)  # type: ignore[arg-type]
        self.tensors, self.leaves, self.sums = {}, {}, {}
        return float(self.loss.item()) + self.penalty
