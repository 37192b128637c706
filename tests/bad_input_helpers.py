"""Shared by the bad-input tests: a recipe around a tiny model, the refusal check (exit 2, one
error line, nothing that looks like a started run), and copies of the model to damage."""
import os
import shutil

import yaml

from jobs.cli import main


def write_recipe(tmp_path, model, train, **sections):
    data = {"model": {"path": model}, "output": str(tmp_path / "out"),
            "calibration": {"corpus": train, "num_samples": 4, "seq_len": 32},
            "quantization": {"bits": 4, "group_size": 16}, "eval": {"enabled": False},
            "cluster": {"workers": 1}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def refused(capsys, tmp_path, argv, pattern):
    """Exit 2 with exactly one error line matching `pattern`, and nothing that looks like a
    finished (or started) run in the output folder."""
    code = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.startswith("relayquant: error")]
    assert code == 2, err
    assert len(err) == 1, err
    assert pattern in err[0], err[0]
    for name in ("report.json", "manifest.json"):
        assert not os.path.exists(tmp_path / "out" / name)
    return err[0]


def copied_model(tiny_model, tmp_path):
    folder = str(tmp_path / "model")
    shutil.copytree(tiny_model("llama"), folder)
    return folder


def shards(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))


# gptq reads the calibration corpus (rtn is data-free and never opens it)
STREAMED = {"method": "gptq"}


def quantize_args(tmp_path, model, train, *extra, **sections):
    return ["quantize", "--config", write_recipe(tmp_path, model, train, **sections), *extra]
