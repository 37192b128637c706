"""The FP model's perplexity, kept in the user cache (`pipeline.user_cache`, kind
`fp_perplexity`): it depends only on the model, the evaluation windows and the code that
computes it, so a second run on the same model reuses it. The key holds the model's identity,
the windows' sha256, the sequence length, the activation width and the code version."""
from __future__ import annotations

from typing import Any

import torch

from pipeline import user_cache

KIND = "fp_perplexity"


def cache_key(model_path: str, windows: torch.Tensor, seq_len: int, abits: int = 16) -> str:
    digest = user_cache.tensor_digest(windows)
    return user_cache.make_key({**user_cache.model_identity(model_path),
                                "windows_sha256": digest["sha256"],
                                "windows": digest["shape"], "seq_len": seq_len,
                                "abits": abits})


def cache_path(key: str) -> str:
    return user_cache.entry_path(KIND, key)


def read_cached(key: str) -> dict[str, Any] | None:
    return user_cache.read(KIND, key)


def write_cached(key: str, result: dict[str, Any]) -> None:
    user_cache.write(KIND, key, result)
