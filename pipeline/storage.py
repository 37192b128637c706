"""The one place that touches files: fsspec for paths and URLs, safetensors for tensors.

Reads are lazy and by tensor name: a checkpoint's headers are parsed once, then each tensor is
read with one ranged read, so no process ever loads a whole checkpoint. Writes go to a
temporary name and are renamed into place, so a reader never sees half a file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import tempfile
import uuid
from collections.abc import Iterable
from typing import Any

import fsspec
import safetensors.torch
import torch

from pipeline.config import ConfigError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
                   "generation_config.json")

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, inner = fsspec.core.url_to_fs(path)
    return fs, inner


def exists(path: str) -> bool:
    fs, inner = filesystem(path)
    return bool(fs.exists(inner))


def list_names(folder: str) -> list[str]:
    fs, inner = filesystem(folder)
    if not fs.exists(inner):
        return []
    return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(inner, detail=False))


def read_bytes(path: str) -> bytes:
    fs, inner = filesystem(path)
    with fs.open(inner, "rb") as f:
        return f.read()


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def write_bytes(path: str, data: bytes) -> None:
    """Write to a temporary sibling, then rename into place."""
    fs, inner = filesystem(path)
    parent = os.path.dirname(inner)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{inner}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
        if hasattr(f, "flush"):
            f.flush()
        if hasattr(f, "fileno"):
            try:
                os.fsync(f.fileno())
            except (OSError, ValueError, NotImplementedError):
                pass  # not a local file: the store's own durability applies
    fs.mv(tmp, inner)


def write_json(path: str, data: Any) -> None:
    write_bytes(path, (json.dumps(data, indent=1, sort_keys=False) + "\n").encode())


def write_tensors(path: str, tensors: dict[str, torch.Tensor],
                  metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors file; returns the sha256 of its bytes."""
    data = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata)
    write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    return dict(safetensors.torch.load(read_bytes(path)))


def sha256_file(path: str) -> str:
    fs, inner = filesystem(path)
    digest = hashlib.sha256()
    with fs.open(inner, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def copy_file(src: str, dst: str) -> None:
    write_bytes(dst, read_bytes(src))


def remove(path: str) -> None:
    fs, inner = filesystem(path)
    if fs.exists(inner):
        fs.rm(inner, recursive=True)


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str) -> dict[str, TensorEntry]:
    fs, inner = filesystem(path)
    with fs.open(inner, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    base = 8 + size
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        entries[name] = TensorEntry(path, _DTYPES[info["dtype"]], tuple(info["shape"]),
                                    base + lo, base + hi)
    return entries


class CheckpointReader:
    """A HF safetensors model folder (single file or sharded with an index), read lazily."""

    def __init__(self, folder: str, config: dict[str, Any] | None = None,
                 files: list[str] | None = None):
        """`config` and `files` stand in for config.json and the index, for a folder that is
        still being written (a run's finished block shards)."""
        self.folder = folder.rstrip("/")
        config_path = join(self.folder, "config.json")
        if config is None and not exists(config_path):
            raise ConfigError(f"model.path: no config.json in {folder!r}; give a Hugging Face "
                              "model folder (config.json + safetensors) or its fsspec URL")
        self.config: dict[str, Any] = config if config is not None else read_json(config_path)
        self.files = files
        self.entries: dict[str, TensorEntry] = {}
        for file in self.weight_files():
            self.entries.update(read_header(join(self.folder, file)))

    def weight_files(self) -> list[str]:
        if self.files is not None:
            return list(self.files)
        index = join(self.folder, INDEX_NAME)
        if exists(index):
            return sorted(set(read_json(index)["weight_map"].values()))
        if exists(join(self.folder, SINGLE_NAME)):
            return [SINGLE_NAME]
        raise ConfigError(f"model.path: no {INDEX_NAME} or {SINGLE_NAME} in {self.folder!r}; "
                          "relayquant reads safetensors checkpoints")

    def nbytes(self, names: Iterable[str]) -> int:
        return sum(self.entries[n].nbytes for n in names)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors with one ranged read each, grouped by file."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.entries[name].file, []).append(name)
        out = {}
        for file, file_names in by_file.items():
            fs, inner = filesystem(file)
            with fs.open(inner, "rb") as f:
                for name in file_names:
                    e = self.entries[name]
                    f.seek(e.start)
                    raw = bytearray(f.read(e.nbytes))
                    t = torch.frombuffer(raw, dtype=e.dtype) if raw else torch.empty(0, dtype=e.dtype)
                    out[name] = t.reshape(e.shape)
        return out

    def fingerprint(self) -> dict[str, Any]:
        """Names and sizes of the weight files, hashes of the index and config."""
        fs, inner = filesystem(self.folder)
        files = {f: int(fs.size(f"{inner}/{f}")) for f in self.weight_files()}
        index = join(self.folder, INDEX_NAME)
        return {
            "files": files,
            "config_sha256": sha256_file(join(self.folder, "config.json")),
            "index_sha256": sha256_file(index) if exists(index) else None,
        }


def local_tokenizer_dir(folder: str) -> str:
    """A local folder with the model's tokenizer files (copied when `folder` is remote)."""
    fs, inner = filesystem(folder)
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return inner
    target = tempfile.mkdtemp(prefix="relayquant-tok-")
    for name in TOKENIZER_FILES + ("config.json",):
        src = join(folder, name)
        if exists(src):
            with open(os.path.join(target, name), "wb") as f:
                f.write(read_bytes(src))
    return target
