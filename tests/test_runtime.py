"""How stages are sized on a cluster (`cluster.runtime.plan_resources`), against a cluster
described by stand-ins for Ray's `cluster_resources` and `nodes` (no Ray started)."""
import logging

import pytest

from cluster import runtime
from pipeline.config import ClusterConfig, Device, Schedule


@pytest.fixture
def cluster_of(monkeypatch):
    def describe(*node_cpus):
        monkeypatch.setattr(runtime.ray, "cluster_resources",
                            lambda: {"CPU": float(sum(node_cpus))})
        monkeypatch.setattr(runtime.ray, "nodes", lambda: [
            {"Alive": True, "Resources": {"CPU": float(c)}} for c in node_cpus])
    return describe


def test_threads_above_the_largest_node_warn(cluster_of, caplog):
    cluster_of(16, 16)
    with caplog.at_level(logging.WARNING, logger="cluster.runtime"):
        resources = runtime.plan_resources(
            ClusterConfig(workers=2, threads=64, device=Device.CPU))
    assert resources.threads == 64  # still what was asked: it runs, slower
    assert "cluster.threads: 64 torch threads per stage, but the largest node of the cluster " \
           "has 16 CPUs" in caplog.text


def test_threads_above_a_data_parallel_share_warn_but_not_sequential(cluster_of, caplog):
    cluster_of(8)
    with caplog.at_level(logging.WARNING, logger="cluster.runtime"):
        runtime.plan_resources(ClusterConfig(workers=4, threads=4, device=Device.CPU,
                                             schedule=Schedule.DATA_PARALLEL))
    assert "each stage has 2 of the cluster's CPUs" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cluster.runtime"):
        # one stage computes at a time in the sequential schedule: all cores are its to use
        runtime.plan_resources(ClusterConfig(workers=4, threads=8, device=Device.CPU,
                                             schedule=Schedule.SEQUENTIAL))
        runtime.plan_resources(ClusterConfig(workers=4, threads=2, device=Device.CPU,
                                             schedule=Schedule.DATA_PARALLEL))
        runtime.plan_resources(ClusterConfig(workers=4, device=Device.CPU))
    assert "cluster.threads" not in caplog.text


def test_a_local_rays_workers_run_at_the_drivers_priority():
    """Ray starts its workers at nice 15 by default, where any other busy process takes most
    of the cores from the stages: the local Ray a run starts keeps them at the run's own."""
    import os

    import ray

    if os.nice(0) + 15 > 19:
        pytest.skip("run at nice 5 or more: Ray's default (15 more, at most 19) is the same")
    if ray.is_initialized():  # another module's Ray, left behind
        ray.shutdown()

    @ray.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    with runtime.ray_session(ClusterConfig(workers=1, device=Device.CPU)):
        assert ray.get(niceness.remote()) == os.nice(0)
    assert not ray.is_initialized()
