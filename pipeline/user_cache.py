"""The user cache: results that depend only on their inputs (model files, data, settings) and
on the code that computed them, kept across runs so that a second run on the same model reuses
them. One folder per kind under $RELAYQUANT_CACHE_DIR if set, else $RELAYQUANT_HOME:
`fp_perplexity` (the FP model's perplexity), `cvxq_statistics` (CVXQ's per-unit sensitivity
statistics) and `cvxq_errors` (CVXQ's measured RTN errors per linear and option).

A key hashes its inputs together with the code version (the package version and a hash of
every pipeline source file): a change of any is another key. A model's identity is its files'
names, sizes and last-modified marks with its config and index hashes (not its bytes). A
damaged entry is recomputed; an entry that cannot be written only warns.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from typing import Any

import torch

import pipeline
from pipeline import storage
from pipeline.assets import home
from pipeline.storage import CheckpointReader

log = logging.getLogger(__name__)


@functools.cache
def code_version() -> str:
    root = os.path.dirname(pipeline.__file__)
    digest = hashlib.sha256(pipeline.__version__.encode())
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


def model_identity(model_path: str) -> dict[str, Any]:
    """What changes when the model's files change, without reading their bytes."""
    reader = CheckpointReader(model_path)
    return {"model": reader.fingerprint(),
            "stamps": {f: storage.file_stamp(storage.join(model_path, f))
                       for f in reader.weight_files()}}


def tensor_digest(t: torch.Tensor) -> dict[str, Any]:
    t = t.detach().cpu().contiguous()
    return {"sha256": hashlib.sha256(t.numpy().tobytes()).hexdigest(),
            "shape": list(t.shape), "dtype": str(t.dtype)}


def make_key(inputs: dict[str, Any]) -> str:
    """The key of a result computed from `inputs` (JSON-serialisable) by this code."""
    data = {**inputs, "code": code_version()}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def entry_path(kind: str, key: str) -> str:
    root = os.environ.get("RELAYQUANT_CACHE_DIR") or home()
    return os.path.join(root, kind, f"{key}.json")


def read(kind: str, key: str) -> dict[str, Any] | None:
    path = entry_path(kind, key)
    if not os.path.exists(path):
        return None
    try:
        value = storage.read_json(path)
    except (OSError, ValueError):
        return None  # a damaged entry is recomputed
    return value if isinstance(value, dict) else None


def write(kind: str, key: str, value: dict[str, Any]) -> None:
    try:
        storage.write_json(entry_path(kind, key), value)
    except OSError as e:  # a read-only cache must not fail a finished run
        log.warning("could not write the %s cache entry %s (%s)", kind, entry_path(kind, key), e)
