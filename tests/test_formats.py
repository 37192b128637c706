import pytest
import torch

from pipeline.formats import (
    AffineFormat,
    choose_qparams,
    dequantize,
    fake_quantize,
    quantize,
    valid_group_sizes,
)

pytestmark = pytest.mark.unit


def test_asymmetric_per_channel_known_answer():
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    fmt = AffineFormat(bits=2)  # grid 0..3
    qp = choose_qparams(w, fmt)
    assert qp.scale.item() == pytest.approx(1.0)  # (2 - (-1)) / 3
    assert qp.zero_point.item() == 1.0
    q = quantize(w, qp, fmt)
    assert q.tolist() == [[0, 1, 1, 3]]  # 0.5 rounds half to even: 0, plus zero point 1
    assert dequantize(q, qp, fmt).tolist() == [[-1.0, 0.0, 0.0, 2.0]]


def test_symmetric_known_answer():
    w = torch.tensor([[-3.0, -1.0, 1.4, 3.0]])
    fmt = AffineFormat(bits=3, symmetric=True)  # grid -4..3, scale = 3/3 = 1
    qp = choose_qparams(w, fmt)
    assert qp.scale.item() == pytest.approx(1.0)
    assert qp.zero_point.item() == 0.0
    assert quantize(w, qp, fmt).tolist() == [[-3, -1, 1, 3]]


def test_full_range_symmetric_uses_every_code():
    # AutoRound's grid: scale = absmax / 2^(b-1); at 2 bits four levels {-2, -1, 0, 1} * 1.5
    w = torch.tensor([[-3.0, -1.4, 1.6, 3.0]])
    fmt = AffineFormat(bits=2, symmetric=True, full_range=True)
    qp = choose_qparams(w, fmt)
    assert qp.scale.item() == pytest.approx(1.5)
    assert quantize(w, qp, fmt).tolist() == [[-2, -1, 1, 1]]  # +3.0 clipped to the top code
    restricted = AffineFormat(bits=2, symmetric=True)  # three levels {-1, 0, 1} * 3
    assert quantize(w, choose_qparams(w, restricted), restricted).tolist() == [[-1, 0, 1, 1]]
    assert restricted == fmt  # same stored layout


def test_symmetric_range_reaches_the_format_from_the_recipe():
    from pipeline.config import ConfigError, QuantizationConfig
    from pipeline.schemes import format_for
    full = QuantizationConfig(bits=3, symmetric=True, symmetric_range="full")
    assert format_for("model.layers.0.mlp.up_proj", full).scale_divisor == 4
    explicit = QuantizationConfig(bits=3, symmetric=True, symmetric_range="restricted")
    assert explicit.symmetric_range is None  # the default, by its name
    assert format_for("x", explicit).scale_divisor == 3
    with pytest.raises(ConfigError, match="quantization.symmetric_range: 'wide'.*full"):
        QuantizationConfig(symmetric_range="wide")


def _norm_error(w, fmt):
    from pipeline.formats.affine import MSE_NORM
    qp = choose_qparams(w, fmt)
    e = (dequantize(quantize(w, qp, fmt), qp, fmt) - w).abs().pow(MSE_NORM)
    return e.reshape(w.shape[0], -1, fmt.group_size or w.shape[1]).sum(-1)


@pytest.mark.parametrize("symmetric,full_range", [(False, False), (True, False), (True, True)])
def test_mse_observer_never_errs_more_than_minmax_and_shrinks_outlier_groups(symmetric,
                                                                               full_range):
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((64, 256))  # heavy tails: outliers
    minmax = AffineFormat(2, 64, symmetric, full_range=full_range)
    mse = AffineFormat(2, 64, symmetric, full_range=full_range, observer="mse")
    assert mse == minmax  # the same stored layout
    before, after = _norm_error(w, minmax), _norm_error(w, mse)
    assert torch.all(after <= before)
    assert float(after.sum()) < 0.95 * float(before.sum())
    shrunk = choose_qparams(w, mse).scale < choose_qparams(w, minmax).scale
    assert 0.5 < float(shrunk.float().mean()) <= 1.0
    assert torch.all(choose_qparams(w, mse).scale <= choose_qparams(w, minmax).scale)


