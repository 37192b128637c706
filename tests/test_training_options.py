"""OmniQuant training options: AutoRound's sign-gradient optimizer, keeping the best step,
learned rounding started at GPTQ's codes."""
from __future__ import annotations

import pytest
import torch
from block_helpers import quantization, stream

from pipeline import block_pass
from pipeline.config import ConfigError, ExportFormat
from pipeline.plan import open_model


def test_signsgd_steps_by_the_sign_with_a_linear_decay():
    from pipeline.config import OmniQuantConfig, Optimizer
    from pipeline.training.optimizer import make_optimizer

    p = torch.nn.Parameter(torch.zeros(3))
    cfg = OmniQuantConfig(optimizer=Optimizer.SIGNSGD)
    optimizer, schedule = make_optimizer([{"params": [p], "lr": 0.1}], cfg, lambda: 4)
    for _ in range(4):
        p.grad = torch.tensor([2.0, -0.001, 0.0])
        optimizer.step()
        schedule.step()
    # lr 0.1, 0.075, 0.05, 0.025: the gradient's size does not matter, only its sign
    assert torch.allclose(p.detach(), torch.tensor([-0.25, 0.25, 0.0]))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)


def test_keep_best_restores_the_lowest_loss_parameters(tiny_model):
    """With a learning rate far too high the last step's parameters are bad; keep_best keeps
    the best step's (here the untrained start), so the block is no worse than RTN."""
    parts = open_model(tiny_model("llama"), "float32")
    store, fp = stream(parts, n=8)
    mse = {}
    for keep in (False, True):
        q = quantization(bits=3, group_size=16, method="omniquant",
                         omniquant={"epochs": 2, "batch_size": 2, "rounding": "learned",
                                    "lwc_lr": 5.0, "round_lr": 5.0, "keep_best": keep,
                                    "optimizer": "signsgd", "lwc_init": 2.0})
        r = block_pass.quantize_block(parts, 0, fp, fp, q, [ExportFormat.COMPRESSED_TENSORS],
                                      store)
        mse[keep] = r.metrics
    assert "best_train_loss" in mse[True] and "best_train_loss" not in mse[False]
    assert mse[True]["output_mse"] < mse[False]["output_mse"]
    assert mse[True]["loss_after"] <= mse[True]["loss_before"] * 1.05


@pytest.mark.parametrize("cross_layer", [False, True])
@pytest.mark.parametrize("lr", [5.0, 0.05])
def test_keep_best_every_judges_the_parameters_on_a_fixed_set(tiny_model, cross_layer, lr):
    """keep_best_every: the parameters are judged on the probe's windows (the start, every 3
    steps and after the last) rather than each step on its own batch; the kept ones are
    restored, so the block ends where its best check was, never worse than the start there
    (a rate far too high keeps the start here, a sane one the last step). Under cross-layer
    learning the check includes the next block's error."""
    parts = open_model(tiny_model("llama"), "float32")
    store, fp = stream(parts, n=8)
    extra = {"cross_layer": {"weight": 1.0, "depth": 1}} if cross_layer else {}
    q = quantization(bits=3, group_size=16, method="omniquant",
                     omniquant={"epochs": 2, "batch_size": 2, "rounding": "learned",
                                "lwc_lr": lr, "round_lr": lr, "keep_best": True,
                                "keep_best_every": 3, "optimizer": "signsgd", "lwc_init": 2.0,
                                **extra})
    m = block_pass.quantize_block(parts, 0, fp, fp, q, [ExportFormat.COMPRESSED_TENSORS],
                                  store).metrics
    assert m["steps"] == 8 and m["best_checks"] == 4  # the start, steps 3, 6 and 8
    assert m["best_step"] in (0, 3, 6, 8) and "best_train_loss" not in m
    if not cross_layer:  # the start is a check: never worse than the host method's point
        assert m["best_check_loss"] <= m["loss_before"]
        # the kept parameters are the block's (the fold's rounding aside)
        assert m["loss_after"] == pytest.approx(m["best_check_loss"], rel=1e-3)
    else:  # the check adds the next block's error to the block's own
        assert m["best_check_loss"] > 1.01 * m["loss_after"]


