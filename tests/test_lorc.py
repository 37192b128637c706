"""LoRC (ZeroQuant-V2's low-rank compensation): the factors' math, their storage, the block's
quantized stream through Ŵ + B·A, the budget's bits and the recipe fields."""
from __future__ import annotations

import itertools

import pytest
import torch
from block_helpers import quantization, stream

from pipeline import block_pass
from pipeline.config import ConfigError, ExportFormat, RunConfig
from pipeline.config.tree import build_config, config_to_dict
from pipeline.cvxq.budget import check_feasible
from pipeline.formats import AffineFormat
from pipeline.formats.compressed_tensors import decompress_linear
from pipeline.formats.peft_adapter import target_modules
from pipeline.methods import lorc_block
from pipeline.methods.lorc import (
    activation_weighted_factors,
    adapter_bits,
    factor_errors,
    low_rank_factors,
    quantize_int8,
    round_factors,
)
from pipeline.model_parts import run_block
from pipeline.output_dir import _differences
from pipeline.plan import open_model


def tail(e: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(e.double())
    return float(s[rank:].pow(2).sum().sqrt())


@pytest.mark.unit
def test_residual_is_the_svd_tail_and_falls_with_rank():
    e = torch.randn(48, 80, generator=torch.Generator().manual_seed(0))
    residuals = []
    for rank in range(1, 13):
        f = low_rank_factors(e, rank)
        assert f.a.shape == (rank, 80) and f.b.shape == (48, rank)
        residual = float((e.double() - f.product().double()).norm())
        assert residual == pytest.approx(tail(e, rank), rel=1e-5)
        residuals.append(residual)
    assert all(b < a for a, b in itertools.pairwise(residuals))
    # the singular values are split evenly: A's rows and B's columns have equal norms
    f = low_rank_factors(e, 4)
    assert torch.allclose(f.a.norm(dim=1), f.b.norm(dim=0), rtol=1e-4)


@pytest.mark.unit
def test_randomized_svd_is_near_the_tail_and_deterministic():
    g = torch.Generator().manual_seed(1)
    u = torch.linalg.qr(torch.randn(300, 120, generator=g)).Q
    v = torch.linalg.qr(torch.randn(200, 120, generator=g)).Q
    e = u @ torch.diag(0.9 ** torch.arange(120.0)) @ v.T  # a decaying spectrum
    f = low_rank_factors(e, 8, exact_limit=16)
    residual = float((e.double() - f.product().double()).norm())
    assert (1 - 1e-5) * tail(e, 8) <= residual <= 1.001 * tail(e, 8)
    again = low_rank_factors(e, 8, exact_limit=16)
    assert torch.equal(f.a, again.a) and torch.equal(f.b, again.b)


@pytest.mark.unit
def test_int8_factors_error_is_bounded_and_reported():
    e = torch.randn(64, 96, generator=torch.Generator().manual_seed(2))
    exact = low_rank_factors(e, 8)
    q = quantize_int8(exact)
    assert q.a_codes.dtype is torch.int8 and q.a_scale.shape == (8, 1) and q.b_scale.shape == (1, 8)
    stored = q.dequantized()
    # each value is off by at most half its component's step
    assert ((stored.a - exact.a).abs() <= q.a_scale / 2 + 1e-7).all()
    assert ((stored.b - exact.b).abs() <= q.b_scale / 2 + 1e-7).all()
    errors = factor_errors(e, exact, stored)
    relative = (errors["storage_error_sq"] / float(exact.product().double().pow(2).sum())) ** 0.5
    assert 0 < relative < 0.02
    # the residual with int8 factors is barely above the optimal one
    assert errors["residual_sq"] <= errors["stored_residual_sq"] <= 1.01 * errors["residual_sq"]
    # dequantized int8 values re-encode to their own codes
    again = quantize_int8(stored)
    assert torch.equal(again.a_codes, q.a_codes) and torch.equal(again.b_codes, q.b_codes)
    fp16 = factor_errors(e, exact, round_factors(exact, torch.float16))
    assert fp16["storage_error_sq"] < errors["storage_error_sq"]


@pytest.mark.unit
def test_activation_aware_factors_minimize_the_weighted_error():
    g = torch.Generator().manual_seed(3)
    e = torch.randn(32, 40, generator=g)
    rms = torch.rand(40, generator=g) * 4 + 0.05
    plain = low_rank_factors(e, 4)
    aware = activation_weighted_factors(e, rms, 4)

    def weighted(f):
        return float(((e - f.product()) * rms).norm())

    assert weighted(aware) < weighted(plain)
    assert weighted(aware) == pytest.approx(tail(e * rms, 4), rel=1e-4)


@pytest.mark.unit
def test_adapter_bits():
    assert adapter_bits(8, 4096, 11008, 16) == 8 * (4096 + 11008) * 16
    assert adapter_bits(8, 64, 128, 8, 32) == 8 * 192 * 8 + 2 * 8 * 32


@pytest.mark.unit
def test_peft_target_modules():
    names = [f"model.layers.{i}.{n}" for i in range(2)
             for n in ("self_attn.q_proj", "mlp.down_proj")]
    linears = ["self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"]
    assert target_modules(names, "model.layers", linears, 2) == ["down_proj", "q_proj"]
    assert target_modules(names[:3], "model.layers", linears, 2) == sorted(names[:3])


# --- the recipe fields ------------------------------------------------------------------------

BASE = {"model": {"path": "/m"}, "output": "/o"}


@pytest.mark.unit
def test_lorc_config_round_trip_and_off_by_default():
    config = build_config(RunConfig, BASE)
    data = config_to_dict(config)
    assert data["quantization"]["lorc"] is None
    # a manifest written before the field existed still matches
    old = {k: v for k, v in data["quantization"].items() if k != "lorc"}
    assert _differences(old, data["quantization"]) == []
    on = build_config(RunConfig, {**BASE, "quantization": {"lorc": {
        "rank": 16, "dtype": "int8", "targets": ["re:.*mlp.*"]}},
        "export": {"formats": ["compressed-tensors", "fake_quant_lorc"]}})
    assert on.quantization.lorc.rank == 16
    assert build_config(RunConfig, config_to_dict(on)) == on


@pytest.mark.unit
@pytest.mark.parametrize("section,message", [
    ({"quantization": {"lorc": {"rank": 0}}}, r"quantization.lorc.rank: 0; must be an integer"),
    ({"quantization": {"lorc": {"dtype": "fp8"}}},
     r"quantization.lorc.dtype: 'fp8' is not allowed; choose one of float16, bfloat16, int8"),
    ({"quantization": {"lorc": {"rnak": 8}}},
     (r"quantization.lorc.rnak: unknown key; allowed keys here: activation_aware, "
      "count_in_budget, dtype, rank, targets")),
    ({"quantization": {"lorc": {"targets": ["re:("]}}},
     r"quantization.lorc.targets: '\(' is not a valid regular expression"),
    ({"quantization": {"lorc": {"targets": []}}}, r"quantization.lorc.targets: empty"),
    ({"quantization": {"lorc": {"count_in_budget": True}}},
     r"quantization.lorc.count_in_budget: needs quantization.budget.average_bits"),
    ({"export": {"formats": ["compressed-tensors", "fake_quant_lorc"]}},
     r"export.formats: fake_quant_lorc needs quantization.lorc"),
])
def test_lorc_config_errors(section, message):
    with pytest.raises(ConfigError, match=message):
        build_config(RunConfig, {**BASE, **section})


@pytest.mark.unit
def test_targets_must_name_a_quantized_linear():
    lorc = quantization(lorc={"targets": ["model.layers.0.mlp.up_proj", "re:.*nope"]}).lorc
    with pytest.raises(ConfigError, match=r"quantization.lorc.targets: 're:.\*nope' matches "
                                          "none of this model's 2 quantized linears"):
        lorc_block.require_targets_match(lorc, {"model.layers.0.mlp.up_proj": (128, 64),
                                                  "model.layers.0.mlp.down_proj": (64, 128)})


@pytest.mark.unit
def test_rank_must_fit_every_targeted_linear():
    lorc = quantization(lorc={"rank": 65}).lorc
    shapes = {"model.layers.0.mlp.up_proj": (128, 64), "model.layers.0.mlp.down_proj": (64, 128)}
    with pytest.raises(ConfigError, match=r"quantization.lorc.rank: 65 exceeds the smaller side "
                                          r"of model.layers.0.mlp.up_proj \(128 x 64\)"):
        lorc_block.require_targets_match(lorc, shapes)
    lorc_block.require_targets_match(quantization(lorc={"rank": 64}).lorc, shapes)


# --- a block: the quantized stream goes through Ŵ + B·A ---------------------------------------


def exported_block(parts, result, index, with_adapter):
    """The block rebuilt from its exported compressed-tensors tensors (+ its adapter)."""
    block = parts.load_block(index)
    path = parts.block_path(index)
    tensors = result.exports[ExportFormat.COMPRESSED_TENSORS]
    fmt = AffineFormat(2, 16)
    with torch.no_grad():
        for name in parts.adapter.linears:
            full = f"{path}.{name}"
            w = decompress_linear({k.removeprefix(f"{full}."): v for k, v in tensors.items()
                                   if k.startswith(f"{full}.weight")}, fmt, torch.float32)
            a = result.adapter.get(f"base_model.model.{full}.lora_A.weight")
            if with_adapter and a is not None:
                b = result.adapter[f"base_model.model.{full}.lora_B.weight"]
                w = w + b.float() @ a.float()
            block.get_parameter(f"{name}.weight").copy_(w)
    return block


@pytest.mark.e2e
def test_quantized_stream_sees_the_correction(tiny_model):
    parts = open_model(tiny_model("llama"), "float32")
    store, fp = stream(parts)
    layouts = [ExportFormat.COMPRESSED_TENSORS, ExportFormat.FAKE_QUANT_LORC]
    plain = block_pass.quantize_block(parts, 1, fp, fp, quantization(
        bits=2, group_size=16, method="gptq"), [ExportFormat.COMPRESSED_TENSORS], store)
    result = block_pass.quantize_block(parts, 1, fp, fp, quantization(
        bits=2, group_size=16, method="gptq", lorc={"rank": 4}), layouts, store)
    assert len(result.adapter) == 2 * 7
    assert result.metrics["lorc"]["linears"] == 7
    assert result.metrics["output_mse"] < plain.metrics["output_mse"]
    with_adapter = exported_block(parts, result, 1, True)
    without = exported_block(parts, result, 1, False)
    for h, q in zip(fp, result.q_out, strict=True):
        x, y = store.get(h), store.get(q)
        assert torch.allclose(run_block(parts, with_adapter, x), y, atol=1e-5)
        assert not torch.allclose(run_block(parts, without, x), y, atol=1e-3)
    # fake_quant_lorc holds the same corrected weights
    folded = result.exports[ExportFormat.FAKE_QUANT_LORC]
    name = "model.layers.1.mlp.down_proj"
    assert torch.allclose(folded[f"{name}.weight"],
                          with_adapter.get_parameter("mlp.down_proj.weight"), atol=1e-6)
    # the adapter holds fp16 factors, [r, in] and [out, r]
    a = result.adapter[f"base_model.model.{name}.lora_A.weight"]
    assert a.dtype is torch.float16 and a.shape == (4, 128)


@pytest.mark.e2e
def test_data_free_targets_and_int8(tiny_model):
    parts = open_model(tiny_model("llama"), "float32")
    q = quantization(bits=2, group_size=16, lorc={"rank": 2, "dtype": "int8",
                                                  "targets": ["re:.*mlp\\..*"]})
    result = block_pass.quantize_block_weights(parts, 0, q, [ExportFormat.COMPRESSED_TENSORS])
    names = {k.rsplit(".", 2)[0].removeprefix("base_model.model.") for k in result.adapter}
    assert names == {f"model.layers.0.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")}
    assert result.adapter["base_model.model.model.layers.0.mlp.up_proj.lora_A.int8"].dtype \
        is torch.int8
    m = result.metrics["lorc"]
    assert m["residual_sq"] < m["error_sq"] and 0 < m["storage_error_sq"]
    assert result.folder_exports()[lorc_block.STATE_FOLDER] is result.adapter


