"""The stage actors of one run: started on their reserved resources (joined into one process
group under the data-parallel schedule), the blocks each owns, and waiting on their tasks."""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import ray

from cluster import progress as view
from cluster import runtime
from cluster.stage import StageActor
from pipeline.config import (
    ClusterConfig,
    Schedule,
)
from pipeline.plan import Plan

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Stages:
    plan: Plan
    actors: list[Any]
    chunk_size: int
    data_parallel: bool = False
    places: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # torch threads per stage in pipelined passes, where every stage computes at once (None:
    # the stages' own): CPU stages that otherwise take every core they see, since one stage
    # computes at a time when quantizing, would oversubscribe the cores there
    pipeline_threads: int | None = None

    def owner(self, index: int) -> Any:
        for actor, (start, end) in zip(self.actors, self.plan.stages, strict=True):
            if start <= index < end:
                return actor
        raise IndexError(index)


def start_stages(plan: Plan, cluster: ClusterConfig) -> tuple[Stages, Any]:
    resources = runtime.plan_resources(cluster)
    group = runtime.reserve(resources, len(plan.stages))
    strategy = ray.util.scheduling_strategies.PlacementGroupSchedulingStrategy
    board = view.start_board()
    device = "cuda" if resources.gpus_per_worker else "cpu"
    actors = [
        StageActor.options(  # type: ignore[attr-defined]
            num_cpus=resources.cpus_per_worker, num_gpus=resources.gpus_per_worker,
            scheduling_strategy=strategy(placement_group=group, placement_group_bundle_index=i),
            name=None,
        ).remote(i, stage, cluster.compute_dtype, resources.threads, device, board)
        for i, stage in enumerate(plan.stages)
    ]
    log.info("placed %d blocks on %d stage(s): %s (%s per stage, device %s)", plan.num_blocks,
             len(actors), ", ".join(f"[{a}, {b})" for a, b in plan.stages),
             f"{resources.cpus_per_worker} CPU", device)
    stages = Stages(plan, actors, cluster.chunk_size,
                    cluster.resolved_schedule is Schedule.DATA_PARALLEL,
                    pipeline_threads=pipelined_threads(resources, device, len(actors)))
    try:
        stages.places = [{"stage": i, "blocks": list(blocks), **place} for i, (blocks, place) in
                         enumerate(zip(plan.stages, gather([a.place.remote() for a in actors]),
                                       strict=True))]
    except BaseException:
        runtime.release(actors, group)
        raise
    if stages.data_parallel:
        try:
            address = (ray.get(actors[0].rendezvous_address.remote()) if len(actors) > 1
                       else None)
            # RELAYQUANT_SHARED_MEMORY=0 (the driver's): no shared memory between the workers
            # even on one node; they exchange through gloo, as on several nodes
            shared = os.environ.get("RELAYQUANT_SHARED_MEMORY") != "0"
            gather([a.join.remote(address, r, len(actors), cluster.activation_memory_bytes,
                                  shared)
                    for r, a in enumerate(actors)])
        except BaseException:
            runtime.release(actors, group)
            raise
        log.info("data_parallel: %d workers joined one process group (%s)", len(actors),
                 "nccl" if device == "cuda" else "gloo")
    return stages, group


def pipelined_threads(resources: runtime.Resources, device: str, stages: int) -> int | None:
    """Torch threads per stage while all stages compute at once: CPU stages with automatic
    threads (each sees every core) get their share of the CPUs; threads set in the recipe,
    GPU stages and a single stage keep their own (None)."""
    if device != "cpu" or resources.threads != 0 or stages < 2:
        return None
    return max(1, int(resources.cpus_per_worker))


# what a dead stage actor's task raises (killed, out of memory, its node gone): the run restarts
# the stages and resumes (coordinator.quantize_with_retries)
STAGE_FAILURES = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError,
                  ray.exceptions.WorkerCrashedError)
# how long a task's error waits for the other tasks to show a dead actor (see gather)
DEATH_GRACE_S = 15.0


def gather(refs: list[Any], death_grace_s: float = DEATH_GRACE_S) -> list[Any]:
    """Every result, but fail as soon as any one task fails (a dead data-parallel worker
    leaves the others waiting in a collective: never wait for them). When a worker dies, its
    peers' collectives fail too (gloo: the connection closed), and their error can arrive
    before Ray reports the death: a task's error is raised only once the others have had
    `death_grace_s` to show a dead actor, and the death, the cause, is raised instead."""
    pending = list(refs)
    live = view.current()
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=None if live is None else 1.0)
        if live is not None:
            live.poll()
        if ready:
            try:
                ray.get(ready)
            except ray.exceptions.RayTaskError as e:
                death = first_death(pending, death_grace_s)
                if death is not None:
                    raise death from e
                raise
    return ray.get(refs)


def first_death(refs: list[Any], timeout_s: float) -> BaseException | None:
    """The first of `refs` to fail with a dead actor within `timeout_s`, or None."""
    pending, deadline = list(refs), time.monotonic() + timeout_s
    while pending and (left := deadline - time.monotonic()) > 0:
        ready, pending = ray.wait(pending, num_returns=1, timeout=left)
        for ref in ready:
            try:
                ray.get(ref)
            except STAGE_FAILURES as e:
                return e
            except ray.exceptions.RayTaskError:
                continue
    return None


def report_progress(phase: str, done: int, total: int, start: float, unit: str = "blocks"
                    ) -> None:
    if done == total or done % max(1, total // 10) == 0:
        elapsed = time.perf_counter() - start
        log.info("%s: %d/%d %s, %.1fs elapsed, ~%.1fs left", phase, done, total, unit, elapsed,
                 elapsed / done * (total - done))


def absolute(path: str) -> str:
    """Local paths made absolute, so stage actors in other working directories agree."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def job_working_dir_warning(output: str, cwd: str) -> str | None:
    """What to say when a relative local output would land in a Ray job's unpacked
    `--working-dir` (Ray's `.../runtime_resources/working_dir_files/_ray_pkg_*`: a cached copy
    that Ray may delete, and not the folder the other nodes have), else None."""
    if "://" in output or os.path.isabs(os.path.expanduser(output)):
        return None
    if f"{os.sep}working_dir_files{os.sep}" not in cwd + os.sep:
        return None
    return (f"output {output!r} is a relative path: in this Ray job it resolves inside the "
            f"job's unpacked working dir ({cwd}), which Ray may delete and other nodes do "
            f"not share; give an absolute path every node can write, or an fsspec URL "
            f"(--set output=/shared/...)")
