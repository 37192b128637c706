"""CVXQ's bias correction: b <- b - (Wq - W) E[x] on the linears that have a bias."""
from __future__ import annotations

import pytest
import torch
from block_helpers import quantization, stream

from pipeline import block_pass
from pipeline.config import ConfigError, ExportFormat
from pipeline.formats import AffineFormat
from pipeline.formats.compressed_tensors import decompress_linear
from pipeline.model_parts import run_block
from pipeline.plan import open_model
from pipeline.reconstruct import input_hooks


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_bias_correction_restores_the_mean_output(tiny_model, method):
    """OPT (biases everywhere): after correction the first linear's mean output over the
    quantized stream equals the FP linear's on the same inputs; the block's error drops; a
    model without biases is left alone and says so."""
    parts = open_model(tiny_model("opt"), "float32")
    store, fp = stream(parts, n=8)
    results = {}
    for correct in (False, True):
        q = quantization(bits=3, group_size=16, method=method, bias_correction=correct)
        results[correct] = block_pass.quantize_block(
            parts, 0, fp, fp, q, [ExportFormat.COMPRESSED_TENSORS], store)
    assert results[True].metrics["bias_corrected"] == 6  # q, k, v, out, fc1, fc2
    assert results[True].metrics["output_mse"] < results[False].metrics["output_mse"]
    exported = results[True].exports[ExportFormat.COMPRESSED_TENSORS]
    block = parts.load_block(0)
    seen = []
    with torch.no_grad(), input_hooks(block, ["self_attn.q_proj"],
                                      lambda _n, x: seen.append(x.reshape(-1, x.shape[-1]))):
        for h in fp:
            run_block(parts, block, store.get(h))
    x = torch.cat(seen).double()
    q_proj = block.get_submodule("self_attn.q_proj")
    target = (x @ q_proj.weight.double().T + q_proj.bias.double()).mean(0)
    name = "model.decoder.layers.0.self_attn.q_proj"
    w_q = decompress_linear({k.removeprefix(f"{name}."): v for k, v in exported.items()
                             if k.startswith(f"{name}.weight")},
                            AffineFormat(3, 16), torch.float64)
    corrected = (x @ w_q.T + exported[f"{name}.bias"].double()).mean(0)
    uncorrected = (x @ w_q.T + q_proj.bias.double()).mean(0)
    assert (corrected - target).abs().max() < 1e-5
    assert (uncorrected - target).abs().max() > 1e-3
    llama = open_model(tiny_model("llama"), "float32")
    store, fp = stream(llama)
    r = block_pass.quantize_block(llama, 0, fp, fp, quantization(bits=3, bias_correction=True),
                                  [ExportFormat.COMPRESSED_TENSORS], store)
    assert r.metrics["bias_corrected"] == 0


def test_bias_correction_is_refused_with_let():
    with pytest.raises(ConfigError, match=r"quantization.bias_correction.*omniquant.let"):
        quantization(method="omniquant", bias_correction=True, omniquant={"let": True})