@pytest.mark.e2e
def test_adapter_bits_count_in_the_budget(tiny_model):
    parts = open_model(tiny_model("llama"), "float32")
    q = quantization(bits=2, group_size=16, lorc={"rank": 4})
    bits = lorc_block.model_bits(parts, q)
    per_block = sum(4 * (r + c) * 16 for r, c in [(64, 64), (32, 64), (32, 64), (64, 64),
                                                   (128, 64), (128, 64), (64, 128)])
    assert bits["lorc"] == pytest.approx(4 * per_block / bits["quantized_weights"])
    assert bits["total"] == pytest.approx(bits["weights"] + bits["lorc"])
    budget = {"average_bits": 2.1, "choices": [2, 3, 4]}
    check_feasible(parts, quantization(bits=2, budget=budget, lorc={"rank": 4}))
    with pytest.raises(ConfigError, match="plus the LoRC adapter"):
        check_feasible(parts, quantization(bits=2, budget=budget,
                                           lorc={"rank": 4, "count_in_budget": True}))


@pytest.mark.parametrize("without", [True, False])
def test_the_evaluation_without_the_adapter_is_a_second_pass_eval_without_lorc_can_skip(
        monkeypatch, tmp_path, without):
    from cluster import evaluation
    passes = []

    def stream_perplexity(stages, model, windows, what, abits, adapter=None):
        passes.append((what, adapter))
        return {"perplexity": 3.0 if adapter else 4.0, "windows": 2, "tokens": 6,
                "seconds": 0.0}

    monkeypatch.setattr(evaluation, "stream_perplexity", stream_perplexity)
    (tmp_path / "lorc").mkdir()
    (tmp_path / "lorc" / "adapter_config.json").write_text("{}")
    config = build_config(RunConfig, {
        "model": {"path": "m"}, "output": str(tmp_path),
        "quantization": {"method": "rtn", "lorc": {"rank": 4}},
        "eval": {"fp": False, "without_lorc": without}})
    got = evaluation.evaluate_run(None, config, "m", torch.zeros(2, 4, dtype=torch.long))
    adapter = str(tmp_path / "lorc")
    assert passes == [("quantized", adapter)] + (
        [("quantized without lorc", None)] if without else [])
    assert got["quantized"] == 3.0
    assert got.get("quantized_without_lorc") == (4.0 if without else None)
    assert ("quantized_without_lorc" in got) is without