def test_keep_best_every_is_checked():
    with pytest.raises(ConfigError, match=r"quantization.omniquant.keep_best_every: 4 needs "
                                          "keep_best: true"):
        quantization(method="omniquant", omniquant={"keep_best_every": 4})
    with pytest.raises(ConfigError, match=r"quantization.omniquant.keep_best_every: -1; must "
                                          "be an integer >= 0"):
        quantization(method="omniquant", omniquant={"keep_best": True, "keep_best_every": -1})


def test_unknown_optimizer_is_refused():
    with pytest.raises(ConfigError, match=r"quantization.omniquant.optimizer.*adamw.*signsgd"):
        quantization(method="omniquant", omniquant={"optimizer": "sgd"})


def test_learned_rounding_can_start_at_gptq_codes(tiny_model):
    """round_init gptq, before any training, exports GPTQ's codes on the same grid (except the
    few beyond the offsets' reach, which are counted)."""
    parts = open_model(tiny_model("llama"), "float32")
    store, fp = stream(parts, n=8)
    out = {}
    for name, omni in {"gptq": {"rounding": "gptq"},
                       "learned": {"rounding": "learned", "round_init": "gptq"},
                       "nearest": {"rounding": "learned"}}.items():
        q = quantization(bits=3, group_size=16, method="omniquant",
                         omniquant={"epochs": 0, **omni})
        r = block_pass.quantize_block(parts, 0, fp, fp, q, [ExportFormat.COMPRESSED_TENSORS],
                                      store)
        out[name] = (r.exports[ExportFormat.COMPRESSED_TENSORS], r.metrics)
    from pipeline.formats.packing import unpack_dense

    def codes(export):
        return torch.cat([unpack_dense(t, 3, int(export[n.replace(
            "weight_packed", "weight_shape")][1]), dim=1).flatten()
            for n, t in sorted(export.items()) if n.endswith("weight_packed")])

    reference = codes(out["gptq"][0])
    assert (codes(out["nearest"][0]) != reference).sum() > 0
    # exactly the codes the offsets cannot reach differ from GPTQ's
    unreached = out["learned"][1]["round_init_unreached"]
    assert (codes(out["learned"][0]) != reference).sum() == unreached
    assert 0 <= unreached < 0.1 * reference.numel()
    assert out["learned"][1]["output_mse"] < out["nearest"][1]["output_mse"]
    with pytest.raises(ConfigError, match="round_init: gptq needs rounding: learned"):
        quantization(method="omniquant", omniquant={"round_init": "gptq"})


