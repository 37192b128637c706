import glob
import logging
import os

import pytest
import yaml

from jobs.recipes import CONFIG_DIR, load_recipe, parse_overrides
from pipeline.config import ConfigError, Method, RunConfig
from pipeline.config.tree import build_config, config_to_dict

pytestmark = pytest.mark.unit

BASE = {"model": {"path": "/m"}, "output": "/o"}


def test_round_trip():
    config = build_config(RunConfig, {**BASE, "quantization": {"bits": 3, "group_size": 64}})
    assert config.quantization.method is Method.RTN
    data = config_to_dict(config)
    assert {k: data["quantization"][k] for k in ("method", "bits", "group_size", "symmetric",
                                                 "overrides", "abits")} == {
        "method": "rtn", "bits": 3, "group_size": 64, "symmetric": False, "overrides": {},
        "abits": 16}
    assert data["quantization"]["omniquant"]["epochs"] == 20
    assert data["quantization"]["budget"]["average_bits"] is None
    assert data["export"] == {"formats": ["compressed-tensors"], "target": None}
    assert build_config(RunConfig, data) == config
    assert yaml.safe_load(yaml.safe_dump(data)) == data


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigError, match=r"quantization\.bitz: unknown key; allowed keys here: "
                                          "abits, bias_correction, bits, budget, gptq, group_size, "
                                          "lorc, method, observer, omniquant, overrides, "
                                          "symmetric, symmetric_range$"):
        build_config(RunConfig, {**BASE, "quantization": {"bitz": 3}})
    with pytest.raises(ConfigError, match="^colour: unknown key"):
        build_config(RunConfig, {**BASE, "colour": "red"})


@pytest.mark.parametrize("bits", [1, 9])
def test_bits_range(bits):
    with pytest.raises(ConfigError, match=f"quantization.bits: {bits} is not allowed; choose an "
                                          "integer from 2 to 8"):
        build_config(RunConfig, {**BASE, "quantization": {"bits": bits}})


def test_wrong_types_and_enums():
    with pytest.raises(ConfigError, match="quantization.bits: expected an integer, got 'four'"):
        build_config(RunConfig, {**BASE, "quantization": {"bits": "four"}})
    with pytest.raises(ConfigError, match="quantization.method: 'awq' is not allowed; choose one "
                                          "of rtn"):
        build_config(RunConfig, {**BASE, "quantization": {"method": "awq"}})
    with pytest.raises(ConfigError, match="model.path: required"):
        build_config(RunConfig, {"output": "/o"})


def test_overrides():
    overrides = parse_overrides(["quantization.bits=3", "quantization.group_size=null",
                                 "cluster.address=ray://h:10001"])
    assert overrides == {"quantization.bits": 3, "quantization.group_size": None,
                         "cluster.address": "ray://h:10001"}
    with pytest.raises(ConfigError, match="--set"):
        parse_overrides(["bits"])


def test_set_overrides_by_module_name():
    """--set under quantization.overrides: the module name keeps its dots; a trailing bits /
    group_size / symmetric sets that key of the entry, anything else is the whole entry."""
    config = load_recipe("p1-rtn-w4", parse_overrides([
        "quantization.overrides.model.layers.0.mlp.down_proj.bits=8",
        "quantization.overrides.model.layers.0.mlp.down_proj.group_size=64",
        "quantization.overrides.re:.*\\.o_proj={bits: 6}",
        "quantization.overrides.lm_head=null"]))
    assert config.quantization.overrides == {
        "model.layers.0.mlp.down_proj": {"bits": 8, "group_size": 64},
        "re:.*\\.o_proj": {"bits": 6}, "lm_head": None}
    with pytest.raises(ConfigError, match=r"overrides\['model.layers.0.mlp.up_proj'\].bitz: "
                                          "unknown key"):
        load_recipe("p1-rtn-w4", parse_overrides([
            "quantization.overrides.model.layers.0.mlp.up_proj={bitz: 3}"]))


@pytest.mark.parametrize("path", sorted(glob.glob(str(CONFIG_DIR / "*.yaml"))),
                         ids=os.path.basename)
def test_every_recipe_validates(path):
    config = load_recipe(path)
    assert config.model.path and config.output


def test_p1_default_recipe():
    config = load_recipe("p1-rtn-w4")
    assert (config.quantization.bits, config.quantization.group_size,
            config.quantization.symmetric) == (4, None, False)
    c = config.calibration
    assert (c.corpus, c.num_samples, c.seq_len, c.seed) == ("sotu:train", 128, 512, 0)
    assert (config.eval.corpus, config.eval.seq_len) == ("sotu:test", 512)
    assert config.model.path == "asset:smollm2-135m"


def test_overrides_and_export_formats():
    config = build_config(RunConfig, {**BASE, "quantization": {"overrides": {
        "re:.*down_proj": {"bits": 8}, "model.layers.0.mlp.up_proj": None}},
        "export": {"formats": ["compressed-tensors", "gptq", "fake_quant"]}})
    assert config.quantization.overrides["re:.*down_proj"] == {"bits": 8}
    assert build_config(RunConfig, config_to_dict(config)) == config
    with pytest.raises(ConfigError, match=r"quantization.overrides\['x'\].bits: 9 is not "
                                          "allowed"):
        build_config(RunConfig, {**BASE, "quantization": {"overrides": {"x": {"bits": 9}}}})
    with pytest.raises(ConfigError, match=r"overrides\['x'\].bitz: unknown key"):
        build_config(RunConfig, {**BASE, "quantization": {"overrides": {"x": {"bitz": 3}}}})
    with pytest.raises(ConfigError, match=r"export.formats\[0\]: 'awq' is not allowed; choose "
                                          "one of compressed-tensors, gptq, fake_quant, "
                                          "fake_quant_lorc"):
        build_config(RunConfig, {**BASE, "export": {"formats": ["awq"]}})
    with pytest.raises(ConfigError, match="export.formats: must include compressed-tensors"):
        build_config(RunConfig, {**BASE, "export": {"formats": ["gptq"]}})


