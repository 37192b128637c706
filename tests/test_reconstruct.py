"""Block reconstruction: LET is exact before quantization (GQA, RoPE, biases, OPT), LWC at +inf
is RTN, GPTQ beats RTN on a known Hessian, training errors are clear, every recipe validates."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from block_helpers import quantization, stream

from pipeline import block_pass
from pipeline.config import ConfigError, ExportFormat
from pipeline.formats import AffineFormat
from pipeline.methods.gptq import Hessian, HessianError, gptq_quantize
from pipeline.methods.let import EquivalentTransform
from pipeline.methods.lwc import ClippingFactors
from pipeline.methods.rtn import rtn_quantize
from pipeline.model_parts import run_block
from pipeline.plan import open_model
from pipeline.reconstruct import TrainingError, fake_quant_tokens, input_hooks, input_stats


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def block_and_input(tiny_model, arch: str):
    parts = open_model(tiny_model(arch), "float32")
    block = parts.load_block(1).requires_grad_(False)
    torch.manual_seed(0)
    h = torch.randn(2, 24, parts.hf_config.hidden_size)
    return parts, block, h


def random_let(parts, block, h, shift: bool) -> EquivalentTransform:
    names = list(parts.adapter.linears)
    stats, visit = input_stats(block, names)
    with torch.no_grad(), input_hooks(block, names, visit):
        run_block(parts, block, h)
    let = EquivalentTransform(block, parts.adapter, parts.hf_config, stats, 0.5, shift=shift)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in let.scale_parameters():  # far from the init, so every term matters
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(p * torch.exp(0.5 * noise) if p.abs().min() > 0 else noise)
    return let


@pytest.mark.parametrize("arch,shift", [("llama", False), ("qwen2", False), ("opt", False),
                                        ("opt", True), ("mistral", False), ("qwen3", False)])
def test_let_folding_is_exact(tiny_model, arch, shift):
    parts, block, h = block_and_input(tiny_model, arch)
    with torch.no_grad():
        reference = run_block(parts, block, h)
        let = random_let(parts, block, h, shift)
        base = {n: p.detach() for n, p in block.named_parameters()}
        transformed = let.transform(base)
        assert rel(run_block(parts, block, h, transformed), reference) < 1e-5
        changed = [n for n in base if not torch.equal(base[n], transformed[n])]
        for name, value in transformed.items():  # fold into the block itself
            block.get_parameter(name).copy_(value)
        assert rel(run_block(parts, block, h), reference) < 1e-5
    # every transform took part: norms, consumers, v/o and (except with a q/k norm) q/k
    assert "self_attn.v_proj.weight" in changed
    assert any(n.endswith("norm.weight") for n in changed)
    assert let.value_out
    assert let.query_key == (arch != "qwen3")
    if arch == "opt" and shift:
        assert let.value_shift and "self_attn.out_proj.bias" in changed


def test_let_gqa_and_rotary_tie_are_what_keep_it_exact(tiny_model):
    """Negative control: the same random q/k scale without the rotary tie breaks Q K^T (so the
    exactness test above can fail), and the v->o scale is sized to the key-value heads."""
    parts, block, h = block_and_input(tiny_model, "llama")
    with torch.no_grad():
        reference = run_block(parts, block, h)
        let = random_let(parts, block, h, False)
        heads = let.heads
        assert heads.key_value < heads.query  # the tiny Llama is GQA
        assert let.scales["value_out"].shape == (heads.key_value * heads.head_dim,)
        assert let.scales["query_key"].shape == (heads.key_value, heads.head_dim // 2)
        let.rotary = False  # pretend there were no RoPE: one free scale per channel
        let.scales["query_key"] = torch.nn.Parameter(
            torch.exp(0.5 * torch.randn(heads.key_value, heads.head_dim)))
        base = {n: p.detach() for n, p in block.named_parameters()}
        assert rel(run_block(parts, block, h, let.transform(base)), reference) > 1e-3


@pytest.mark.parametrize("fmt", [AffineFormat(4, None, False), AffineFormat(3, 16, False),
                                 AffineFormat(4, 32, True), AffineFormat(2, 16, False)])
def test_lwc_at_infinity_is_rtn(fmt):
    torch.manual_seed(0)
    w = torch.randn(24, 64) * 0.1
    clip = ClippingFactors(w.shape, fmt, math.inf)
    fake, codes, qparams = clip.export(w, torch.float32)
    rfake, rcodes, rparams = rtn_quantize(w, fmt)
    assert torch.equal(codes, rcodes) and torch.equal(fake, rfake)
    assert torch.equal(qparams.scale, rparams.scale)
    assert torch.equal(qparams.zero_point, rparams.zero_point)
    assert torch.equal(clip.fake_quantize(w).detach(), rfake)


@pytest.mark.parametrize("fmt", [AffineFormat(4, None, False), AffineFormat(3, 16, False),
                                 AffineFormat(4, 32, True)])
def test_direct_clipping_factors(fmt):
    """Direct factors: at infinity (factor 1) RTN; they equal the sigmoid factors they start
    from; a step out of [0, 1] is clamped back."""
    torch.manual_seed(0)
    w = torch.randn(24, 64) * 0.1
    rfake = rtn_quantize(w, fmt)[0]
    assert torch.equal(ClippingFactors(w.shape, fmt, math.inf, direct=True).export(
        w, torch.float32)[0], rfake)
    direct, sigmoid = (ClippingFactors(w.shape, fmt, 2.0, direct=d) for d in (True, False))
    assert torch.allclose(direct.fake_quantize(w), sigmoid.fake_quantize(w), atol=1e-6)
    assert not torch.equal(direct.export(w, torch.float32)[1], rtn_quantize(w, fmt)[1])
    loss = direct.fake_quantize(w).sub(w).pow(2).sum()
    loss.backward()
    assert direct.up.grad is not None and direct.up.grad.abs().sum() > 0
    with torch.no_grad():
        direct.up.add_(1.0)
        direct.low.sub_(2.0)
    direct.clamp_()
    assert direct.up.max() == 1 and direct.low.min() == 0


def test_direct_clipping_with_sign_gradients_moves_the_clipping(tiny_model):
    """With sign gradients at AutoRound's rate, direct factors started near 1 move where
    sigmoid ones started at the same point barely do, and the block error drops further."""
    parts = open_model(tiny_model("llama"), "float32")
    store, fp = stream(parts, n=8)
    errors = {}
    for param in ("sigmoid", "direct"):
        q = quantization(bits=3, group_size=16, method="omniquant",
                         omniquant={"epochs": 4, "lwc_init": 8.0, "lwc_lr": 5e-3,
                                    "optimizer": "signsgd", "clip_param": param})
        errors[param] = block_pass.quantize_block(
            parts, 0, fp, fp, q, [ExportFormat.COMPRESSED_TENSORS], store).metrics["output_mse"]
    assert errors["direct"] < 0.95 * errors["sigmoid"]


def test_lwc_learns_through_the_scale_only():
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    clip = ClippingFactors(w.shape, AffineFormat(3, 16), 4.0)
    x = torch.randn(64, 32)
    loss = ((x @ clip.fake_quantize(w).T - x @ w.T) ** 2).mean()
    loss.backward()
    assert clip.up.grad is not None and clip.up.grad.abs().sum() > 0
    assert clip.low.grad is not None and clip.low.grad.abs().sum() > 0
    _, zero = clip.qparams(w)
    assert not zero.requires_grad


@pytest.mark.parametrize("fmt", [AffineFormat(3, None), AffineFormat(3, 32),
                                 AffineFormat(4, 32, True)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_a_known_hessian(fmt, act_order):
    torch.manual_seed(0)
    x = torch.randn(4096, 128) @ torch.randn(128, 128) * 0.3 + torch.randn(128)
    w = torch.randn(64, 128)
    h = Hessian(128)
    h.add(x)
    result = gptq_quantize(w, h.value(), fmt, act_order=act_order)
    rtn, _, _ = rtn_quantize(w, fmt)

    def output_error(wq: torch.Tensor) -> float:
        return ((x @ (w - wq).T) ** 2).mean().item()

    assert output_error(result.weight) < 0.7 * output_error(rtn)
    # the weights are exactly the codes' dequantized values, on the format's grid
    assert result.codes.min() >= fmt.qmin and result.codes.max() <= fmt.qmax
    from pipeline.formats import dequantize
    assert torch.equal(dequantize(result.codes, result.qparams, fmt), result.weight)


def test_gptq_raises_damping_until_it_factorizes():
    h = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.02], dtype=torch.float64))
    w = torch.randn(4, 4)
    result = gptq_quantize(w, h, AffineFormat(4), damp=0.01)
    assert result.damp == pytest.approx(0.1)
    with pytest.raises(HessianError, match="damping"):
        gptq_quantize(w, -torch.eye(4, dtype=torch.float64), AffineFormat(4), damp=0.01)


def test_activation_fake_quant_per_token():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16) * torch.linspace(0.1, 10, 5).view(1, 5, 1)
    y = fake_quant_tokens(x, 8)
    assert rel(y, x) < 0.02 and rel(fake_quant_tokens(x, 4), x) > rel(y, x)
    for t in range(5):  # each token has its own grid: at most 2^8 levels
        assert torch.unique(y[0, t]).numel() <= 256


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_omniquant_training_lowers_the_block_error(tiny_model, arch):
    parts = open_model(tiny_model(arch), "float32")
    store, fp = stream(parts)
    results = {}
    for name, q in {"rtn": quantization(bits=3, group_size=16),
                    "lwc+let": quantization(bits=3, group_size=16, method="omniquant",
                                            omniquant={"epochs": 3, "let": True,
                                                       "lwc_lr": 0.05, "let_lr": 0.01})}.items():
        r = block_pass.quantize_block(parts, 0, fp, fp, q, [ExportFormat.COMPRESSED_TENSORS],
                                      store)
        results[name] = r.metrics
    trained = results["lwc+let"]
    assert trained["loss_after"] < trained["loss_before"]
    assert trained["output_mse"] < results["rtn"]["output_mse"]


def test_gptq_rounding_on_the_learned_grid(tiny_model):
    """rounding: gptq keeps the learned grid (same scales and zero points as nearest rounding)
    and only changes the codes, lowering the block's error."""
    parts = open_model(tiny_model("llama"), "float32")
    store, fp = stream(parts, n=8)
    exports = {}
    for rounding in ("nearest", "gptq"):
        q = quantization(bits=3, group_size=16, method="omniquant",
                         omniquant={"epochs": 1, "rounding": rounding})
        r = block_pass.quantize_block(parts, 0, fp, fp, q, [ExportFormat.COMPRESSED_TENSORS],
                                      store)
        exports[rounding] = (r.exports[ExportFormat.COMPRESSED_TENSORS], r.metrics)
    near, gptq = exports["nearest"][0], exports["gptq"][0]
    scales = [n for n in near if n.endswith(("weight_scale", "weight_zero_point"))]
    assert scales and all(torch.equal(near[n], gptq[n]) for n in scales)
    packed = [n for n in near if n.endswith("weight_packed")]
    assert any(not torch.equal(near[n], gptq[n]) for n in packed)
    assert exports["gptq"][1]["output_mse"] < exports["nearest"][1]["output_mse"]


