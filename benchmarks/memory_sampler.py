"""Sampling the machine's memory while a benchmark runs, per process role (driver, stage
actors, Ray's own processes), for the benchmarks that report peaks against the machine's RAM
(`larger_than_ram.py`)."""
from __future__ import annotations

import threading
import time
from typing import Any

import psutil


def _role(p: psutil.Process, driver: int) -> str:
    """What the process is, from its name and its current command line (Ray rewrites a
    worker's to `ray::StageActor.method` once it hosts the actor; its start-up arguments
    mention the raylet, so the raylet is known by its executable's name)."""
    if p.pid == driver:
        return "driver"
    name = p.name()
    if name in ("raylet", "gcs_server"):
        return "raylet (object store)" if name == "raylet" else "gcs"
    try:
        cmd = " ".join(p.cmdline())
    except (psutil.Error, OSError):
        return name
    for key, role in (("StageActor", "stage actor"), ("ray::IDLE", "idle ray worker"),
                      ("dashboard", "dashboard"), ("log_monitor", "ray monitor"),
                      ("monitor.py", "ray monitor")):
        if key in cmd:
            return role
    return name


class MemorySampler:
    """Every process under the driver (resident set), their sum, and the machine's used memory
    above what it was at the start (page cache excluded), sampled every `period` seconds; peaks
    over the whole run or over a time window (a phase)."""

    def __init__(self, period: float = 0.5):
        self.period, self.stop_event = period, threading.Event()
        self.driver = psutil.Process()
        self.idle_used = self._used()
        self.samples: list[tuple[float, int, int, dict[str, int]]] = []
        self.thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _used() -> int:
        vm = psutil.virtual_memory()
        return vm.total - vm.available

    def _loop(self) -> None:
        while not self.stop_event.wait(self.period):
            self.sample()

    def _role(self, p: psutil.Process) -> str:
        return _role(p, self.driver.pid)  # a pooled worker may become an actor: ask each time

    def sample(self) -> None:
        total, by_role = 0, {}
        for p in [self.driver, *self.driver.children(recursive=True)]:
            try:
                rss = p.memory_info().rss
                role = self._role(p)
            except psutil.Error:
                continue
            total += rss
            key = f"{role} {p.pid}" if role == "stage actor" else role
            by_role[key] = by_role.get(key, 0) + rss
        self.samples.append((time.perf_counter(), total, self._used() - self.idle_used,
                             by_role))

    def __enter__(self) -> MemorySampler:  # noqa: PYI034
        self.start = time.perf_counter()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join()
        self.sample()

    def summary(self, since: float = 0.0, until: float = float("inf")) -> dict[str, Any]:
        """Peaks over the samples taken `since`..`until` seconds after the start."""
        chosen = [s for s in self.samples if since <= s[0] - self.start <= until]
        by_role: dict[str, int] = {}
        for _, _, _, roles in chosen:
            for role, rss in roles.items():
                by_role[role] = max(by_role.get(role, 0), rss)
        stages = sorted(v for k, v in by_role.items() if k.startswith("stage actor"))
        return {"samples": len(chosen),
                "peak_total_rss_bytes": max((s[1] for s in chosen), default=0),
                "peak_used_above_idle_bytes": max((s[2] for s in chosen), default=0),
                "peak_rss_by_role_bytes": by_role, "stage_peaks_bytes": stages}


# --- the runs ---------------------------------------------------------------------------------
