"""Architectures as data: one row per HF `architectures` name."""
from pipeline.adapters.rows import ADAPTERS, Adapter, Embedding, Positions, adapter_for

__all__ = ["ADAPTERS", "Adapter", "Embedding", "Positions", "adapter_for"]
