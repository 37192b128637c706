"""The shared-memory sum of workers on one node: the same bits on every worker, the fixed-order
sum (worker 0 + 1 + 2), growing its buffers when a larger sum comes, nothing left in /dev/shm;
small sums, integers and a full /dev/shm go through gloo."""
import glob
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.parallel import collective
from pipeline.parallel import exchange as shard_exchange


def _rank(rank: int, world: int, address: str, out: str) -> None:
    torch.set_num_threads(1)
    group = collective.TorchCollective(address, rank, world, "gloo")
    assert group.shm is not None  # one node, room in /dev/shm
    results = {}
    for name, n, dtype in (("small", 10, torch.float32), ("f32", 300_000, torch.float32),
                           ("f64", 700_000, torch.float64)):
        parts = [torch.randn(n, dtype=dtype, generator=torch.Generator().manual_seed(r))
                 for r in range(world)]
        mine = parts[rank].clone()
        waited = group.wait_seconds
        group.sum_([mine[: n // 2], mine[n // 2:]])  # two tensors, packed into one buffer
        assert group.wait_seconds > waited
        expected = parts[0] + parts[1]
        for p in parts[2:]:
            expected = expected + p
        # gloo's ring (the small sum) adds three workers in its own order: close, not equal
        same = (torch.equal(mine, expected) if name != "small" or world == 2
                else torch.allclose(mine, expected))
        results[name] = (same, mine)
    counts = torch.tensor([rank + 1] * 70_000, dtype=torch.int64)  # not float: gloo
    group.sum_([counts])
    results["ints"] = (bool((counts == sum(range(1, world + 1))).all()), None)
    torch.save(results, f"{out}.{rank}")
    group.close()


def _run_ranks(fn, world: int, tmp_path) -> list:
    """Run `fn(rank, world, address, out)` on `world` processes; their saved results, and
    /dev/shm as it was before."""
    before = set(glob.glob(os.path.join(collective.SHM_FOLDER, "relayquant-sum-*")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    out = str(tmp_path / "r")
    mp.spawn(fn, args=(world, address, out), nprocs=world, join=True)
    assert set(glob.glob(os.path.join(collective.SHM_FOLDER, "relayquant-sum-*"))) == before
    return [torch.load(f"{out}.{r}") for r in range(world)]


@pytest.mark.unit
@pytest.mark.parametrize("world", [2, 3])
def test_shared_memory_sum_is_the_fixed_order_sum_on_every_worker(tmp_path, world):
    results = _run_ranks(_rank, world, tmp_path)
    for name in ("small", "f32", "f64", "ints"):
        assert all(r[name][0] for r in results), name
    for name in ("f32", "f64"):  # bit for bit the same on every worker
        assert all(torch.equal(results[0][name][1], r[name][1]) for r in results)


@pytest.mark.unit
def test_shared_memory_needs_room(monkeypatch):
    class Full:
        f_bavail, f_frsize = 10, 4096

    monkeypatch.setattr(collective.os, "statvfs", lambda _: Full())
    assert not collective.shared_memory_possible(2, 1 << 20)
    monkeypatch.setattr(collective.os, "statvfs", lambda _: (_ for _ in ()).throw(OSError()))
    assert not collective.shared_memory_possible(2, 1 << 20)


def _shards_rank(rank: int, world: int, address: str, out: str) -> None:
    torch.set_num_threads(1)
    # workers that share no memory (other nodes) exchange through torch.distributed; the
    # out file's name says which kind this run is
    shared = not out.endswith(("-distributed/r", "-unordered/r"))
    group = collective.TorchCollective(address, rank, world, "gloo", shared_memory=shared)
    shapes = {"a": torch.Size([300, 200]), "b": torch.Size([7]), "c": torch.Size([64, 1000])}
    owners = {"a": 0, "b": 1 % world, "c": (world - 1)}
    exchange = group.shards(shapes, owners, 8)
    assert isinstance(exchange, shard_exchange.SharedMemoryShards if shared
                      else shard_exchange.DistributedShards)
    if not shared:
        exchange.chunk = 5000  # several gathers per owner
        # GPUs' path (NCCL's reduce, no fixed order), here through gloo's reduce
        exchange.ordered = not out.endswith("-unordered/r")
    got = {}
    for step in range(2):  # the buffers are reused step after step
        for dtype in (torch.float32, torch.float64):
            # a step: gather (its barrier also keeps the last reduce's reads apart from this
            # step's writes), then reduce
            values = {k: torch.full(s, float(10 * step + ord(k)), dtype=torch.float32)
                      for k, s in shapes.items()}
            seen = exchange.gather({k: v for k, v in values.items() if owners[k] == rank})
            assert all(torch.equal(seen[k], values[k]) for k in shapes)
            grads = {k: torch.randn(s, dtype=dtype,
                                    generator=torch.Generator().manual_seed(100 * step + rank))
                     for k, s in shapes.items() if k != "b" or rank != 0}  # one None
            extra = torch.tensor([rank + 1.0, 0.5], dtype=torch.float64)
            sums = exchange.reduce(grads, dtype, extra)
            assert sorted(sums) == sorted(k for k, o in owners.items() if o == rank)
            got[(step, str(dtype))] = (sums, extra.tolist())
    torch.save(got, f"{out}.{rank}")
    group.close()


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["shared", "distributed", "unordered"])
@pytest.mark.parametrize("world", [2, 3])
def test_quantizer_shards_gather_and_reduce_to_the_owners(tmp_path, world, kind):
    """Each worker publishes its own tensors and reads everyone's; each owner gets the sum of
    its tensors' gradients over the workers in worker order (a missing one counts as zero),
    in float32 and float64, the same bits through shared memory (one node) and through
    torch.distributed (workers on several nodes); GPUs' unordered reduce (run here through
    gloo) the same sums, exactly with two workers; the extras are summed everywhere;
    /dev/shm is left clean."""
    folder = tmp_path / f"run-{kind}"
    folder.mkdir()
    results = _run_ranks(_shards_rank, world, folder)
    shapes = {"a": (300, 200), "b": (7,), "c": (64, 1000)}
    for step, dtype_name in results[0]:
        dtype = torch.float32 if dtype_name.endswith("float32") else torch.float64
        for rank, result in enumerate(results):
            sums, extra = result[(step, dtype_name)]
            assert extra == [sum(range(1, world + 1)), 0.5 * world]
            for key, total in sums.items():
                parts = [torch.zeros(shapes[key], dtype=dtype) if key == "b" and r == 0 else
                         torch.randn(shapes[key], dtype=dtype,
                                     generator=torch.Generator().manual_seed(100 * step + r))
                         for r in range(world)]
                expected = parts[0] + parts[1]
                for p in parts[2:]:
                    expected = expected + p
                if kind == "unordered" and world > 2:  # the reduce's own order
                    assert torch.allclose(total, expected, rtol=1e-6, atol=1e-6), (rank, key)
                else:
                    assert torch.equal(total, expected), (rank, key)