# values no run can use, refused when the recipe is read (test_bad_inputs.py: the same through
# the command line)

@pytest.mark.parametrize("section,value", [
    ({"quantization": {"gptq": {"damp": float("nan")}}}, "quantization.gptq.damp"),
    ({"quantization": {"omniquant": {"lwc_lr": float("inf")}}}, "quantization.omniquant.lwc_lr"),
    ({"quantization": {"omniquant": {"lwc_init": float("-inf")}}},
     "quantization.omniquant.lwc_init"),
    ({"quantization": {"budget": {"average_bits": float("nan")}}},
     "quantization.budget.average_bits"),
    ({"quantization": {"omniquant": {"sde": {"penalty": float("inf")}}}},
     "quantization.omniquant.sde.penalty"),
])
def test_numbers_must_be_finite(section, value):
    with pytest.raises(ConfigError, match=f"^{value}: expected a finite number, got -?(nan|inf)$"):
        build_config(RunConfig, {**BASE, **section})


@pytest.mark.parametrize("field,seed", [("calibration.seed", -1), ("calibration.seed", 2**70),
                                        ("quantization.budget.seed", 2**40)])
def test_seeds_in_range(field, seed):
    section, *rest = field.split(".")
    data = {rest[-1]: seed}
    if len(rest) == 2:
        data = {rest[0]: data}
    with pytest.raises(ConfigError, match=f"^{field}: {seed}; use an integer from 0 to "
                                          "4294967295$"):
        build_config(RunConfig, {**BASE, section: data})


@pytest.mark.parametrize("section,pattern", [
    ({"quantization": {"budget": {"choices": [3, 3, 4]}}},
     r"quantization.budget.choices: \[3, 3, 4\]; give distinct bit widths from 2 to 8"),
    ({"export": {"formats": ["compressed-tensors", "gptq", "gptq"]}},
     "export.formats: compressed-tensors, gptq, gptq names a format twice; list each once"),
    ({"quantization": {"overrides": {"x": {"group_size": True}}}},
     r"quantization.overrides\['x'\].group_size: True; use a positive integer or null"),
    ({"quantization": {"symmetric_range": "full"}},
     ("quantization.symmetric_range: full applies to symmetric grids, but "
     "quantization.symmetric is false")),
    ({"quantization": {"method": "gptq", "omniquant": {"sde": {"band": 1}}}},
     ("quantization.omniquant.sde: applies to method omniquant only, but quantization.method "
     "is gptq")),
    ({"quantization": {"method": "rtn", "omniquant": {"cross_layer": {"depth": 1}}}},
     "quantization.omniquant.cross_layer: applies to method omniquant only"),
])
def test_settings_that_would_be_ignored_or_repeat(section, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_config(RunConfig, {**BASE, **section})


def test_symmetric_range_for_symmetric_overrides_only():
    config = build_config(RunConfig, {**BASE, "quantization": {
        "symmetric_range": "full", "overrides": {"re:.*down_proj": {"symmetric": True}}}})
    assert config.quantization.symmetric_range == "full"


def test_recipe_keys_need_not_be_strings():
    with pytest.raises(ConfigError, match="^1: unknown key; allowed keys here: calibration"):
        build_config(RunConfig, {**BASE, 1: "a", "b": "c"})


@pytest.mark.parametrize("value", ["", "  "])
def test_text_field_must_name_a_field(value):
    with pytest.raises(ConfigError, match="calibration.text_field: empty"):
        build_config(RunConfig, {**BASE, "calibration": {"text_field": value}})


@pytest.mark.unit
def test_sections_the_method_does_not_read_are_warned(caplog):
    """Every default is filled in, so only the recipe's own mapping tells a setting that the
    chosen method ignores; quantize and plan warn of it (catalog reads stay quiet)."""
    from jobs.recipes import load_recipe

    with caplog.at_level(logging.WARNING, logger="jobs.recipes"):
        load_recipe("p1-gptq-w4", {"quantization.omniquant.epochs": 3}, warn=True)
        load_recipe("p1-rtn-w4", {"quantization.gptq.damp": 0.1}, warn=True)
        load_recipe("p1-rtn-w4", {"quantization.gptq.damp": 0.1})  # warn off: quiet
        load_recipe("p1-gptq-w4", {"quantization.gptq.damp": 0.1}, warn=True)  # read: quiet
        load_recipe("p1-omniquant-w4", {"quantization.omniquant.rounding": "gptq",
                                        "quantization.gptq.damp": 0.1}, warn=True)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        ("quantization.omniquant: ignored: it applies to method omniquant only, and "
         "quantization.method is gptq"),
        ("quantization.gptq: ignored: quantization.method rtn does not round with GPTQ (method "
         "gptq does, and omniquant with rounding: gptq or round_init: gptq)")]