def test_a_nan_loss_stops_the_block_with_a_clear_error(tiny_model):
    parts = open_model(tiny_model("llama"), "float32")
    store, fp = stream(parts)
    bad = [store.put(store.get(fp[0]).clone().fill_(float("nan"))), fp[1]]
    with pytest.raises(TrainingError,
                       match=r"block 1/4 \(model.layers.0\): the reconstruction loss became nan"):
        block_pass.quantize_block(parts, 0, fp, bad, quantization(method="omniquant",
                                                                   omniquant={"epochs": 1}),
                                  [ExportFormat.COMPRESSED_TENSORS], store)


class FreezingGroup:
    """A second worker whose gradients cancel ours: every step's summed gradients are zero."""

    rank, world, wait_seconds = 0, 2, 0.0

    def __init__(self):
        self.steps = []

    def sum_(self, tensors):
        if len(tensors) > 1:  # a training step: the gradients, then seen flags and loss
            self.steps.append(len(tensors) - 1)
            for t in tensors[:-1]:
                t.zero_()

    def max_(self, tensors):
        pass

    def min_(self, tensors):
        pass


def test_the_collective_runs_before_every_step(tiny_model):
    parts = open_model(tiny_model("llama"), "float32")
    store, fp = stream(parts)
    group = FreezingGroup()
    q = quantization(method="omniquant", bits=3, group_size=16,
                     omniquant={"epochs": 2, "let": True, "batch_size": 2})
    r = block_pass.quantize_block(parts, 0, fp, fp, q, [ExportFormat.COMPRESSED_TENSORS], store,
                                  group)
    assert len(group.steps) == 4 and all(n > 0 for n in group.steps)  # 4 windows / 2 x 2 epochs
    assert r.metrics["loss_after"] == pytest.approx(r.metrics["loss_before"], rel=1e-6)


