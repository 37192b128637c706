"""The learned step's speed options: the block's training call compiled (`compile`, and its
eager fallback), the fake-quant compiled into fused loops (`compile_quantizer`), the block in
bfloat16 while training (`cast_block`, `stream_cast_block`)."""

from __future__ import annotations

import pytest
import torch
from block_helpers import quantization, stream

from pipeline import block_pass
from pipeline.config import ExportFormat
from pipeline.formats import AffineFormat
from pipeline.plan import open_model

# a small learned recipe (sign-round with LET) trained on a tiny block in float32
TINY_SIGNROUND = {"epochs": 2, "batch_size": 2, "rounding": "learned", "optimizer": "signsgd",
                  "clip_param": "direct", "let": True, "keep_best": True, "autocast": "float32"}


def _train_tiny_block(parts, store, fp, **options):
    """Block 0 quantized at W3 g16 with TINY_SIGNROUND and `options` on top."""
    q = quantization(bits=3, group_size=16, method="omniquant",
                     omniquant={**TINY_SIGNROUND, **options})
    return block_pass.quantize_block(parts, 0, fp, fp, q, [ExportFormat.COMPRESSED_TENSORS],
                                     store)


def test_compiled_training_matches_eager_and_compiles_once_for_every_block(tiny_model,
                                                                          monkeypatch):
    """compile: the training passes go through torch.compile (here its aot_eager backend:
    the same capture and autograd split, without C++ code generation), train to the eager
    result, and a second block of the same shapes reuses the first block's graphs; activation
    quantization and compile: false stay eager."""
    from torch._dynamo.utils import counters

    from pipeline.config import OmniQuantConfig
    from pipeline.training import compiled as training

    monkeypatch.setattr(training, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    parts = open_model(tiny_model("llama"), "float32")
    store, fp = stream(parts, n=4)
    out = {compile_: _train_tiny_block(parts, store, fp, compile=compile_)
           for compile_ in (False, True)}
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    a, b = out[False].metrics, out[True].metrics
    assert b["train_compiled"] is True and "train_compiled" not in a
    assert b["loss_after"] == pytest.approx(a["loss_after"], rel=1e-3)
    assert b["output_mse"] == pytest.approx(a["output_mse"], rel=1e-3)
    # the next block: the same graphs, no new compilation
    q = quantization(bits=3, group_size=16, method="omniquant",
                     omniquant={**TINY_SIGNROUND, "compile": True})
    nxt = block_pass.quantize_block(parts, 1, out[True].q_out, out[True].fp_out, q,
                                    [ExportFormat.COMPRESSED_TENSORS], store)
    assert nxt.metrics["train_compiled"] is True
    assert counters["stats"]["unique_graphs"] == graphs
    assert training.compiled_block_call(OmniQuantConfig(compile=True), abits=8) is None
    assert training.compiled_block_call(OmniQuantConfig(), abits=16) is None
    torch._dynamo.reset()


def _fake_quant_grads(fmt, learned: bool, weight_grad: bool, direct: bool, fused: bool):
    """The fake-quant of a weight with ties at its groups' extremes (a leaf with a gradient
    when `weight_grad`, as under LET or SDE), and the gradients of a fixed linear loss."""
    from pipeline.methods.lwc import ClippingFactors

    torch.manual_seed(0)
    base = torch.randn(24, 64) * 0.1
    base[3, :8] = base[3].max()       # tied maxima (within one group and across groups)
    base[5, 16:20] = base[5].min()    # tied minima
    base[7, :16] = 0.0                # a group at zero: the range's clamps at 0
    base[9] = -base[9].abs()          # no positive weight in the row
    base[11] = -base[11].abs()
    base[11, ::8] = 0.0               # every group's maximum at the clamp (0), ties
    clip = ClippingFactors(base.shape, fmt, 2.0, learn_rounding=learned, direct=direct,
                           fused=fused)
    with torch.no_grad():
        if direct:
            clip.up.uniform_(0.6, 1.0)
            clip.low.uniform_(0.6, 1.0)
        else:
            clip.up.normal_(1.0, 1.0)
            clip.low.normal_(1.0, 1.0)
        clip.low[2] = clip.up[2]       # symmetric ties of the range
        if learned:
            clip.offset.uniform_(-0.5, 0.5)
    base.requires_grad_(weight_grad)
    out = clip.fake_quantize(base)
    (out * torch.randn(out.shape)).sum().backward()
    grads = {"up": clip.up.grad, "low": clip.low.grad,
             "offset": clip.offset.grad if learned else None,
             "weight": base.grad if weight_grad else None}
    return out.detach(), grads


def test_compiled_training_falls_back_to_eager_when_compiling_fails(tiny_model, monkeypatch,
                                                                     caplog):
    """compile where torch.compile cannot compile (here an unknown backend; on a machine
    without a C++ compiler, inductor): the block trains eagerly to the same result, one
    warning names the option, the report says train_compiled: false."""
    from pipeline.training import compiled as training

    monkeypatch.setattr(training, "COMPILE_BACKEND", "no_such_backend")
    monkeypatch.setattr(training, "_COMPILE_FAILED", [])
    training._compiled.cache_clear()
    parts = open_model(tiny_model("llama"), "float32")
    store, fp = stream(parts, n=4)
    with caplog.at_level("WARNING", logger="pipeline.training.compiled"):
        out = [_train_tiny_block(parts, store, fp, compile=compile_)
               for compile_ in (False, True, True)]
    assert sum("quantization.omniquant.compile" in r.getMessage() for r in caplog.records) == 1
    assert "train_compiled" not in out[0].metrics
    for i in (1, 2):
        assert out[i].metrics["train_compiled"] is False
        assert out[i].metrics["loss_after"] == out[0].metrics["loss_after"]
        assert out[i].metrics["output_mse"] == out[0].metrics["output_mse"]
    training._compiled.cache_clear()


@pytest.mark.parametrize("fmt", [AffineFormat(4), AffineFormat(3, 16),
                                 AffineFormat(2, 16, True),
                                 AffineFormat(4, 32, True, full_range=True)],
                         ids=["w4", "w3g16", "w2g16sym", "w4g32sym_full"])
@pytest.mark.parametrize("learned", [False, True], ids=["nearest", "learned"])
@pytest.mark.parametrize("weight_grad", [False, True], ids=["fixed", "weight"])
def test_the_fused_quantizer_computes_the_eager_ones_values_and_gradients(
        fmt, learned, weight_grad, monkeypatch):
    """compile_quantizer: FusedFakeQuant (its graphs captured by torch.compile, here with the
    eager backend) gives the eager LearnedFakeQuant's output bit for bit and its gradients
    (clipping factors, rounding offsets, the weight's own) to float
    rounding, ties at the groups' extremes and clamps at zero included."""
    from pipeline.methods import lwc

    monkeypatch.setattr(lwc, "FUSED_BACKEND", "eager")
    for direct in (False, True):
        ref, ref_grads = _fake_quant_grads(fmt, learned, weight_grad, direct, fused=False)
        out, grads = _fake_quant_grads(fmt, learned, weight_grad, direct, fused=True)
        assert torch.equal(out, ref)
        for name, g in ref_grads.items():
            if g is None:
                assert grads[name] is None
                continue
            assert g.abs().sum() > 0, name
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
    assert lwc.fused_quantizer_compiled()
    torch._dynamo.reset()


def test_the_fused_quantizer_compiles_with_inductor_and_falls_back_when_it_cannot(
        monkeypatch, caplog):
    """The production backend (inductor's C++ loops) computes the same values; where
    compilation fails the quantizer runs eagerly with one warning and the same values."""
    from pipeline.methods import lwc

    fmt = AffineFormat(4, 32)
    monkeypatch.setattr(lwc, "_FUSED_FAILED", [])
    ref, ref_grads = _fake_quant_grads(fmt, True, True, True, fused=False)
    out, grads = _fake_quant_grads(fmt, True, True, True, fused=True)
    assert lwc.fused_quantizer_compiled()
    assert torch.equal(out, ref)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    monkeypatch.setattr(lwc, "FUSED_BACKEND", "no_such_backend")
    with caplog.at_level("WARNING", logger="pipeline.methods.lwc"):
        out, grads = _fake_quant_grads(AffineFormat(3, 16), True, True, True, fused=True)
        again, _ = _fake_quant_grads(AffineFormat(3, 16), True, True, True, fused=True)
    assert not lwc.fused_quantizer_compiled()
    assert sum("compile_quantizer" in r.getMessage() for r in caplog.records) == 1
    ref, ref_grads = _fake_quant_grads(AffineFormat(3, 16), True, True, True, fused=False)
    assert torch.equal(out, ref) and torch.equal(again, ref)
    torch._dynamo.reset()


def test_the_fused_quantizer_stays_compiled_past_dynamos_recompile_limit(monkeypatch):
    """Every weight shape and format compiles its own pair of functions, which share one code
    object: dynamo's per-code limit (8) must not send the ninth and later ones to eager
    (it did on CUDA, found by benchmarks/cuda_check.py, where the tiny models' shapes on the
    CPU and the GPU passed 8)."""
    from torch._dynamo.utils import counters

    from pipeline.methods import lwc
    from pipeline.methods.lwc import ClippingFactors

    monkeypatch.setattr(lwc, "FUSED_BACKEND", "eager")
    monkeypatch.setattr(lwc, "_FUSED_FAILED", [])
    torch._dynamo.reset()
    lwc._fused_kernels.cache_clear()
    counters.clear()
    shapes = [(4 + i, 32) for i in range(12)]
    # (dynamo's config patched its own way: monkeypatch's undo deletes a config entry)
    with torch._dynamo.config.patch(recompile_limit=8):
        for shape in shapes:
            clip = ClippingFactors(torch.Size(shape), AffineFormat(4, 16), 2.0,
                                   learn_rounding=True, fused=True)
            clip.fake_quantize(torch.randn(shape)).sum().backward()
            assert clip.offset.grad is not None
    # a graph for every shape's forward and its backward: none ran eagerly
    assert counters["stats"]["unique_graphs"] == 2 * len(shapes)
    assert torch._dynamo.config.recompile_limit >= 8
    assert lwc.fused_quantizer_compiled()
    torch._dynamo.reset()
    lwc._fused_kernels.cache_clear()


def test_training_with_the_fused_quantizer_reaches_the_eager_result(tiny_model, monkeypatch):
    """A block trained with compile_quantizer reaches the eager quantizer's result (the
    gradients differ by float rounding only) and its report says the quantizer was
    compiled."""
    from pipeline.methods import lwc

    monkeypatch.setattr(lwc, "FUSED_BACKEND", "eager")
    parts = open_model(tiny_model("llama"), "float32")
    store, fp = stream(parts, n=4)
    out = {fused: _train_tiny_block(parts, store, fp, compile_quantizer=fused).metrics
           for fused in (False, True)}
    assert out[True]["quantizer_compiled"] is True and "quantizer_compiled" not in out[False]
    assert out[True]["loss_after"] == pytest.approx(out[False]["loss_after"], rel=1e-3)
    assert out[True]["output_mse"] == pytest.approx(out[False]["output_mse"], rel=1e-3)
    torch._dynamo.reset()


def test_cast_block_trains_the_block_in_bfloat16_and_stays_close(tiny_model):
    """cast_block with bfloat16 training: the block's weights and activations are cast once
    per step (with stream_cast_block, for the stream passes too), the report says so, and
    the block's error stays close to the float32-activation run's; in float32 training the
    options change nothing."""
    parts = open_model(tiny_model("llama"), "float32")
    store, fp = stream(parts, n=4)
    out = {}
    for autocast in ("bfloat16", "float32"):
        for cast in (False, True):
            for streams in ((False, True) if cast else (False,)):
                out[autocast, cast, streams] = _train_tiny_block(
                    parts, store, fp, stream_autocast=True, autocast=autocast,
                    cast_block=cast, stream_cast_block=streams)
    on, off = out["bfloat16", True, False].metrics, out["bfloat16", False, False].metrics
    assert on["train_block_dtype"] == "bfloat16" and "train_block_dtype" not in off
    assert on["output_mse"] != off["output_mse"]
    assert on["output_mse"] == pytest.approx(off["output_mse"], rel=0.1)

    def targets(key: tuple) -> torch.Tensor:
        return torch.cat([store.get(h) for h in out[key].fp_out])

    # the FP targets: cast_block alone leaves the stream passes as they were; with
    # stream_cast_block they are computed in bfloat16: close to, not equal to, those
    b = targets(("bfloat16", False, False))
    assert torch.equal(targets(("bfloat16", True, False)), b)
    a = targets(("bfloat16", True, True))
    assert a.dtype == torch.float32 and not torch.equal(a, b)
    assert (a - b).norm() / b.norm() < 2e-2
    f_off = out["float32", False, False].metrics
    for streams in (False, True):
        f_on = out["float32", True, streams].metrics
        assert "train_block_dtype" not in f_on
        assert f_on["output_mse"] == f_off["output_mse"]


def test_a_backward_that_fails_to_compile_falls_back_to_eager_in_the_compiled_call(
        monkeypatch, caplog):
    """A backend whose forward compiles but whose backward does not (AOTAutograd lowers the
    backward lazily, at the first backward call, outside the fallback): the failure is met
    in the compiled call, which runs eagerly, and the backward gives eager's gradients."""
    from torch._dynamo.backends.common import aot_autograd

    from pipeline.training import compiled as training

    def no_backward(gm, example_inputs):
        raise RuntimeError("backward compiler unavailable")

    backend = aot_autograd(fw_compiler=lambda gm, example_inputs: gm, bw_compiler=no_backward)
    monkeypatch.setattr(training, "_COMPILE_FAILED", [])

    class Layer(torch.nn.Module):  # own class: with torch.nn.Linear no graph was captured here
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 8))

        def forward(self, x):
            return torch.tanh(x @ self.weight.t())

    torch.manual_seed(0)
    layer = Layer()
    weights = {k: v.detach().clone().requires_grad_(True) for k, v in layer.named_parameters()}
    x = torch.randn(3, 8)
    with caplog.at_level("WARNING", logger="pipeline.training.compiled"):
        out = training._compiled(backend)(layer, weights, (x,))
        out.pow(2).sum().backward()
    eager = {k: v.detach().clone().requires_grad_(True) for k, v in layer.named_parameters()}
    torch.func.functional_call(layer, eager, (x,)).pow(2).sum().backward()
    assert not training.block_call_compiled()
    assert sum("quantization.omniquant.compile" in r.getMessage() for r in caplog.records) == 1
    for k, w in weights.items():
        torch.testing.assert_close(w.grad, eager[k].grad)
    training._compiled.cache_clear()
