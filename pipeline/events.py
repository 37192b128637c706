"""Progress events from inside long work (an epoch of a block's training, ...), Ray-free: the
library emits them; whoever runs it subscribes. A stage actor forwards them to the driver's one
progress view; with no subscriber (the library used in one process) they are logged as before.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)
_subscribers: list[Callable[[dict[str, Any]], None]] = []


def subscribe(fn: Callable[[dict[str, Any]], None]) -> None:
    _subscribers.append(fn)


def unsubscribe(fn: Callable[[dict[str, Any]], None]) -> None:
    if fn in _subscribers:
        _subscribers.remove(fn)


def emit(kind: str, message: str, **fields: Any) -> None:
    """One event: `kind` (e.g. "epoch"), a human line, and its fields."""
    if not _subscribers:
        log.info("%s", message)
        return
    event = {"kind": kind, "message": message, **fields}
    for fn in _subscribers:
        fn(event)
