from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from tiny_models import build_model, corpus_text


@pytest.fixture(scope="session", autouse=True)
def fp_cache_dir(tmp_path_factory):
    """The FP perplexity cache of the test session, never the user's."""
    folder = str(tmp_path_factory.mktemp("fp-cache"))
    old = os.environ.get("RELAYQUANT_CACHE_DIR")
    os.environ["RELAYQUANT_CACHE_DIR"] = folder
    yield folder
    if old is None:
        os.environ.pop("RELAYQUANT_CACHE_DIR", None)
    else:
        os.environ["RELAYQUANT_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_root):
    """tiny_model(arch) -> folder of a saved tiny model (built once per session)."""
    cache: dict[str, str] = {}

    def make(arch: str = "llama", num_layers: int = 4) -> str:
        key = f"{arch}-{num_layers}"
        if key not in cache:
            cache[key] = build_model(str(tiny_root / key), arch, num_layers)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def corpus_files(tiny_root):
    train = tiny_root / "train.txt"
    test = tiny_root / "test.txt"
    train.write_text(corpus_text(40000, seed=0))
    test.write_text(corpus_text(8000, seed=7))
    return str(train), str(test)


@pytest.fixture(scope="module")
def local_ray():
    """A fresh local Ray for one test module (never a `ray start` found on the node)."""
    import logging

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()
