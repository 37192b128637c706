"""The FP model's perplexity, cached in the user cache: it depends only on the model, the
evaluation windows and the code that computes it, so a second run on the same model reuses it.

The key holds the model's files (names, sizes, last-modified marks, config and index hashes),
the windows' sha256, the sequence length and the code version (the package version and a hash
of every pipeline source file): any change of one is a different key.
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


def cache_key(model_path: str, windows: torch.Tensor, seq_len: int, abits: int = 16) -> str:
    reader = CheckpointReader(model_path)
    stamps = {f: storage.file_stamp(storage.join(model_path, f)) for f in reader.weight_files()}
    data = {"model": reader.fingerprint(), "stamps": stamps,
            "windows_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
            "windows": list(windows.shape), "seq_len": seq_len, "abits": abits,
            "code": code_version()}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def cache_path(key: str) -> str:
    """Under $RELAYQUANT_CACHE_DIR if set, else $RELAYQUANT_HOME/fp_perplexity."""
    folder = os.environ.get("RELAYQUANT_CACHE_DIR") or os.path.join(home(), "fp_perplexity")
    return os.path.join(folder, f"{key}.json")


def read_cached(key: str) -> dict[str, Any] | None:
    path = cache_path(key)
    if not os.path.exists(path):
        return None
    try:
        return storage.read_json(path)
    except (OSError, ValueError):
        return None  # a damaged entry is recomputed


def write_cached(key: str, result: dict[str, Any]) -> None:
    try:
        storage.write_json(cache_path(key), result)
    except OSError as e:  # a read-only cache must not fail a finished run
        log.warning("could not write the FP perplexity cache %s (%s)", cache_path(key), e)
