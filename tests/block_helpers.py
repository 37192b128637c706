"""Shared by the block-level tests: a quantization config from a mapping, and a small random
token stream embedded into a model's first block input."""
from __future__ import annotations

import torch

from pipeline import block_pass
from pipeline.config import QuantizationConfig
from pipeline.config.tree import build_config
from pipeline.streams import MemoryStore


def quantization(**changes) -> QuantizationConfig:
    return build_config(QuantizationConfig, changes, "quantization")


def stream(parts, n=4, seq=32, seed=0):
    torch.manual_seed(seed)
    store = MemoryStore()
    ids = torch.randint(0, parts.hf_config.vocab_size, (n, seq))
    return store, block_pass.embed_stream(parts, [ids[:2], ids[2:]], store)
