"""Golden bytes for the packed layouts, checked against hand-computed words and an
independent bit-stream packer."""
import pytest
import torch

from pipeline.formats import AffineFormat, QuantParams, gptq
from pipeline.formats import compressed_tensors as ct

pytestmark = pytest.mark.unit


def as_int32(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


def stream_pack(values: list[int], bits: int) -> list[int]:
    """Reference: one little-endian bit stream, value i at bit i*bits, cut into int32 words."""
    stream = 0
    for i, v in enumerate(values):
        assert 0 <= v < 1 << bits
        stream |= v << (bits * i)
    words = -(-len(values) * bits // 32)
    return [as_int32((stream >> (32 * w)) & 0xFFFFFFFF) for w in range(words)]


def word_pack(values: list[int], bits: int) -> list[int]:
    """The layout compressed-tensors 0.17 wrote: 32 // bits values per int32 word, value j at
    bit j*bits, the last word zero-padded (identical to the stream for 2, 4 and 8 bits)."""
    per_word = 32 // bits
    words = []
    for start in range(0, len(values), per_word):
        word = 0
        for j, v in enumerate(values[start : start + per_word]):
            word |= v << (bits * j)
        words.append(as_int32(word))
    return words


def params(out, groups, zero=None):
    scale = torch.ones(out, groups)
    return QuantParams(scale, torch.zeros(out, groups) if zero is None else zero)


def test_ct_4bit_symmetric_known_word():
    codes = torch.tensor([[-8, -7, -6, -5, -4, -3, -2, -1]], dtype=torch.int32)
    packed = ct.compress_linear(codes, params(1, 1), AffineFormat(4, symmetric=True),
                                torch.float32)
    assert packed["weight_packed"].tolist() == [[0x76543210]]  # stored value = code + 8
    assert "weight_zero_point" not in packed
    assert packed["weight_shape"].tolist() == [1, 8]


def test_ct_8bit_asymmetric_known_word():
    codes = torch.tensor([[0, 1, 2, 255]], dtype=torch.int32)
    zero = torch.tensor([[128.0]])
    packed = ct.compress_linear(codes, params(1, 1, zero), AffineFormat(8), torch.float32)
    assert packed["weight_packed"].tolist() == [[as_int32(0xFF020100)]]
    assert packed["weight_zero_point"].tolist() == [[128]]  # signed 0, stored + 128


def test_ct_3bit_straddles_words():
    codes = torch.tensor([[-4, -3, -2, -1, 0, 1, 2, 3, 3, 3, -4]], dtype=torch.int32)
    packed = ct.compress_linear(codes, params(1, 1), AffineFormat(3, symmetric=True),
                                torch.float32)
    # stored 0..7,7,7,0 as one 33-bit stream: 0 at bits 0..29, then 7, 7 and a 0 whose
    # lowest 2 bits end the first word; compressed-tensors >= 0.18 packs this way
    first = sum(v << (3 * j) for j, v in enumerate([0, 1, 2, 3, 4, 5, 6, 7, 7, 7]))
    assert packed["weight_packed"].tolist() == [[first, 0]]
    codes[0, 10] = 3  # stored 7: bits 30, 31 in word 0, bit 32 in word 1
    packed = ct.compress_linear(codes, params(1, 1), AffineFormat(3, symmetric=True),
                                torch.float32)
    assert packed["weight_packed"].tolist() == [[as_int32(first | 3 << 30), 1]]


def test_ct_reads_the_pre_018_per_word_layout():
    """Checkpoints written with compressed-tensors 0.17 (10 3-bit values per word) still
    load: the packed width tells the layouts apart."""
    fmt = AffineFormat(3, 32, symmetric=True)
    codes = torch.randint(-4, 4, (4, 64), generator=torch.Generator().manual_seed(3),
                          dtype=torch.int32)
    words = [word_pack([int(v) + 4 for v in row], 3) for row in codes]
    legacy = {"weight_packed": torch.tensor(words, dtype=torch.int32),
              "weight_scale": torch.ones(4, 2), "weight_shape": torch.tensor([4, 64])}
    assert legacy["weight_packed"].shape == (4, 7)  # dense would be 6 words
    assert torch.equal(ct.decompress_linear(legacy, fmt, torch.float32), codes.float())
    legacy["weight_packed"] = legacy["weight_packed"][:, :5]
    with pytest.raises(ValueError, match="weight_packed: 5 int32 words along dim 1 fit neither"):
        ct.decompress_linear(legacy, fmt, torch.float32)


def test_ct_2bit_symmetric_known_word():
    codes = torch.tensor([[-2, -1, 0, 1, 1, 0, -1, -2]], dtype=torch.int32)
    packed = ct.compress_linear(codes, params(1, 1), AffineFormat(2, symmetric=True),
                                torch.float32)
    assert packed["weight_packed"].tolist() == [[7140]]  # 0,1,2,3,3,2,1,0 at 2 bits each


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_ct_matches_bit_stream_and_round_trips(bits, symmetric):
    fmt = AffineFormat(bits, 32, symmetric)
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(fmt.qmin, fmt.qmax + 1, (8, 64), generator=g, dtype=torch.int32)
    zero = torch.randint(0, 2**bits, (8, 2), generator=g).float()
    qp = params(8, 2, None if symmetric else zero)
    packed = ct.compress_linear(codes, qp, fmt, torch.float32)
    offset = 0 if symmetric else 2 ** (bits - 1)
    for row in range(8):
        stored = [int(v) - offset + 2 ** (bits - 1) for v in codes[row]]
        assert packed["weight_packed"][row].tolist() == stream_pack(stored, bits)
    if not symmetric:  # zero points packed along the output dimension
        for col in range(2):
            assert packed["weight_zero_point"][:, col].tolist() == stream_pack(
                [int(z) for z in zero[:, col]], bits)
    w = ct.decompress_linear(packed, fmt, torch.float32)
    expected = (codes.float().reshape(8, 2, 32) - qp.zero_point.unsqueeze(-1)).reshape(8, 64)
    assert torch.equal(w, expected)


def test_gptq_3bit_straddles_words():
    codes = torch.arange(32, dtype=torch.int32).remainder(8).reshape(1, 32).expand(32, 32)
    packed = gptq.compress_linear(codes.contiguous(), params(32, 1, torch.full((32, 1), 4.0)),
                                  AffineFormat(3))
    # 32 values 0..7,0..7,... at 3 bits: a 96-bit stream in 3 words; value 10 straddles
    assert packed["qweight"].shape == (3, 32)
    assert packed["qweight"][:, 0].tolist() == stream_pack([i % 8 for i in range(32)], 3)
    assert packed["qweight"][0, 0].item() == as_int32(0b10_001_000_111_110_101_100_011_010_001_000)


def test_gptq_symmetric_4bit_zeros_are_0x77777777():
    codes = torch.zeros(8, 32, dtype=torch.int32)
    packed = gptq.compress_linear(codes, params(8, 1), AffineFormat(4, symmetric=True))
    assert packed["qzeros"].tolist() == [[0x77777777]]
    assert packed["qweight"].shape == (4, 8)  # [in * 4 / 32, out]
    assert packed["qweight"].unique().tolist() == [as_int32(0x88888888)]  # code 0 -> 8
    assert packed["g_idx"].tolist() == [0] * 32
    assert packed["scales"].dtype == torch.float16 and packed["scales"].shape == (1, 8)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_matches_bit_stream_and_round_trips(bits, symmetric):
    fmt = AffineFormat(bits, 32, symmetric)
    g = torch.Generator().manual_seed(10 + bits)
    codes = torch.randint(fmt.qmin, fmt.qmax + 1, (32, 64), generator=g, dtype=torch.int32)
    zero = torch.randint(1, 2**bits, (32, 2), generator=g).float()
    qp = params(32, 2, None if symmetric else zero)
    packed = gptq.compress_linear(codes, qp, fmt)
    half = 2 ** (bits - 1)
    unsigned = codes + half if symmetric else codes
    zeros = torch.full((32, 2), half) if symmetric else zero.int()
    for col in range(32):  # qweight packs each output column along the input
        assert packed["qweight"][:, col].tolist() == stream_pack(unsigned[col].tolist(), bits)
    for group in range(2):  # qzeros hold zero - 1, packed along the output
        assert packed["qzeros"][group].tolist() == stream_pack(
            [int(z) - 1 for z in zeros[:, group]], bits)
    assert packed["g_idx"].tolist() == [i // 32 for i in range(64)]
    w = gptq.decompress_linear(packed, bits, torch.float32)
    expected = (unsigned.float().reshape(32, 2, 32) - zeros.float().unsqueeze(-1)).reshape(32, 64)
    assert torch.equal(w, expected)


def test_config_groups_name_exactly_their_modules():
    formats = {"m.layers.0.q": AffineFormat(4), "m.layers.0.k": AffineFormat(4),
               "m.layers.0.down": AffineFormat(8, 64, True)}
    config = ct.quantization_config(formats, ["lm_head"])
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["quantization_status"] == "compressed"
    groups = list(config["config_groups"].values())
    assert [g["targets"] for g in groups] == [["m.layers.0.k", "m.layers.0.q"],
                                              ["m.layers.0.down"]]
    assert groups[0]["weights"]["strategy"] == "channel" and not groups[0]["weights"]["symmetric"]
    assert groups[1]["weights"]["group_size"] == 64 and groups[1]["weights"]["num_bits"] == 8
    assert ct.module_formats(config, [*formats, "lm_head"]) == formats


def test_vllm_kernel_table():
    assert ct.vllm_kernel(AffineFormat(3, 64, True))
    assert ct.vllm_kernel(AffineFormat(4, None, False))
    assert not ct.vllm_kernel(AffineFormat(3, 64, False))
    assert not ct.vllm_kernel(AffineFormat(2, 64, False))


def test_gptq_v1_cannot_store_zero_point_zero():
    fmt = AffineFormat(4, 32, False)
    codes = torch.full((32, 32), 5, dtype=torch.int32)
    zero = torch.zeros(32, 1)
    zero[3] = 2.0
    qp = params(32, 1, zero)
    assert gptq.zero_overflow(qp, fmt) == 31
    w = gptq.decompress_linear(gptq.compress_linear(codes, qp, fmt), 4, torch.float32)
    assert w[3].tolist() == [3.0] * 32  # representable zero point: exact
    assert w[0].tolist() == [5.0 - 16] * 32  # zero 0 wraps to 15, loads as 16