def test_steps_replace_epochs_and_can_end_a_pass_early(tiny_model):
    """`steps` equal to epochs x steps per pass is the epochs run bit for bit (the learning-rate
    schedule included); fewer steps stop inside a pass, and every step goes through the
    collective."""
    parts = open_model(tiny_model("llama"), "float32")
    store, fp = stream(parts)  # 4 windows

    def run(**settings):
        group = CountingGroup()
        q = quantization(method="omniquant", bits=3, group_size=16,
                         omniquant={"let": True, "optimizer": "signsgd", "lwc_lr": 0.05,
                                    "batch_size": 1, **settings})
        r = block_pass.quantize_block(parts, 0, fp, fp, q, [ExportFormat.COMPRESSED_TENSORS],
                                      store, group)
        return r, len(group.steps)

    by_epochs, n = run(epochs=2)
    by_steps, m = run(steps=8, epochs=5)  # steps wins over epochs
    assert n == m == 8 and by_steps.metrics["steps"] == 8 and by_steps.metrics["epochs"] == 2
    ct = ExportFormat.COMPRESSED_TENSORS
    assert all(torch.equal(t, by_steps.exports[ct][k]) for k, t in by_epochs.exports[ct].items())
    short, k = run(steps=6)  # one pass and a half
    assert k == 6 and short.metrics["epochs"] == 2 and short.metrics["steps"] == 6
    assert any(not torch.equal(t, short.exports[ct][k]) for k, t in by_epochs.exports[ct].items())
    assert short.metrics["loss_after"] < short.metrics["loss_before"]
    none, k = run(steps=0)
    assert k == 0 and none.metrics["epochs"] == 0


