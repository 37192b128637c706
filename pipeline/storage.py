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
import stat
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


def require_exists(path: str, field: str, kind: str = "folder") -> None:
    """A user-given path or URL that can be opened and exists, or a ConfigError naming `field`:
    an unknown protocol, a missing filesystem package (s3fs, gcsfs) or an unreachable store is
    an input error too. A local path must also be of the `kind` asked for ("folder" or
    "file") and readable: a FIFO or a device given as a file would block the first read."""
    try:
        fs, inner = filesystem(path)
        found = bool(fs.exists(inner))
    except Exception as e:  # each fsspec backend (s3fs, httpx, aiohttp) raises its own types
        raise ConfigError(f"{field}: cannot open {path!r} ({e}); give a local {kind} or an "
                          "fsspec URL whose filesystem is installed") from e
    if not found:
        raise ConfigError(f"{field}: {path!r} does not exist")
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        _require_local_kind(path, inner, field, kind)


def _require_local_kind(path: str, inner: str, field: str, kind: str) -> None:
    if kind == "folder":
        if not os.path.isdir(inner):
            raise ConfigError(f"{field}: {path!r} is a file; give the folder that holds it")
        try:
            os.listdir(inner)
        except OSError as e:
            raise ConfigError(f"{field}: cannot read the folder {path!r} ({e.strerror})") from e
    elif not os.path.isdir(inner) and not stat.S_ISREG(os.stat(inner).st_mode):
        raise ConfigError(f"{field}: {path!r} is not a regular file (a pipe or a device); "
                          "give a file")


def list_names(folder: str) -> list[str]:
    fs, inner = filesystem(folder)
    if not fs.exists(inner):
        return []
    return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(inner, detail=False))


def open_to_read(path: str) -> Any:
    """`path` opened for reading; a local pipe, socket or device is refused first (opening a
    FIFO would wait for a writer forever)."""
    fs, inner = filesystem(path)
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        try:
            mode = os.stat(inner).st_mode
        except OSError:
            mode = None  # missing or unreadable: open() says so
        if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
            raise ConfigError(f"{path} is not a regular file (a pipe, socket or device); give "
                              "the file itself")
    return fs.open(inner, "rb")


