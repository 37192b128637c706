"""Activation streams: a block's input or output as a list of handles to chunks of windows.

Where the chunks live is the store's business: in this process's memory, on local disk, or
(in `cluster/`) in the Ray object store, which spills to disk by itself.
"""
from __future__ import annotations

import os
import tempfile
import uuid
from typing import Any, Protocol

import torch


class ChunkStore(Protocol):
    def put(self, chunk: torch.Tensor) -> Any: ...

    def get(self, handle: Any) -> torch.Tensor: ...


class MemoryStore:
    """Chunks kept as they are; the handle is the tensor."""

    def put(self, chunk: torch.Tensor) -> torch.Tensor:
        return chunk

    def get(self, handle: torch.Tensor) -> torch.Tensor:
        return handle


class DiskStore:
    """Chunks written to files under `folder`; the handle is the file path."""

    def __init__(self, folder: str | None = None):
        self.folder = folder or tempfile.mkdtemp(prefix="relayquant-stream-")
        os.makedirs(self.folder, exist_ok=True)

    def put(self, chunk: torch.Tensor) -> str:
        path = os.path.join(self.folder, f"{uuid.uuid4().hex}.pt")
        torch.save(chunk.contiguous(), path)
        return path

    def get(self, handle: str) -> torch.Tensor:
        return torch.load(handle, weights_only=True)


def split_windows(windows: torch.Tensor, chunk_size: int) -> list[torch.Tensor]:
    """[n, seq] -> chunks of at most `chunk_size` windows (the last may be shorter)."""
    return [windows[i : i + chunk_size] for i in range(0, windows.shape[0], chunk_size)]