def test_bfloat16_autocast_trains_the_block_matmuls_in_bfloat16(tiny_model):
    """autocast bfloat16 (AutoRound's CPU default) runs the block's linears in bfloat16 while
    training, keeps the learned parameters and the exported codes' grid in float32, and still
    trains: the loss falls about as far as in float32, along a different path."""
    parts = open_model(tiny_model("llama"), "float32")
    store, fp = stream(parts, n=8)
    seen: dict[str, set] = {}
    out = {}
    from pipeline import reconstruct

    real = reconstruct.block_loss

    def spy(parts_, block, tensors, batch, *rest):
        loss = real(parts_, block, tensors, batch, *rest)
        seen.setdefault(mode, set()).add(torch.get_autocast_dtype("cpu")
                                         if torch.is_autocast_enabled("cpu") else torch.float32)
        return loss

    for mode in ("float32", "bfloat16"):
        q = quantization(bits=3, group_size=16, method="omniquant",
                         omniquant={"epochs": 2, "batch_size": 2, "rounding": "learned",
                                    "optimizer": "signsgd", "autocast": mode})
        reconstruct.block_loss = spy
        try:
            r = block_pass.quantize_block(parts, 0, fp, fp, q,
                                          [ExportFormat.COMPRESSED_TENSORS], store)
        finally:
            reconstruct.block_loss = real
        out[mode] = r
    assert out["bfloat16"].metrics["train_precision"] == "bfloat16"
    assert out["float32"].metrics["train_precision"] == "float32"
    assert torch.bfloat16 in seen["bfloat16"] and torch.bfloat16 not in seen["float32"]
    for r in out.values():
        assert r.metrics["loss_after"] < 0.9 * r.metrics["loss_before"]
    assert out["bfloat16"].metrics["loss_after"] < 1.2 * out["float32"].metrics["loss_after"]
    a = out["bfloat16"].exports[ExportFormat.COMPRESSED_TENSORS]
    b = out["float32"].exports[ExportFormat.COMPRESSED_TENSORS]
    assert any(not torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match=r"quantization.omniquant.autocast.*bfloat16"):
        quantization(method="omniquant", omniquant={"autocast": "bf16"})


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("offset", [False, True])
def test_fused_fake_quant_matches_autograd_of_the_same_formula(symmetric, offset):
    """LearnedFakeQuant's values and gradients (weight, both factors, the rounding offset)
    equal autograd's through the formula written op by op (float64)."""
    from pipeline.formats import AffineFormat
    from pipeline.methods.lwc import LearnedFakeQuant, round_ste

    torch.manual_seed(0)
    fmt = AffineFormat(bits=3, group_size=8, symmetric=symmetric, full_range=symmetric)
    w = torch.randn(6, 32, dtype=torch.float64, requires_grad=True)
    up = torch.rand(6, 4, dtype=torch.float64).mul(0.5).add(0.5).requires_grad_(True)
    low = torch.rand(6, 4, dtype=torch.float64).mul(0.5).add(0.5).requires_grad_(True)
    v = (torch.rand(6, 32, dtype=torch.float64) - 0.5).requires_grad_(True) if offset else None

    def reference():
        x = w.reshape(6, 4, 8)
        hi = x.amax(-1).clamp(min=0) * up
        lo = x.amin(-1).clamp(max=0) * low
        if symmetric:
            scale = (torch.maximum(hi, -lo) / fmt.scale_divisor).clamp(min=1e-12)
            zero = torch.zeros_like(scale)
        else:
            scale = ((hi - lo) / fmt.qmax).clamp(min=1e-12)
            zero = torch.round(-lo / scale).detach()
        y = x / scale.unsqueeze(-1) + (v.reshape(x.shape) if v is not None else 0)
        q = (round_ste(y) + zero.unsqueeze(-1)).clamp(fmt.qmin, fmt.qmax)
        return ((q - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(w.shape)

    upstream = torch.randn(6, 32, dtype=torch.float64)
    inputs = [w, up, low] + ([v] if v is not None else [])
    ref = reference()
    ref_grads = torch.autograd.grad(ref, inputs, upstream)
    out = LearnedFakeQuant.apply(w, up, low, v, fmt)
    grads = torch.autograd.grad(out, inputs, upstream)
    assert torch.allclose(out, ref, atol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.allclose(g, r, atol=1e-10), (g - r).abs().max()


@pytest.mark.unit
@pytest.mark.parametrize("kernels", [True, False])
def test_auto_precision_follows_the_cpu_bf16_kernels(monkeypatch, caplog, kernels):
    """autocast auto on the CPU: bfloat16 where the CPU has bfloat16 kernels, float32 where
    it has not (bfloat16 there is several times slower); an explicit bfloat16 is kept, with a
    warning only where it is slow; CUDA keeps float16, float32 at 8 bits."""
    from pipeline.config import Autocast
    from pipeline.formats import AffineFormat
    from pipeline.training import precision as training

    monkeypatch.setattr(training, "cpu_has_bf16_kernels", lambda: kernels)
    training._warn_slow_bf16.cache_clear()
    w4, w8 = {"q": AffineFormat(4, None, False)}, {"q": AffineFormat(8, None, False)}
    auto = training.training_precision("cpu", w4, 16, Autocast.AUTO)
    assert auto.dtype is (torch.bfloat16 if kernels else None)
    with caplog.at_level("WARNING"):
        explicit = training.training_precision("cpu", w4, 16, Autocast.BFLOAT16)
    assert explicit.dtype is torch.bfloat16
    assert ("several times slower" in caplog.text) is (not kernels)
    assert training.training_precision("cpu", w4, 16, Autocast.FLOAT32).dtype is None
    assert training.training_precision("cuda:0", w4, 16, Autocast.AUTO).dtype is torch.float16
    assert training.training_precision("cuda:0", w8, 16, Autocast.AUTO).dtype is None


def test_micro_batch_passes_several_windows_at_once_with_the_same_loss(tiny_model):
    """micro_batch 2 runs a step's two windows as one pass: the step's loss is the same mean
    (to float rounding), the training follows the same path closely, and every pass holds
    micro_batch windows; 1 (the default) is one window per pass. Out of [1, batch_size] is
    refused with the field's name."""
    from pipeline import reconstruct

    parts = open_model(tiny_model("llama"), "float32")
    store, fp = stream(parts, n=8)
    real = reconstruct.block_loss
    sizes: dict[int, set] = {}
    out = {}
    for micro in (1, 2):
        def spy(parts_, block, tensors, batch, *rest, _micro=micro):
            sizes.setdefault(_micro, set()).add(int(batch[0].shape[0]))
            return real(parts_, block, tensors, batch, *rest)

        q = quantization(bits=3, group_size=16, method="omniquant",
                         omniquant={"epochs": 2, "batch_size": 2, "micro_batch": micro,
                                    "rounding": "learned", "optimizer": "adamw",
                                    "autocast": "float32"})
        reconstruct.block_loss = spy
        try:
            torch.manual_seed(0)
            out[micro] = block_pass.quantize_block(parts, 0, fp, fp, q,
                                                   [ExportFormat.COMPRESSED_TENSORS], store)
        finally:
            reconstruct.block_loss = real
    assert sizes == {1: {1, 8}, 2: {2, 8}}  # 8: the loss probes before and after, at once
    a, b = out[1].metrics, out[2].metrics
    assert a["loss_before"] == pytest.approx(b["loss_before"], rel=1e-6)
    assert b["loss_after"] < 0.9 * b["loss_before"]
    assert b["loss_after"] == pytest.approx(a["loss_after"], rel=0.05)
    with pytest.raises(ConfigError, match=r"quantization.omniquant.micro_batch: 3.*batch_size"):
        quantization(method="omniquant", omniquant={"batch_size": 2, "micro_batch": 3})
    with pytest.raises(ConfigError, match=r"quantization.omniquant.micro_batch: 0"):
        quantization(method="omniquant", omniquant={"micro_batch": 0})


def test_stream_autocast_runs_the_stream_passes_in_the_training_precision(tiny_model):
    """stream_autocast: the FP targets and the quantized stream onward are computed under the
    training's bfloat16 autocast (close to float32, not equal); off (the default) they are the
    plain float32 forward, bit for bit; with float32 training it changes nothing."""
    from pipeline.model_parts import run_block

    parts = open_model(tiny_model("llama"), "float32")
    store, fp = stream(parts, n=4)
    with torch.no_grad():
        block = parts.load_block(0)
        plain = [run_block(parts, block, store.get(h)) for h in fp]
    targets = {}
    for name, omni in {"off": {"autocast": "bfloat16"},
                       "on": {"autocast": "bfloat16", "stream_autocast": True},
                       "fp32": {"autocast": "float32", "stream_autocast": True}}.items():
        q = quantization(bits=3, group_size=16, method="omniquant",
                         omniquant={"epochs": 1, "batch_size": 2, **omni})
        r = block_pass.quantize_block(parts, 0, fp, fp, q, [], store)
        targets[name] = [store.get(h) for h in r.fp_out]
        assert all(t.dtype == torch.float32 for t in targets[name])
    for name in ("off", "fp32"):
        assert all(torch.equal(t, p) for t, p in zip(targets[name], plain, strict=True))
    on = torch.cat(targets["on"])
    ref = torch.cat(plain)
    assert not torch.equal(on, ref)
    assert (on - ref).pow(2).sum() / ref.pow(2).sum() < 1e-3