class CountingGroup(FreezingGroup):
    """A group whose other worker adds nothing: counts the training steps, changes nothing."""

    def sum_(self, tensors):
        if len(tensors) > 1:
            self.steps.append(len(tensors) - 1)


def test_steps_count_in_the_cost_model_and_window_passes():
    q = quantization(method="omniquant", omniquant={"batch_size": 2, "epochs": 3})
    assert q.omniquant.total_steps(128) == 192 and q.omniquant.window_passes(128) == 3
    q = quantization(method="omniquant", omniquant={"batch_size": 1, "steps": 192})
    assert q.omniquant.total_steps(128) == 192 and q.omniquant.window_passes(128) == 1.5
    q = quantization(method="omniquant", omniquant={"batch_size": 2, "steps": 65})
    assert q.omniquant.window_passes(127) == pytest.approx(1 + 2 / 127)


def test_weight_activation_quantization_path(tiny_model):
    parts = open_model(tiny_model("llama"), "float32")
    store, fp = stream(parts)
    errors = {}
    for abits in (16, 8, 4):
        q = quantization(bits=4, abits=abits)
        errors[abits] = block_pass.quantize_block(
            parts, 0, fp, fp, q, [ExportFormat.COMPRESSED_TENSORS], store).metrics["output_mse"]
    assert errors[16] < errors[8] < errors[4]


