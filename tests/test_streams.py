"""Chunk stores: a budgeted store keeps what fits in memory and spills the rest, exactly."""
import os

import pytest
import torch

from pipeline.streams import BudgetStore, Held, Spilled

pytestmark = pytest.mark.unit


def test_budget_store_spills_beyond_the_limit_and_reads_back_exactly(tmp_path):
    store = BudgetStore(1000, str(tmp_path / "spill"))
    chunks = [torch.randn(10, 10) for _ in range(5)]  # 400 bytes each
    handles = [store.put(c) for c in chunks]
    assert [type(h) for h in handles] == [Held, Held, Spilled, Spilled, Spilled]
    assert all(torch.equal(store.get(h), c) for h, c in zip(handles, chunks, strict=True))
    assert store.stats.held == store.stats.peak_held == 800
    assert store.stats.spilled_chunks == 3 and store.stats.read == 1200
    assert len(os.listdir(tmp_path / "spill")) == 3
    del handles  # dropping the handles frees the memory and removes the files
    assert store.stats.held == 0 and os.listdir(tmp_path / "spill") == []
    again = store.put(torch.ones(10, 10))
    assert isinstance(again, Held)


def test_zero_budget_keeps_everything_on_disk(tmp_path):
    store = BudgetStore(0, str(tmp_path))
    x = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    h = store.put(x)
    assert isinstance(h, Spilled) and store.get(h).dtype == torch.bfloat16
    assert torch.equal(store.get(h), x)


def test_a_store_that_never_spills_leaves_no_folder(tmp_path, monkeypatch):
    # actors are killed without running finalizers: a folder made up front would stay behind
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    store = BudgetStore(10_000)
    store.put(torch.ones(10, 10))
    assert os.listdir(tmp_path) == []
    kept = store.put(torch.ones(60, 60))  # 14.4 kB: over the budget
    (spill,) = os.listdir(tmp_path)
    assert spill.startswith("relayquant-spill-")
    del store, kept
    assert os.listdir(tmp_path) == []