def read_bytes(path: str) -> bytes:
    with open_to_read(path) as f:
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
    digest = hashlib.sha256()
    with open_to_read(path) as f:
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
    """The tensor entries of a safetensors file, checked against the file's size, so a file
    that is not safetensors, or is cut short, is refused here rather than read as garbage."""
    fs, inner = filesystem(path)
    file_size = int(fs.size(inner))
    with open_to_read(path) as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ConfigError(f"{path}: not a safetensors file ({file_size} bytes, shorter than "
                              "the 8-byte header length)")
        (size,) = struct.unpack("<Q", prefix)
        if size > file_size - 8:
            raise ConfigError(f"{path}: not a safetensors file (header length {size} exceeds "
                              f"the file's {file_size} bytes)")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not a safetensors file (header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise ConfigError(f"{path}: not a safetensors file (header is not a JSON object)")
    base = 8 + size
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(path, name, info, base, file_size)
    return entries


def _entry(path: str, name: str, info: Any, base: int, file_size: int) -> TensorEntry:
    try:
        lo, hi = (int(v) for v in info["data_offsets"])
        dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: not a safetensors file (bad header entry for {name})") from e
    if dtype not in _DTYPES:
        raise ConfigError(f"{path}: tensor {name} has dtype {dtype}; relayquant reads "
                          f"{', '.join(_DTYPES)}")
    count = 1
    for d in shape:
        count *= d
    itemsize = torch.empty(0, dtype=_DTYPES[dtype]).element_size()
    if not 0 <= lo <= hi or hi - lo != count * itemsize:
        raise ConfigError(f"{path}: not a safetensors file (tensor {name}: offsets {lo}..{hi} "
                          f"do not hold {shape} {dtype})")
    if base + hi > file_size:
        raise ConfigError(f"{path}: truncated: tensor {name} ends at byte {base + hi} but the "
                          f"file has {file_size}; copy or download the file again")
    return TensorEntry(path, _DTYPES[dtype], shape, base + lo, base + hi)


def read_json_file(path: str, field: str) -> Any:
    """A JSON file the user gave (config, index), refused with the field named when it is
    not JSON."""
    try:
        return json.loads(read_bytes(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{field}: {path} is not valid JSON ({e})") from e
    except OSError as e:  # a folder of that name, no permission
        raise ConfigError(f"{field}: cannot read {path} ({e.strerror or e})") from e


def read_model_config(folder: str) -> dict[str, Any]:
    """A model folder's config.json, which must exist and hold a JSON object."""
    config_path = join(folder, "config.json")
    if not exists(config_path):
        if exists(join(folder, "manifest.json")):
            raise ConfigError(f"model.path: {folder!r} is an unfinished relayquant run (a "
                              "manifest, no config.json yet); finish it with relayquant "
                              "quantize (it resumes), or give a finished output or a model")
        raise ConfigError(f"model.path: no config.json in {folder!r}; give a Hugging Face "
                          "model folder (config.json + safetensors) or its fsspec URL")
    config = read_json_file(config_path, "model.path")
    if not isinstance(config, dict):
        raise ConfigError(f"model.path: {config_path} must hold a JSON object")
    return config


def _read_exactly(f: Any, nbytes: int, name: str) -> bytearray:
    """`nbytes` from the file's position into one buffer (no second copy of a large tensor)."""
    raw = bytearray(nbytes)
    view, done = memoryview(raw), 0
    while done < nbytes:
        got = f.readinto(view[done:])
        if not got:
            raise OSError(f"{name}: the file ended {nbytes - done} bytes before the tensor's end")
        done += got
    return raw


class CheckpointReader:
    """A HF safetensors model folder (single file or sharded with an index), read lazily."""

    def __init__(self, folder: str, config: dict[str, Any] | None = None,
                 files: list[str] | None = None):
        """`config` and `files` stand in for config.json and the index, for a folder that is
        still being written (a run's finished block shards)."""
        self.folder = folder.rstrip("/")
        self.config: dict[str, Any] = read_model_config(self.folder) if config is None else config
        self.files = files
        self.entries: dict[str, TensorEntry] = {}
        for file in self.weight_files():
            path = join(self.folder, file)
            if files is None and not exists(path):
                raise ConfigError(f"model.path: {INDEX_NAME} names {file}, which is missing "
                                  f"from {self.folder!r}; copy or download it again")
            field = "model.path: " if files is None else ""  # else the message names the file
            try:
                entries = read_header(path)
            except OSError as e:  # a folder of that name, no permission
                raise ConfigError(f"{field}cannot read {path} ({e.strerror or e})") from e
            except ConfigError as e:
                raise ConfigError(f"{field}{e}") from e
            if files is None:
                self._refuse_duplicates(entries, path)
            self.entries.update(entries)

    def _refuse_duplicates(self, entries: dict[str, TensorEntry], path: str) -> None:
        """A tensor stored in two shards: which copy a loader takes differs between loaders,
        so neither is taken silently."""
        both = next((n for n in entries if n in self.entries), None)
        if both is not None:
            raise ConfigError(f"model.path: tensor {both} is stored twice, in "
                              f"{self.entries[both].file} and {path}; a checkpoint holds each "
                              "tensor once, so copy or download the model again")

    def weight_files(self) -> list[str]:
        if self.files is not None:
            return list(self.files)
        index = join(self.folder, INDEX_NAME)
        if exists(index):
            weight_map = read_json_file(index, "model.path")
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(v, str) for v in weight_map.values()):
                raise ConfigError(f"model.path: {index} has no weight_map of tensor name -> "
                                  "file name")
            return sorted(set(weight_map.values()))
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
                    raw = _read_exactly(f, e.nbytes, name)
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
        for name in TOKENIZER_FILES + ("config.json",):  # transformers would block on a pipe
            if os.path.exists(os.path.join(inner, name)):
                open_to_read(os.path.join(inner, name)).close()
        return inner
    target = tempfile.mkdtemp(prefix="relayquant-tok-")
    for name in TOKENIZER_FILES + ("config.json",):
        src = join(folder, name)
        if exists(src):
            with open(os.path.join(target, name), "wb") as f:
                f.write(read_bytes(src))
    return target


def file_stamp(path: str) -> dict[str, Any]:
    """Size and last-modified marks of one file (mtime locally; ETag / LastModified on object
    stores): what changes when the file is rewritten, without reading it."""
    fs, inner = filesystem(path)
    info = fs.info(inner)
    keep = ("size", "mtime", "ETag", "etag", "LastModified", "last_modified", "md5Hash")
    return {k: str(info[k]) for k in keep if k in info}


def write_scratch_tensor(path: str, tensor: torch.Tensor) -> int:
    """A tensor to a local scratch file (safetensors; no rename or fsync: scratch is dropped
    with the run); returns the bytes written."""
    data = safetensors.torch.save({"t": tensor.contiguous()})
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def read_scratch_tensor(path: str) -> torch.Tensor:
    """Read back a scratch tensor through a memory map of its file."""
    with safetensors.safe_open(path, framework="pt") as f:
        return f.get_tensor("t")
