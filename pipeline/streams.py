"""Activation streams: a block's input or output as a list of handles to chunks of windows.

Where the chunks live is the store's business: in this process's memory, on local disk, or
(in `cluster/`) in the Ray object store, which spills to disk by itself.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import uuid
import weakref
from typing import Any, Protocol

import torch

from pipeline import storage


class ChunkStore(Protocol):
    def put(self, chunk: torch.Tensor) -> Any: ...

    def get(self, handle: Any) -> torch.Tensor: ...


class MemoryStore:
    """Chunks kept as they are; the handle is the tensor."""

    def put(self, chunk: torch.Tensor) -> torch.Tensor:
        return chunk

    def get(self, handle: torch.Tensor) -> torch.Tensor:
        return handle


@dataclasses.dataclass
class SpillStats:
    """What a `BudgetStore` did: bytes it holds now and at most, bytes it spilled and read."""

    held: int = 0
    peak_held: int = 0
    spilled: int = 0
    read: int = 0
    spilled_chunks: int = 0


class Spilled:
    """Handle of a chunk on local disk; the file goes when the handle does."""

    def __init__(self, path: str, nbytes: int):
        self.path, self.nbytes = path, nbytes
        weakref.finalize(self, _remove_quietly, path)


class Held:
    """Handle of a chunk kept in memory; its bytes leave the budget when the handle goes."""

    def __init__(self, tensor: torch.Tensor, stats: SpillStats):
        self.tensor = tensor
        nbytes = tensor.numel() * tensor.element_size()
        stats.held += nbytes
        stats.peak_held = max(stats.peak_held, stats.held)
        weakref.finalize(self, _release, stats, nbytes)


def _release(stats: SpillStats, nbytes: int) -> None:
    stats.held -= nbytes


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


class BudgetStore:
    """Chunks in memory up to `limit_bytes`; beyond it, on local disk (safetensors, read back
    through a memory map), so a worker's streams fit its memory budget. A chunk's bytes do not
    depend on where it was kept: results are bit-identical whatever the budget."""

    def __init__(self, limit_bytes: int, folder: str | None = None):
        self.limit = limit_bytes
        self._given_folder = folder
        self.folder: str | None = None  # made at the first spill: a store that never spills
        self.stats = SpillStats()       # leaves nothing on disk, even if its process is killed

    def _spill_folder(self) -> str:
        if self.folder is None:
            if self._given_folder:
                os.makedirs(self._given_folder, exist_ok=True)
                self.folder = self._given_folder
            else:
                self.folder = tempfile.mkdtemp(prefix="relayquant-spill-")
            weakref.finalize(self, shutil.rmtree, self.folder, True)
        return self.folder

    def put(self, chunk: torch.Tensor) -> Held | Spilled:
        chunk = chunk.detach()
        nbytes = chunk.numel() * chunk.element_size()
        if self.stats.held + nbytes <= self.limit:
            return Held(chunk, self.stats)
        path = os.path.join(self._spill_folder(), f"{uuid.uuid4().hex}.safetensors")
        self.stats.spilled += storage.write_scratch_tensor(path, chunk.cpu())
        self.stats.spilled_chunks += 1
        return Spilled(path, nbytes)

    def get(self, handle: Held | Spilled) -> torch.Tensor:
        if isinstance(handle, Held):
            return handle.tensor
        self.stats.read += handle.nbytes
        return storage.read_scratch_tensor(handle.path)


def split_windows(windows: torch.Tensor, chunk_size: int) -> list[torch.Tensor]:
    """[n, seq] -> chunks of at most `chunk_size` windows (the last may be shorter)."""
    return [windows[i : i + chunk_size] for i in range(0, windows.shape[0], chunk_size)]
