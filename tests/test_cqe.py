"""CQE+: singular-value diagonal expansion (SDE) and cross-layer learning (CL)."""
from __future__ import annotations

import pytest
import torch
from block_helpers import quantization, stream

from pipeline import block_pass, reconstruct
from pipeline.config import ConfigError, CrossLayerConfig, ExportFormat
from pipeline.methods import learnable
from pipeline.methods.cross_layer import Downstream
from pipeline.methods.sde import SingularExpansion
from pipeline.plan import open_model
from pipeline.schemes import block_formats


def randomize_(e: SingularExpansion, seed: int = 0, size: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in e.learnable():
            p.copy_(torch.randn(p.shape, generator=g) * size)


@pytest.mark.unit
@pytest.mark.parametrize("band,block,relative", [(0, 0, False), (1, 0, True), (2, 3, True),
                                                 (1, 5, False)])
def test_expanded_weight_is_u_diag_s_plus_delta_vh(band, block, relative):
    torch.manual_seed(0)
    w = torch.randn(12, 20)
    e = SingularExpansion(w, band, block, relative)
    assert torch.equal(e.expand(w), w)  # Δ = 0: the weight itself, bit for bit
    randomize_(e)
    delta = e.matrix()
    assert delta.shape == (12, 12)
    # only the band and the top-left block are nonzero
    i, j = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    outside = ((i - j).abs() > band) & ~((i < block) & (j < block))
    assert not delta[outside].any()
    expected = e.u @ (torch.diag(e.s) + delta) @ e.vh
    assert torch.allclose(e.expand(w), expected, atol=1e-5)
    assert torch.allclose(e.u_delta(), e.u @ delta, atol=1e-6)
    # the penalty's measure is the weight's relative squared change
    change = (e.weight_change().double().norm() / w.double().norm()) ** 2
    assert e.relative_change().item() == pytest.approx(change.item(), rel=1e-4)


@pytest.mark.unit
def test_band_zero_without_block_is_lsi():
    """LSI: U diag(S + I') Vh with a learnable vector I' (absolute parametrization)."""
    torch.manual_seed(1)
    w = torch.randn(16, 10)
    e = SingularExpansion(w, band=0, block=0, relative=False)
    assert [p.shape for p in e.learnable()] == [torch.Size([10])]
    lsi = torch.randn(10) * 0.1
    with torch.no_grad():
        e.diagonal.copy_(lsi)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    assert torch.allclose(e.expand(w), u @ torch.diag(s + lsi) @ vh, atol=1e-5)


@pytest.mark.unit
def test_gradients_reach_every_part_of_delta_through_the_quantizer():
    from pipeline.formats import AffineFormat
    from pipeline.methods.lwc import ClippingFactors

    torch.manual_seed(2)
    w = torch.randn(8, 16)
    e = SingularExpansion(w, band=1, block=2)
    clip = ClippingFactors(w.shape, AffineFormat(3, 8, False), 4.0)
    x = torch.randn(5, 16)
    target = x @ w.T
    loss = ((x @ clip.fake_quantize(e.expand(w)).T - target) ** 2).mean()
    loss.backward()
    for p in e.learnable():
        assert p.grad is not None and p.grad.abs().sum() > 0


def _config(**omni):
    return quantization(bits=3, group_size=16, method="omniquant",
                        omniquant={"epochs": 2, "batch_size": 2, "rounding": "learned",
                                   "optimizer": "signsgd", "lwc_lr": 5e-3, "round_lr": 5e-3,
                                   "clip_param": "direct", "lwc_init": 8.0, "let": True,
                                   "keep_best": True, **omni})


@pytest.mark.unit
def test_sde_at_zero_gives_the_host_methods_block_bit_for_bit(tiny_model):
    """Before any step, the quantizer sees exactly the host method's tensors; with no step
    (epochs 0) the exported block is the host's, byte for byte."""
    parts = open_model(tiny_model("llama"), "float32")
    store, fp = stream(parts, n=4)
    block = parts.load_block(0)
    formats = block_formats(parts, 0, _config())
    names = reconstruct.quantized_names(formats)
    stats, visit = reconstruct.input_stats(block, names)
    with torch.no_grad(), reconstruct.input_hooks(block, names, visit):
        for h in fp:
            block_pass._run(parts, block, store, h)
    host = learnable.BlockQuantizer(parts, block, formats, stats, _config().omniquant, 16)
    sde_cfg = _config(sde={"band": 2, "block": 4}).omniquant
    expanded = learnable.BlockQuantizer(parts, block, formats, stats, sde_cfg, 16)
    a, b = host.tensors(), expanded.tensors()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    results = [block_pass.quantize_block(parts, 0, fp, fp, _config(epochs=0, **extra),
                                         [ExportFormat.COMPRESSED_TENSORS], store)
               for extra in ({}, {"sde": {"band": 1}})]
    host_t, sde_t = (r.exports[ExportFormat.COMPRESSED_TENSORS] for r in results)
    assert host_t.keys() == sde_t.keys()
    assert all(torch.equal(host_t[k], sde_t[k]) for k in host_t)


@pytest.mark.unit
def test_sde_trains_and_is_materialized(tiny_model):
    """With SDE the block still trains; Δ moved (the report says how far) and the exported
    weights are the quantized expanded weights: plain tensors, nothing of the SVD left."""
    parts = open_model(tiny_model("llama"), "float32")
    store, fp = stream(parts, n=8)
    base = block_pass.quantize_block(parts, 0, fp, fp, _config(),
                                     [ExportFormat.FAKE_QUANT], store)
    r = block_pass.quantize_block(parts, 0, fp, fp,
                                  _config(sde={"band": 1, "block": 2, "lr": 5e-3,
                                               "penalty": 0.1}),
                                  [ExportFormat.FAKE_QUANT], store)
    assert r.metrics["loss_after"] < 0.9 * r.metrics["loss_before"]
    assert 0 < r.metrics["sde_relative_change"] < 0.2
    assert "sde_relative_change" not in base.metrics
    exported = r.exports[ExportFormat.FAKE_QUANT]
    assert exported.keys() == base.exports[ExportFormat.FAKE_QUANT].keys()
    assert not any(k.endswith((".u", ".vh", ".s")) for k in exported)
    assert any(not torch.equal(exported[k], base.exports[ExportFormat.FAKE_QUANT][k])
               for k in exported)


@pytest.mark.unit
def test_cross_layer_at_weight_zero_is_the_plain_loss_and_reads_the_next_block(tiny_model):
    parts = open_model(tiny_model("llama"), "float32")
    store, fp = stream(parts, n=4)
    block = parts.load_block(0).float()
    x = store.get(fp[0])
    with torch.no_grad():
        y = block_pass._run(parts, block, store, fp[0])
    noisy = x + 0.01 * torch.randn_like(x)
    down = Downstream.load(parts, 0, CrossLayerConfig(weight=0.0, depth=2))
    assert down.indices == [1, 2][: parts.num_blocks - 1]
    with torch.no_grad():
        targets, h = [], y
        for b in down.blocks:
            h = block_pass.run_block(parts, b, h)
            targets.append(h)
        plain = reconstruct.block_loss(parts, block, None, [noisy, y])
        weighted0 = reconstruct.block_loss(parts, block, None, [noisy, y, *targets], down)
        down.weight = 1.0
        weighted1 = reconstruct.block_loss(parts, block, None, [noisy, y, *targets], down)
    assert weighted0.item() == plain.item()
    assert weighted1.item() > plain.item()
    # the downstream blocks are the model's own, read from storage, and frozen
    stored = parts.load_block(1)
    for (name, p), q in zip(down.blocks[0].named_parameters(), stored.parameters(),
                            strict=True):
        assert torch.equal(p, q.float()), name
        assert not p.requires_grad


@pytest.mark.unit
def test_cross_layer_trains_against_the_next_blocks(tiny_model, monkeypatch):
    """Block 0 with CL reads block 1 (only) from storage; the run records it; the last block
    has no block after it and trains on its own loss."""
    parts = open_model(tiny_model("llama"), "float32")
    store, fp = stream(parts, n=8)
    loaded = []
    real = parts.load_block
    monkeypatch.setattr(parts, "load_block", lambda i: loaded.append(i) or real(i))
    cfg = _config(cross_layer={"weight": 1.0, "depth": 1})
    r = block_pass.quantize_block(parts, 0, fp, fp, cfg, [ExportFormat.FAKE_QUANT], store)
    assert loaded == [0, 1]
    assert r.metrics["cross_layer_blocks"] == [1]
    assert r.metrics["loss_after"] < r.metrics["loss_before"]
    last = parts.num_blocks - 1
    loaded.clear()
    r = block_pass.quantize_block(parts, last, fp, fp, cfg, [ExportFormat.FAKE_QUANT], store)
    assert loaded == [last] and r.metrics["cross_layer_blocks"] == []


@pytest.mark.unit
@pytest.mark.parametrize("change,field", [
    ({"sde": {"band": -1}}, "quantization.omniquant.sde.band"),
    ({"sde": {"block": 1.5}}, "quantization.omniquant.sde.block"),
    ({"sde": {"lr": 0}}, "quantization.omniquant.sde.lr"),
    ({"cross_layer": {"depth": 3}}, "quantization.omniquant.cross_layer.depth"),
    ({"cross_layer": {"weight": -1}}, "quantization.omniquant.cross_layer.weight"),
    ({"sde": {"band": 1}, "let": False, "round_init": "gptq"},
     "quantization.omniquant.round_init"),
])
def test_bad_settings_are_refused_naming_the_field(change, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _config(**change)