def test_method_settings_are_validated():
    with pytest.raises(ConfigError, match="quantization.method: 'awq' is not allowed; "
                                          "choose one of rtn, gptq, omniquant"):
        quantization(method="awq")
    with pytest.raises(ConfigError, match="quantization.omniquant: lwc and let are both false"):
        quantization(method="omniquant", omniquant={"lwc": False})
    with pytest.raises(ConfigError, match="quantization.abits: 3"):
        quantization(abits=3)
    with pytest.raises(ConfigError, match="quantization.gptq.damp"):
        quantization(gptq={"damp": 0})
    with pytest.raises(ConfigError, match="quantization.omniquant.epochs"):
        quantization(omniquant={"epochs": -1})
    for bad in (-1, 2.5, "many"):
        with pytest.raises(ConfigError, match="quantization.omniquant.steps"):
            quantization(method="omniquant", omniquant={"steps": bad})


def test_every_bundled_recipe_validates():
    from jobs.recipes import CONFIG_DIR, load_recipe

    names = sorted(p.stem for p in Path(CONFIG_DIR).glob("*.yaml"))
    for scheme in ("w4", "w3g64", "w2g64"):
        for method in ("gptq", "omniquant"):
            assert f"p1-{method}-{scheme}" in names
    assert "p1-omniquant-w4a4" in names
    for name in names:
        config = load_recipe(name)
        assert config.quantization.bits in (2, 3, 4, 8)


def test_learned_rounding_exports_what_it_trained():
    """With a learned offset the exported codes are round(w / s + offset) on the learned grid,
    the fake-quant forward uses the same codes, and a zero offset is plain rounding."""
    torch.manual_seed(0)
    w = torch.randn(16, 64) * 0.1
    fmt = AffineFormat(3, 16)
    clip = ClippingFactors(w.shape, fmt, 4.0, learn_rounding=True)
    assert torch.equal(clip.export(w, torch.float32)[1],
                       ClippingFactors(w.shape, fmt, 4.0).export(w, torch.float32)[1])
    with torch.no_grad():
        clip.offset.uniform_(-0.5, 0.5)
    fake, _codes, _qparams = clip.export(w, torch.float32)
    assert torch.allclose(clip.fake_quantize(w).detach(), fake, atol=1e-7)
    loss = clip.fake_quantize(w).pow(2).sum()
    loss.backward()
    assert clip.offset.grad is not None and clip.offset.grad.abs().sum() > 0
    clip.offset.data.fill_(3.0)
    clip.clamp_()
    assert clip.offset.max() == 0.5


def test_learned_rounding_lowers_the_block_error(tiny_model):
    parts = open_model(tiny_model("llama"), "float32")
    store, fp = stream(parts, n=8)
    errors = {}
    for rounding in ("nearest", "learned"):
        q = quantization(bits=3, group_size=16, method="omniquant",
                         omniquant={"epochs": 3, "rounding": rounding, "round_lr": 0.01})
        errors[rounding] = block_pass.quantize_block(
            parts, 0, fp, fp, q, [ExportFormat.COMPRESSED_TENSORS], store).metrics["output_mse"]
    assert errors["learned"] < errors["nearest"]