def test_mse_observer_picks_the_best_shrink_factor_per_group():
    """Against a brute-force search written out here: every shrink factor's round trip,
    the first factor with the least |error|^2.4 per group; a group already on a uniform grid
    keeps its min-max range (a tie)."""
    from pipeline.formats.affine import MSE_GRID, MSE_MAX_SHRINK, MSE_NORM
    torch.manual_seed(3)
    w = torch.cat([torch.distributions.StudentT(2.0).sample((5, 32)),
                   torch.tensor([[-1.0, 0.0, 1.0, 2.0] * 8])])
    fmt = AffineFormat(2, 16, observer="mse")
    found = choose_qparams(w, fmt)
    x = w.reshape(6, 2, 16)
    best = torch.full((6, 2), float("inf"))
    expected = torch.zeros(6, 2)
    for k in range(int(MSE_MAX_SHRINK * MSE_GRID)):
        p = 1 - k / MSE_GRID
        lo, hi = x.amin(-1).clamp(max=0) * p, x.amax(-1).clamp(min=0) * p
        s = (hi - lo) / 3
        z = torch.round(-lo / s)
        q = (torch.round(x / s[..., None]) + z[..., None]).clamp(0, 3)
        e = ((q - z[..., None]) * s[..., None] - x).abs().pow(MSE_NORM).sum(-1)
        expected = torch.where(e < best, s, expected)
        best = torch.minimum(e, best)
    assert torch.equal(found.scale, expected)
    assert torch.equal(found.scale[5], torch.ones(2))  # the uniform row: min-max, exact
    assert bool((found.scale[:5] < choose_qparams(w[:5], AffineFormat(2, 16)).scale).any())


def test_mse_search_in_row_slices_gives_the_same_parameters(monkeypatch):
    from pipeline.formats import affine
    torch.manual_seed(1)
    w = torch.randn(37, 128)
    fmt = AffineFormat(3, 32, observer="mse")
    whole = choose_qparams(w, fmt)
    monkeypatch.setattr(affine, "_SEARCH_ELEMENTS", 300)  # 2 rows at a time
    sliced = choose_qparams(w, fmt)
    assert torch.equal(whole.scale, sliced.scale)
    assert torch.equal(whole.zero_point, sliced.zero_point)


def test_observer_reaches_the_format_and_bad_values_are_named():
    from pipeline.config import ConfigError, Observer, QuantizationConfig
    from pipeline.formats import OBSERVERS
    from pipeline.schemes import format_for
    assert {o.value for o in Observer} == set(OBSERVERS)
    from pipeline.config.tree import build_config
    config = build_config(QuantizationConfig, {"method": "gptq", "bits": 2, "group_size": 64,
                                               "observer": "mse"}, "quantization")
    assert format_for("model.layers.0.mlp.up_proj", config).observer == "mse"
    assert format_for("x", QuantizationConfig()).observer == "minmax"
    with pytest.raises(ConfigError, match="quantization.observer: 'max' is not allowed; "
                                          "choose one of minmax, mse"):
        build_config(QuantizationConfig, {"observer": "max"}, "quantization")
    with pytest.raises(ConfigError, match="quantization.observer: mse applies to methods rtn "
                                          "and gptq"):
        build_config(QuantizationConfig, {"method": "omniquant", "observer": "mse"},
                     "quantization")
    with pytest.raises(ValueError, match="observer: 'l1' is not allowed"):
        AffineFormat(4, observer="l1")


def test_gptq_with_the_mse_observer_errs_less_at_two_bits():
    """On a layer with heavy-tailed weights and correlated inputs, GPTQ on the searched grid
    reconstructs the layer's output better than on the min-max grid (act-order and lazy
    groups alike)."""
    from pipeline.methods.gptq import gptq_quantize
    torch.manual_seed(2)
    w = torch.distributions.StudentT(3.0).sample((96, 256)) * 0.02
    x = torch.randn(2048, 256) @ (torch.eye(256) + 0.3 * torch.randn(256, 256) / 16)
    h = (x.T @ x).double() / x.shape[0]

    def output_error(fake):
        e = (fake.double() - w.double())
        return float(torch.einsum("ij,jk,ik->", e, h, e))

    for act_order in (True, False):
        errors = {obs: output_error(gptq_quantize(
            w, h, AffineFormat(2, 64, observer=obs), act_order=act_order).weight)
            for obs in ("minmax", "mse")}
        assert errors["mse"] < 0.9 * errors["minmax"], (act_order, errors)


def test_positive_only_row_keeps_zero_exact():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # min clamped to 0
    fmt = AffineFormat(bits=2)
    qp = choose_qparams(w, fmt)
    assert qp.zero_point.item() == 0.0
    assert qp.scale.item() == pytest.approx(4.0 / 3.0)


def test_groups_have_their_own_scales():
    w = torch.tensor([[0.0, 1.0, 0.0, 100.0]])
    fmt = AffineFormat(bits=4, group_size=2)
    qp = choose_qparams(w, fmt)
    assert qp.scale.shape == (1, 2)
    assert qp.scale[0, 0].item() == pytest.approx(1.0 / 15)
    assert qp.scale[0, 1].item() == pytest.approx(100.0 / 15)
    assert fake_quantize(w, fmt)[0].tolist() == pytest.approx([0.0, 1.0, 0.0, 100.0])


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [None, 16])
def test_round_trip_is_exact_on_grid_points(bits, symmetric, group_size):
    torch.manual_seed(bits)
    w = torch.randn(8, 64)
    fmt = AffineFormat(bits, group_size, symmetric)
    qp = choose_qparams(w, fmt)
    q = quantize(w, qp, fmt)
    assert int(q.min()) >= fmt.qmin and int(q.max()) <= fmt.qmax
    w1 = dequantize(q, qp, fmt)
    # a dequantized weight is on the grid: quantizing it again gives the same codes
    assert torch.equal(quantize(w1, qp, fmt), q)
    err = (w1 - w).abs().reshape(8, -1, group_size or 64).amax(-1)
    assert torch.all(err <= qp.scale * 0.5 + 1e-6)


