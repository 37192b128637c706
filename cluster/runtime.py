"""Joining a Ray cluster, or starting a quiet local one sized for this machine."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import socket
from collections.abc import Iterator
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from pipeline.config import ClusterConfig, ConfigError, Device, Schedule, check_ray_address

log = logging.getLogger(__name__)
RESERVE_TIMEOUT_S = 120


@dataclasses.dataclass(frozen=True)
class Resources:
    cpus_per_worker: float
    gpus_per_worker: int
    threads: int


@contextlib.contextmanager
def ray_session(cluster: ClusterConfig) -> Iterator[None]:
    """Connect to `cluster.address` or RAY_ADDRESS; with neither, start a local Ray."""
    started = False
    if not ray.is_initialized():
        address = cluster.address or os.environ.get("RAY_ADDRESS")
        if address:
            check_cluster_address(cluster)
            log.info("connecting to Ray at %s", address)
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            # "local": always a fresh instance, never a stale `ray start` found on this node.
            # The workers run at this process's priority: Ray's default starts them at nice
            # 15, where anything else on the machine takes most of the cores from the stages
            # (measured: a P1 block's CVXQ error pass 8x slower in an actor than in the driver
            # beside a running P1 benchmark row); `nice relayquant ...` lowers the whole run
            ray.init(address="local", num_cpus=os.cpu_count() or 1,
                     include_dashboard=cluster.dashboard,
                     logging_level=logging.WARNING, log_to_driver=True,
                     configure_logging=False, _system_config={"worker_niceness": 0})
        started = True
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def check_cluster_address(cluster: ClusterConfig) -> None:
    """`cluster.address`, or RAY_ADDRESS without it: well formed and answering (when Ray is not
    already initialized in this process)."""
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    if not address or ray.is_initialized():
        return
    field = "cluster.address" if cluster.address else "RAY_ADDRESS"
    check_ray_address(address, field)
    check_reachable(address, field)


def check_reachable(address: str, field: str, timeout: float = 5.0) -> None:
    """A head that does not answer is refused at once, not after Ray's minute of retries."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"{field}: nothing answers at {address} ({e.strerror or e}); start "
                          "the head with `ray start --head` there, or fix the address") from e


def plan_resources(cluster: ClusterConfig) -> Resources:
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    use_gpu = cluster.device is Device.CUDA or (cluster.device is Device.AUTO and gpus > 0)
    if use_gpu and gpus < cluster.workers:
        raise ConfigError(f"cluster.workers: {cluster.workers} GPU stages requested but the cluster "
                         f"has {gpus} GPUs; use at most {gpus} workers or cluster.device: cpu")
    cpus = float(total.get("CPU", 1))
    per_worker = max(cpus / cluster.workers, 0.01) if not use_gpu else max(
        min(cpus / cluster.workers, 8.0), 1.0)
    per_worker = math.floor(per_worker * 100) / 100  # the bundles must fit in the total
    if cluster.threads is not None:
        threads = cluster.threads
        warn_oversubscribed(threads, per_worker, not use_gpu and
                            cluster.resolved_schedule is Schedule.DATA_PARALLEL)
    elif use_gpu or cluster.resolved_schedule is Schedule.DATA_PARALLEL:
        threads = max(1, int(per_worker))  # every worker computes at once: its own cores
    else:
        threads = 0  # one stage computes at a time: it takes every core it can see
    return Resources(per_worker, 1 if use_gpu else 0, threads)


def warn_oversubscribed(threads: int, cpus_per_worker: float, together: bool) -> None:
    """cluster.threads above the cores of the largest node (a remote cluster's nodes need not
    be this machine) oversubscribes every stage's node: the torch threads then take turns on
    the cores and the run slows down; so does more than a stage's share of the CPUs when the
    stages compute `together` (data-parallel CPU stages). A warning, since it still runs."""
    cores = max((float(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes()
                 if n.get("Alive", True)), default=0.0)
    if cores and threads > cores:
        log.warning("cluster.threads: %d torch threads per stage, but the largest node of the "
                    "cluster has %d CPUs; the stages will be oversubscribed and slower. Set at "
                    "most %d, or null (automatic)", threads, int(cores), int(cores))
    elif together and cpus_per_worker >= 1 and threads > math.ceil(cpus_per_worker):
        log.warning("cluster.threads: %d torch threads per stage, but each stage has %.2g of the "
                    "cluster's CPUs; stages computing at once will share cores. Null (automatic) "
                    "gives each its share", threads, cpus_per_worker)


def reserve(resources: Resources, workers: int) -> PlacementGroup:
    bundle: dict[str, float] = {"CPU": resources.cpus_per_worker}
    if resources.gpus_per_worker:
        bundle["GPU"] = resources.gpus_per_worker
    group = placement_group([dict(bundle) for _ in range(workers)], strategy="PACK")
    try:
        ray.get(group.ready(), timeout=RESERVE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise RuntimeError(
            f"could not reserve {workers} stage(s) of {bundle} within {RESERVE_TIMEOUT_S}s; the "
            f"cluster has {ray.available_resources()} free; lower cluster.workers") from None
    return group


def release(actors: list[Any], group: PlacementGroup) -> None:
    """Stop the stage actors and give their reserved resources back."""
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except ValueError:
            pass  # already gone
    remove_placement_group(group)
