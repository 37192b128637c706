"""The data-free path quantizes a slice of rows at a time: the tensors must be those of the
whole-block path, byte for byte, in every layout."""
import pytest
import torch
from block_helpers import quantization

from pipeline import block_pass, data_free
from pipeline.config import ExportFormat
from pipeline.plan import open_model

LAYOUTS = [ExportFormat.COMPRESSED_TENSORS, ExportFormat.GPTQ, ExportFormat.FAKE_QUANT]


@pytest.mark.unit
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("scheme", [{"bits": 4, "group_size": 32}, {"bits": 3, "group_size": None},
                                    {"bits": 2, "group_size": 32, "symmetric": True}])
def test_slices_of_rows_give_the_whole_block_bytes(tiny_model, monkeypatch, arch, scheme):
    parts = open_model(tiny_model(arch))
    q = quantization(method="rtn", **scheme)
    whole = block_pass.quantize_block_weights(parts, 1, q, LAYOUTS)
    monkeypatch.setattr(data_free, "SLICE_VALUES", 32 * 64)  # 32 rows of 64 inputs: 2-4 slices
    sliced = data_free.quantize_block_weights(parts, 1, q, LAYOUTS)
    assert sliced.schemes == whole.schemes
    for layout in LAYOUTS:
        a, b = whole.exports[layout], sliced.exports[layout]
        assert sorted(a) == sorted(b)
        for name in a:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert sliced.metrics["gptq_zero_wraps"] == whole.metrics["gptq_zero_wraps"]
    assert sliced.metrics["data_free"]


@pytest.mark.unit
def test_slice_rows_are_whole_words_of_zero_points():
    for in_features in (64, 576, 8192, 28672, 10**9):
        rows = data_free.slice_rows(28672, in_features)
        assert rows % 32 == 0 and rows >= 32
