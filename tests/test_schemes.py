import pytest

from pipeline.config import ConfigError, ExportFormat, QuantizationConfig
from pipeline.formats import AffineFormat
from pipeline.plan import open_model
from pipeline.schemes import format_for, validate_schemes

pytestmark = pytest.mark.unit


def test_exact_name_beats_regex_and_first_regex_wins():
    q = QuantizationConfig(bits=4, group_size=32, overrides={
        "re:.*mlp.*": {"bits": 8},
        "re:.*down_proj": {"bits": 2},
        "model.layers.1.mlp.down_proj": {"symmetric": True},
        "re:model\\.layers\\.0\\..*": None})
    assert format_for("model.layers.1.mlp.down_proj", q) == AffineFormat(4, 32, True)
    assert format_for("model.layers.2.mlp.down_proj", q) == AffineFormat(8, 32, False)
    assert format_for("model.layers.2.self_attn.q_proj", q) == AffineFormat(4, 32, False)
    assert format_for("model.layers.0.self_attn.q_proj", q) is None
    per_channel = QuantizationConfig(group_size=64, overrides={"x": {"group_size": None}})
    assert format_for("x", per_channel) == AffineFormat(4, None, False)


def test_gptq_needs_a_single_scheme(tiny_model):
    parts = open_model(tiny_model("llama"))
    q = QuantizationConfig(group_size=16, overrides={"re:.*mlp.*": {"bits": 8}})
    assert len(set(validate_schemes(parts, q, [ExportFormat.COMPRESSED_TENSORS]).values())) == 2
    with pytest.raises(ConfigError, match="export.formats: gptq needs one scheme"):
        validate_schemes(parts, q, [ExportFormat.COMPRESSED_TENSORS, ExportFormat.GPTQ])


def test_override_group_size_is_checked_per_layer(tiny_model):
    parts = open_model(tiny_model("llama"))
    q = QuantizationConfig(group_size=16, overrides={"re:.*down_proj": {"group_size": 96}})
    with pytest.raises(ConfigError, match="group_size: 96 does not divide in_features 128 of "
                                          "model.layers.0.mlp.down_proj"):
        validate_schemes(parts, q, [])


def test_gptq_layout_needs_in_features_divisible_by_32(tmp_path):
    """Refused at plan time, not when the first block is exported."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    parts = open_model(str(tmp_path / "m"))
    q = QuantizationConfig(group_size=16)
    assert validate_schemes(parts, q, [ExportFormat.COMPRESSED_TENSORS])
    with pytest.raises(ConfigError, match="export.formats: gptq packs the input dimension 32 "
                                          "values at a time, but model.layers.0.self_attn.q_proj "
                                          "has in_features 48; drop gptq"):
        validate_schemes(parts, q, [ExportFormat.COMPRESSED_TENSORS, ExportFormat.GPTQ])
