"""The FP perplexity is computed once per model, windows and code version, then reused."""
import os
import shutil
import time

import pytest
import torch

from cluster.coordinator import quantize
from pipeline import user_cache
from pipeline.config import RunConfig
from pipeline.config.tree import build_config
from pipeline.evaluation import perplexity_cache


@pytest.mark.unit
def test_any_change_of_model_windows_or_code_is_another_key(tiny_model, tmp_path, monkeypatch):
    model = str(tmp_path / "model")
    shutil.copytree(tiny_model("llama"), model)
    windows = torch.arange(64).reshape(4, 16)
    key = perplexity_cache.cache_key(model, windows, 16)
    assert key == perplexity_cache.cache_key(model, windows.clone(), 16)
    assert key != perplexity_cache.cache_key(model, windows[:3], 16)
    assert key != perplexity_cache.cache_key(model, windows + 1, 16)
    assert key != perplexity_cache.cache_key(model, windows, 32)
    assert key != perplexity_cache.cache_key(tiny_model("qwen2"), windows, 16)
    # the same files rewritten (same names and sizes, new contents): another key
    shard = next(f for f in sorted(os.listdir(model)) if f.endswith(".safetensors"))
    with open(os.path.join(model, shard), "rb") as f:
        data = f.read()
    time.sleep(0.01)
    with open(os.path.join(model, shard), "wb") as f:
        f.write(data)
    os.utime(os.path.join(model, shard), ns=(time.time_ns(), time.time_ns() + 10**9))
    rewritten = perplexity_cache.cache_key(model, windows, 16)
    assert rewritten != key
    monkeypatch.setattr(user_cache, "code_version", lambda: "another version")
    assert perplexity_cache.cache_key(model, windows, 16) != rewritten


@pytest.mark.unit
def test_a_damaged_entry_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("RELAYQUANT_CACHE_DIR", str(tmp_path))
    perplexity_cache.write_cached("k", {"perplexity": 3.0})
    assert perplexity_cache.read_cached("k") == {"perplexity": 3.0}
    (tmp_path / "fp_perplexity" / "k.json").write_text("{not json")
    assert perplexity_cache.read_cached("k") is None


@pytest.mark.cluster
@pytest.mark.e2e
@pytest.mark.usefixtures("local_ray")
def test_the_second_run_reuses_the_fp_perplexity(tiny_model, corpus_files, tmp_path,
                                                 monkeypatch):
    monkeypatch.setenv("RELAYQUANT_CACHE_DIR", str(tmp_path / "cache"))

    def config(out, max_windows=10):
        return build_config(RunConfig, {
            "model": {"path": tiny_model("llama")}, "output": str(tmp_path / out),
            "calibration": {"corpus": corpus_files[0], "num_samples": 4, "seq_len": 32},
            "eval": {"corpus": corpus_files[1], "seq_len": 32, "max_windows": max_windows},
            "cluster": {"workers": 2, "chunk_size": 4}})

    first = quantize(config("a"))["perplexity"]
    second = quantize(config("b"))["perplexity"]
    assert first["fp_from_cache"] is None and second["fp_from_cache"] is not None
    assert second["fp"] == first["fp"] and second["seconds"]["fp"] == 0.0
    other = quantize(config("c", max_windows=8))["perplexity"]  # other windows: computed
    assert other["fp_from_cache"] is None and other["fp"] != first["fp"]
