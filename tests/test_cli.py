"""The command line: exit codes, one-line errors naming the field, JSON on stdout."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from jobs.cli import main

pytestmark = pytest.mark.e2e


def write_recipe(tmp_path, model, train, test, **sections):
    data = {"model": {"path": model}, "output": str(tmp_path / "out"),
            "calibration": {"corpus": train, "num_samples": 8, "seq_len": 32},
            "quantization": {"bits": 4, "group_size": 16},
            "eval": {"corpus": test, "seq_len": 32, "max_windows": 6},
            "cluster": {"workers": 2, "chunk_size": 4}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def assert_bad_input(capsys, tmp_path, argv, pattern):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert any(pattern in line for line in err), err
    assert len([line for line in err if line.startswith("relayquant: error")]) == 1
    assert not os.path.exists(tmp_path / "out" / "report.json")
    assert not os.path.exists(tmp_path / "out" / "manifest.json")


def test_missing_model_path(capsys, tmp_path, corpus_files):
    recipe = write_recipe(tmp_path, str(tmp_path / "nope"), *corpus_files)
    assert_bad_input(capsys, tmp_path, ["quantize", "--config", recipe], "model.path:")


def test_unsupported_architecture(capsys, tmp_path, corpus_files):
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                   "model_type": "gpt2"}))
    (model / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    recipe = write_recipe(tmp_path, str(model), *corpus_files)
    assert_bad_input(capsys, tmp_path, ["quantize", "--config", recipe],
                     "architecture GPT2LMHeadModel is not supported; supported: ")


@pytest.mark.parametrize("bits", ["1", "9"])
def test_bits_out_of_range(capsys, tmp_path, tiny_model, corpus_files, bits):
    recipe = write_recipe(tmp_path, tiny_model("llama"), *corpus_files)
    assert_bad_input(capsys, tmp_path,
                     ["quantize", "--config", recipe, "--set", f"quantization.bits={bits}"],
                     f"quantization.bits: {bits} is not allowed; choose an integer from 2 to 8")


def test_group_size_that_does_not_divide(capsys, tmp_path, tiny_model, corpus_files):
    recipe = write_recipe(tmp_path, tiny_model("llama"), *corpus_files,
                          quantization={"group_size": 48})
    assert_bad_input(capsys, tmp_path, ["quantize", "--config", recipe],
                     "quantization.group_size: 48 does not divide in_features 64 of "
                     "model.layers.0.self_attn.q_proj; choose one of 16, 32, 64, or null")


def test_unknown_yaml_key(capsys, tmp_path, tiny_model, corpus_files):
    recipe = write_recipe(tmp_path, tiny_model("llama"), *corpus_files,
                          calibration={"samples": 3})
    assert_bad_input(capsys, tmp_path, ["quantize", "--config", recipe],
                     "calibration.samples: unknown key")


def test_corpus_too_short(capsys, tmp_path, tiny_model, corpus_files):
    short = tmp_path / "short.txt"
    short.write_text("the state of the union is strong")
    # GPTQ reads the calibration (RTN is data-free: it never opens the corpus)
    recipe = write_recipe(tmp_path, tiny_model("llama"), str(short), corpus_files[1],
                          quantization={"method": "gptq"})
    assert_bad_input(capsys, tmp_path, ["quantize", "--config", recipe],
                     "calibration.corpus: too short")


def test_output_holding_something_else_is_refused(capsys, tmp_path, tiny_model, corpus_files):
    recipe = write_recipe(tmp_path, tiny_model("llama"), *corpus_files)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    assert_bad_input(capsys, tmp_path, ["quantize", "--config", recipe],
                     "is not a relayquant output")
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


def relayquant(*args):
    exe = os.path.join(os.path.dirname(sys.executable), "relayquant")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=600, check=False)


def test_quantize_json_status_and_eval(capsys, tmp_path, tiny_model, corpus_files):
    recipe = write_recipe(tmp_path, tiny_model("llama"), *corpus_files)
    out = str(tmp_path / "out")
    done = relayquant("quantize", "--config", recipe, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # stdout holds exactly one JSON object
    assert result["output"] == out and result["windows"] == 6 and result["wall_seconds"] > 0
    assert result["perplexity"]["quantized"] > 1
    assert "data-free quantize: 4/4 blocks" in done.stderr

    # `status` reads files only: in process (each subprocess costs seconds of imports)
    def status(*argv):
        capsys.readouterr()
        assert main(["status", out, *argv, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    now = status()
    assert (now["done"], now["total"], now["complete"]) == (4, 4, True)
    os.remove(os.path.join(out, "report.json"))
    os.remove(os.path.join(out, ".relayquant", "blocks", "00002.json"))
    now = status()
    assert (now["done"], now["total"], now["complete"]) == (3, 4, False)
    assert now["remaining_blocks"] == [2] and now["next_block"] == 2
    assert status("--config", recipe)["fingerprint_matches"] is True
    other = status("--config", recipe, "--set", "quantization.bits=3")
    assert other["fingerprint_matches"] is False
    assert other["fingerprint_differences"] == ["config.quantization.bits: 4 -> 3"]

    ev = relayquant("eval", "--model", out, "--corpus", corpus_files[1], "--seq-len", "32",
                    "--max-windows", "6", "--json")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["perplexity"] == pytest.approx(
        result["perplexity"]["quantized"], rel=1e-6)


def test_changed_config_is_refused_then_restart(capsys, tmp_path, tiny_model, corpus_files):
    recipe = write_recipe(tmp_path, tiny_model("llama"), *corpus_files,
                          eval={"enabled": False})
    # the finished run in process (the command line as a subprocess: the --restart below)
    assert main(["quantize", "--config", recipe]) == 0
    # refused before any work (no Ray is started)
    capsys.readouterr()
    assert main(["quantize", "--config", recipe, "--set", "quantization.bits=3"]) == 2
    err = capsys.readouterr().err
    assert "holds a different run (config.quantization.bits: 4 -> 3)" in err
    assert "--restart" in err
    again = relayquant("quantize", "--config", recipe, "--set", "quantization.bits=3",
                       "--restart", "--json")
    assert again.returncode == 0, again.stderr


def test_bad_method_settings_are_refused_before_any_work(capsys, tmp_path, tiny_model,
                                                         corpus_files):
    recipe = write_recipe(tmp_path, tiny_model("llama"), *corpus_files)
    assert_bad_input(capsys, tmp_path, ["quantize", "--config", recipe, "--set",
                                        "quantization.method=awq"],
                     "quantization.method: 'awq' is not allowed; choose one of rtn, gptq, "
                     "omniquant")
    assert_bad_input(capsys, tmp_path, ["quantize", "--config", recipe, "--set",
                                        "quantization.omniquant.epochs=-2"],
                     "quantization.omniquant.epochs: -2")
    assert_bad_input(capsys, tmp_path, ["eval", "--model", tiny_model("llama"), "--abits", "3"],
                     "--abits: 3 is not allowed")


def test_a_diverging_block_fails_with_one_clear_line(capsys, tmp_path, tiny_model, corpus_files):
    """A huge (finite) weight in block 1 makes the reconstruction loss overflow: the run fails
    naming the block, blocks before it stay done. (A NaN weight is refused as it loads: see
    test_bad_inputs.py.)"""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model("llama"), model)
    name = "model.layers.1.mlp.down_proj.weight"
    for shard in model.glob("*.safetensors"):
        tensors = load_file(shard)
        if name in tensors:
            tensors[name][0, 0] = 3e38
            save_file(tensors, shard, metadata={"format": "pt"})
    recipe = write_recipe(tmp_path, str(model), *corpus_files,
                          quantization={"method": "omniquant", "omniquant": {"epochs": 1}})
    code = main(["quantize", "--config", recipe])
    err = capsys.readouterr().err.strip().splitlines()
    failed = [line for line in err if line.startswith("relayquant: failed")]
    assert code == 1 and len(failed) == 1, err
    assert ("TrainingError: block 2/4 (model.layers.1): the reconstruction loss became inf"
            in failed[0])
    assert "Traceback" not in failed[0]
    assert os.path.exists(tmp_path / "out" / ".relayquant" / "blocks" / "00000.json")