def test_matches_p1_reference_rtn():
    """The P1 reference's rtn_fake_quant, re-stated: min-max asym with clamped min/max."""
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    x = w.reshape(16, 2, 64)
    mn, mx = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    s = ((mx - mn) / 7).clamp(min=1e-12)
    z = (-mn / s).round()
    expected = ((x / s).round() + z).clamp(0, 7).sub(z).mul(s).reshape(16, 128)
    assert torch.equal(fake_quantize(w, AffineFormat(3, 64)), expected)


def test_bits_out_of_range():
    with pytest.raises(ValueError, match="bits: 9 is not allowed; choose an integer from 2 to 8"):
        AffineFormat(9)
    with pytest.raises(ValueError, match="bits: 1 is not allowed"):
        AffineFormat(1)


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="group_size 128 does not divide in_features 576"):
        fake_quantize(torch.zeros(4, 576), AffineFormat(4, 128))


def test_valid_group_sizes_for_smollm2_shapes():
    assert valid_group_sizes([576, 1536]) == [16, 24, 32, 48, 64, 96, 192]


@pytest.mark.unit
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_packing_in_slices_gives_the_same_words(monkeypatch, bits, dim):
    """Large tensors are packed a slice of columns at a time (bounded temporaries); the words
    must be those of the tensor packed whole."""
    from pipeline.formats import packing

    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (70, 45) if dim == 0 else (45, 70), generator=g,
                           dtype=torch.int32)
    whole = packing.pack_dense(values, bits, dim)
    monkeypatch.setattr(packing, "_SLICE_VALUES", 150)  # slices of 2 columns, the last 1
    sliced = packing.pack_dense(values, bits, dim)
    assert torch.equal(sliced, whole)
    assert torch.equal(packing.unpack_dense(sliced, bits, 70, dim), values)


@pytest.mark.unit
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [64, 70])
def test_whole_word_rows_equal_the_general_bit_stream(bits, n):
    """2/4/8-bit rows take a shortcut (no value straddles a word): the same words as the
    general bit-stream packer, which handles the packed dimension first."""
    from pipeline.formats import packing

    values = torch.randint(0, 2**bits, (33, n), generator=torch.Generator().manual_seed(n),
                           dtype=torch.int32)
    fast = packing.pack_dense(values, bits, dim=1)
    general = packing.pack_dense(values.t().contiguous(), bits, dim=0).t()
    assert torch.equal(fast, general)
    assert torch.equal(packing.unpack_dense(fast, bits, n, dim=1), values)
    assert torch.equal(packing.unpack_dense(general.t().contiguous(), bits, n, dim=0).t(), values)


def test_data_free_slices_give_the_streamed_path_tensors_with_the_mse_observer(monkeypatch):
    """The data-free path quantizes a linear a slice of rows at a time: with the mse
    observer its tensors are those of RTN on the whole weight (block_pass's path)."""
    from pipeline import data_free
    from pipeline.config import ExportFormat
    from pipeline.export import QuantizedLinear, block_tensors
    from pipeline.methods.rtn import rtn_quantize

    torch.manual_seed(4)
    stored = (torch.distributions.StudentT(3.0).sample((96, 128)) * 0.02).to(torch.bfloat16)
    fmt = AffineFormat(3, 32, observer="mse")
    layouts = [ExportFormat.COMPRESSED_TENSORS, ExportFormat.FAKE_QUANT]
    monkeypatch.setattr(data_free, "SLICE_VALUES", 32 * 128)  # 3 slices of 32 rows
    sliced, _ = data_free.quantize_linear("m", "l.weight", stored, fmt, torch.float32,
                                          torch.bfloat16, layouts)
    weight = stored.float()
    _fake, codes, qparams = rtn_quantize(weight, fmt, scale_dtype=torch.bfloat16)
    for layout in layouts:
        whole = block_tensors("m", {"l.weight": weight},
                              {"l": QuantizedLinear(codes, qparams, fmt)},
                              {"l.weight": torch.bfloat16}, layout)
        assert sliced[layout].keys() == whole.keys()
        for name, tensor in whole.items():
            assert torch.equal(sliced[layout][name], tensor), (layout, name)
    assert not torch.equal(qparams.scale, rtn_quantize(weight, AffineFormat(3, 32),
                                                       scale_dtype=torch.bfloat16)[2].scale)
