"""One progress view for a whole run, on the driver: phase, block i/N, per-block loss, ETA,
memory, which workers are busy. The stage actors do not print their own lines; they post
events (`pipeline.events`) to a board actor the driver drains while it waits on them, so the
view is one ordered stream whatever the number of workers.

Modes: `live` (stderr is a terminal: a status line rewritten in place, a permanent line per
finished block), `plain` (one line per event, for logs and CI), `quiet` (warnings, errors and
the final summary only). `--log-json FILE` writes every event as one JSON object per line.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

import ray

from pipeline.config import ConfigError

log = logging.getLogger("relayquant")

MODES = ("auto", "live", "plain", "quiet")


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Where the stage actors post events and the driver takes them, oldest first."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def post(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def take(self) -> list[dict[str, Any]]:
        out, self.events = self.events, []
        return out


class Progress:
    def __init__(self, mode: str = "auto", json_path: str | None = None,
                 stream: IO[str] | None = None):
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r}; choose one of {', '.join(MODES)}")
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "live" if self.stream.isatty() else "plain"
        self.mode = mode
        try:
            self.json = open(json_path, "a", encoding="utf-8") if json_path else None  # noqa: SIM115
        except OSError as e:
            raise ConfigError(f"--log-json: cannot write {json_path} ({e.strerror}); give a file "
                              "in a folder that exists and is writable") from e
        self.board: Any = None
        self.started = time.time()
        self.phase = ""
        self.status: dict[str, Any] = {}
        self.busy: dict[int, float] = {}  # worker -> when it last reported
        self.seen: set[tuple[Any, ...]] = set()
        self._line = False

    # --- events ------------------------------------------------------------------------------

    def event(self, kind: str, message: str = "", **fields: Any) -> None:
        record = {"time": time.time(), "elapsed": time.time() - self.started, "kind": kind,
                  "phase": self.phase, **fields}
        if message:
            record["message"] = message
        if self.json is not None:
            self.json.write(json.dumps(record, default=str) + "\n")
            self.json.flush()
        if kind == "phase":
            self.phase = fields["name"]
        if "worker" in fields and fields["worker"] is not None:
            self.busy[int(fields["worker"])] = time.time()
        self.status.update({k: v for k, v in fields.items()
                            if k in ("block", "blocks", "epoch", "epochs", "loss", "eta",
                                     "rss_bytes")})
        if self.mode == "quiet":
            if kind == "log" and fields.get("level", 0) >= logging.WARNING:
                self._print(message)
            return
        if self.mode == "plain" and message:
            self._print(message)
        elif self.mode == "live":
            if message and kind != "epoch":
                self._print(message)
            self._status_line()

    def epoch(self, event: dict[str, Any]) -> None:
        """An actor's epoch event: shown once per (block, epoch) whatever the worker count."""
        key = ("epoch", event.get("block"), event.get("epoch"))
        worker = event.get("worker")
        if key in self.seen:
            if worker is not None:
                self.busy[int(worker)] = time.time()
            return
        self.seen.add(key)
        fields = {k: v for k, v in event.items() if k not in ("kind", "message")}
        self.event("epoch", event.get("message", ""), **fields)

    def poll(self) -> None:
        """Take what the actors posted (cheap; called while the driver waits on them)."""
        if self.board is None:
            return
        for e in ray.get(self.board.take.remote()):
            if e.get("kind") == "epoch":
                self.epoch(e)
            else:
                fields = {k: v for k, v in e.items() if k not in ("kind", "message")}
                self.event(e.get("kind", "note"), e.get("message", ""), **fields)

    # --- output ------------------------------------------------------------------------------

    def _print(self, text: str) -> None:
        if self._line:
            self.stream.write("\r\x1b[2K")
            self._line = False
        self.stream.write(f"relayquant: {text}\n")
        self.stream.flush()

    def _status_line(self) -> None:
        s = self.status
        parts = [self.phase or "starting"]
        if "block" in s and "blocks" in s:
            parts.append(f"block {int(s['block']) + 1}/{s['blocks']}")
        if "epoch" in s and "epochs" in s:
            parts.append(f"epoch {s['epoch']}/{s['epochs']}")
        if s.get("loss") is not None:
            parts.append(f"loss {s['loss']:.3e}")
        if s.get("eta") is not None:
            parts.append(f"ETA {_duration(s['eta'])}")
        if s.get("rss_bytes"):
            parts.append(f"RSS {s['rss_bytes'] / 2**30:.1f} GiB")
        recent = sorted(w for w, t in self.busy.items() if time.time() - t < 120)
        if recent:
            parts.append("busy: " + " ".join(f"w{w}" for w in recent))
        parts.append(_duration(time.time() - self.started))
        self.stream.write("\r\x1b[2K" + " · ".join(parts))
        self.stream.flush()
        self._line = True

    def close(self) -> None:
        if self._line:
            self.stream.write("\n")
            self.stream.flush()
            self._line = False
        if self.json is not None:
            self.json.close()
            self.json = None


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class _LogHandler(logging.Handler):
    """Log records of the driver go through the view (so a live status line is redrawn under
    them, quiet mode keeps only warnings, and --log-json has them too)."""

    def __init__(self, progress: Progress):
        super().__init__()
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.progress.event("log", record.getMessage(), level=record.levelno)
        except Exception:  # noqa: BLE001 (a log call must never fail the run)
            self.handleError(record)


_current: Progress | None = None


def current() -> Progress | None:
    return _current


@contextlib.contextmanager
def active(progress: Progress | None) -> Iterator[Progress | None]:
    """Make `progress` the run's view (None: plain logging, as a library call gets)."""
    global _current
    previous, _current = _current, progress
    root = logging.getLogger()
    handlers = root.handlers[:]
    if progress is not None:
        root.handlers = [_LogHandler(progress)]
    try:
        yield progress
    finally:
        _current = previous
        root.handlers = handlers
        if progress is not None:
            progress.close()


def start_board() -> Any:
    """The board the stage actors post to, when a view is active (else None)."""
    progress = current()
    if progress is None:
        return None
    if progress.board is None:
        progress.board = ProgressBoard.remote()  # type: ignore[attr-defined]
    return progress.board


def note(kind: str, message: str, **fields: Any) -> None:
    """A driver-side event: to the view when one is active, else to the log."""
    progress = current()
    if progress is None:
        if message:
            log.info("%s", message)
    else:
        progress.event(kind, message, **fields)
