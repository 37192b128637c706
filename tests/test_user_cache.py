"""CVXQ's keys in the user cache: what the cached statistics depend on changes the key, what
they do not depend on (the budget's target, the method) does not."""
import dataclasses

import pytest
import torch

from pipeline.config import BudgetConfig, ClusterConfig, QuantizationConfig
from pipeline.config.budget import Distortion, Objective
from pipeline.config.quantization import Observer
from pipeline.cvxq import statistics_cache
from pipeline.plan import open_model

pytestmark = pytest.mark.unit


def test_statistics_key_follows_model_windows_objective_and_compute(tiny_model):
    model = tiny_model("llama")
    windows = torch.arange(64).reshape(4, 16)
    budget, cluster = BudgetConfig(average_bits=3.0), ClusterConfig()

    def key(model=model, windows=windows, budget=budget, cluster=cluster):
        return statistics_cache.statistics_key(model, windows, budget, cluster)

    base = key()
    assert base == key(windows=windows.clone())
    assert base == key(budget=dataclasses.replace(budget, average_bits=2.5, choices=[2, 3]))
    for changed in (key(windows=windows + 1), key(windows=windows[:3]),
                    key(model=tiny_model("qwen2")),
                    key(budget=dataclasses.replace(budget, objective=Objective.LM_LOSS)),
                    key(budget=dataclasses.replace(budget, seed=1)),
                    key(budget=dataclasses.replace(budget, pca_dims=8)),
                    key(cluster=dataclasses.replace(cluster, chunk_size=3)),
                    key(cluster=dataclasses.replace(cluster, compute_dtype="bfloat16"))):
        assert changed != base


def test_errors_key_follows_each_linears_options_and_format(tiny_model):
    model = tiny_model("llama")
    parts = open_model(model, "float32")
    q = QuantizationConfig(bits=3, group_size=16, budget=BudgetConfig(
        average_bits=3.5, choices=[3, 4], distortion=Distortion.MEASURED, group_sizes=[16, None]))
    cluster = ClusterConfig()

    def key(q=q):
        return statistics_cache.errors_key(model, parts, q, cluster)

    base = key()
    assert base == key(dataclasses.replace(q, budget=dataclasses.replace(q.budget,
                                                                          average_bits=3.2)))
    assert base == key(dataclasses.replace(q, bits=4))  # every width is an option anyway
    for changed in (key(dataclasses.replace(q, budget=dataclasses.replace(q.budget,
                                                                           choices=[2, 3, 4]))),
                    key(dataclasses.replace(q, budget=dataclasses.replace(q.budget,
                                                                           group_sizes=[16]))),
                    key(dataclasses.replace(q, observer=Observer.MSE)),
                    key(dataclasses.replace(q, symmetric=True))):
        assert changed != base
