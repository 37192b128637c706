"""Every class of bad input is refused before any work: exit 2, one line naming the field or
file and what is allowed, and no report.json (or manifest) in the output folder."""
import json
import os
import shutil

import pytest
import yaml

from jobs.cli import main

pytestmark = pytest.mark.e2e


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


# model folder and each of its files

def test_index_naming_a_missing_shard(capsys, tmp_path, tiny_model, corpus_files):
    model = copied_model(tiny_model, tmp_path)
    gone = shards(model)[-1]
    os.remove(os.path.join(model, gone))
    refused(capsys, tmp_path, quantize_args(tmp_path, model, corpus_files[0]),
            f"model.path: model.safetensors.index.json names {gone}, which is missing")


@pytest.mark.parametrize("damage,pattern", [
    ("garbage", "not a safetensors file (header length"),
    ("truncated", "truncated: tensor"),
    ("empty", "not a safetensors file (0 bytes"),
    ("json_garbage", "not a safetensors file (header is not JSON"),
    ("fp8", "tensor x has dtype F8_E4M3; relayquant reads F64, F32"),
])
def test_shard_that_is_not_safetensors(capsys, tmp_path, tiny_model, corpus_files, damage,
                                       pattern):
    model = copied_model(tiny_model, tmp_path)
    shard = os.path.join(model, shards(model)[0])
    with open(shard, "rb") as f:
        data = f.read()
    fp8 = json.dumps({"x": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}).encode()
    damaged = {"garbage": os.urandom(4096), "truncated": data[: len(data) // 2], "empty": b"",
               "json_garbage": (16).to_bytes(8, "little") + b"\xff" * 16,
               "fp8": len(fp8).to_bytes(8, "little") + fp8 + b"\0\0"}[damage]
    with open(shard, "wb") as f:
        f.write(damaged)
    line = refused(capsys, tmp_path, quantize_args(tmp_path, model, corpus_files[0]), pattern)
    assert line.startswith(f"relayquant: error: model.path: {shard}")


@pytest.mark.parametrize("file,content,pattern", [
    ("config.json", "{not json", "config.json is not valid JSON"),
    ("config.json", "[1, 2]", "config.json must hold a JSON object"),
    ("model.safetensors.index.json", "garbage", "model.safetensors.index.json is not valid JSON"),
    ("model.safetensors.index.json", "{}", "has no weight_map"),
])
def test_config_or_index_that_is_not_json(capsys, tmp_path, tiny_model, corpus_files, file,
                                          content, pattern):
    model = copied_model(tiny_model, tmp_path)
    with open(os.path.join(model, file), "w") as f:
        f.write(content)
    line = refused(capsys, tmp_path, quantize_args(tmp_path, model, corpus_files[0]), pattern)
    assert "model.path:" in line


def test_model_without_a_tokenizer(capsys, tmp_path, tiny_model, corpus_files):
    model = copied_model(tiny_model, tmp_path)
    for name in os.listdir(model):
        if name.startswith("tokenizer"):
            os.remove(os.path.join(model, name))
    refused(capsys, tmp_path, quantize_args(tmp_path, model, corpus_files[0],
                                            quantization=STREAMED),
            "model.path: no tokenizer in")


def test_tokenizer_of_another_model(capsys, tmp_path, tiny_model, corpus_files):
    from tiny_models import build_tokenizer

    model = copied_model(tiny_model, tmp_path)
    for name in os.listdir(model):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            os.remove(os.path.join(model, name))
    build_tokenizer(model, 600)  # the model's embedding has 320 rows
    refused(capsys, tmp_path, ["eval", "--model", model, "--corpus", corpus_files[1],
                               "--seq-len", "32"],
            "but config.json's vocab_size is 320; the tokenizer files must be the model's own")


@pytest.mark.parametrize("change,pattern", [
    ({"hidden_size": 128}, "tensor model.embed_tokens.weight has shape [320, 64] in the "
                           "checkpoint, but config.json makes model.embed_tokens.weight [320, 128]"),
    ({"intermediate_size": 96}, "but config.json makes model.layers.0.mlp.gate_proj.weight [96, 64]"),
    ({"num_hidden_layers": 6}, "tensor model.layers.4.self_attn.q_proj.weight is missing"),
])
def test_config_of_another_model_than_the_weights(capsys, tmp_path, tiny_model, corpus_files,
                                                  change, pattern):
    # refused from the shard headers, before any block is read
    model = copied_model(tiny_model, tmp_path)
    with open(os.path.join(model, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump({**config, **change}, f)
    line = refused(capsys, tmp_path, quantize_args(tmp_path, model, corpus_files[0]), pattern)
    assert line.startswith("relayquant: error: model.path:")


def test_eval_of_an_unfinished_run(capsys, tmp_path, corpus_files):
    half = tmp_path / "half"
    half.mkdir()
    (half / "manifest.json").write_text("{}")
    refused(capsys, tmp_path, ["eval", "--model", str(half), "--corpus", corpus_files[1]],
            f"model.path: '{half}' is an unfinished relayquant run")


def test_model_url_with_an_unknown_protocol(capsys, tmp_path, corpus_files):
    refused(capsys, tmp_path, quantize_args(tmp_path, "nosuchproto://bucket/model",
                                            corpus_files[0]),
            "model.path: cannot open 'nosuchproto://bucket/model' (Protocol not known")


# recipe values

def test_invalid_regex_in_overrides(capsys, tmp_path, tiny_model, corpus_files):
    refused(capsys, tmp_path, quantize_args(
        tmp_path, tiny_model("llama"), corpus_files[0],
        quantization={"overrides": {"re:model.(layers": {"bits": 8}}}),
        "quantization.overrides['re:model.(layers']: 'model.(layers' is not a valid regular "
        "expression (missing ), unterminated subpattern")


@pytest.mark.parametrize("section", ["calibration", "eval"])
def test_seq_len_beyond_the_models_context(capsys, tmp_path, tiny_model, corpus_files, section):
    extra = {"eval": {"enabled": True, "corpus": corpus_files[1], "seq_len": 100000}} \
        if section == "eval" else {"calibration": {"seq_len": 100000, "num_samples": 1},
                                   "quantization": STREAMED}
    refused(capsys, tmp_path, quantize_args(tmp_path, tiny_model("llama"), corpus_files[0],
                                            **extra),
            f"{section}.seq_len: 100000 exceeds the model's context of 256 tokens "
            "(max_position_embeddings in config.json); use at most 256")


def test_eval_command_seq_len_beyond_the_context(capsys, tmp_path, tiny_model, corpus_files):
    refused(capsys, tmp_path, ["eval", "--model", tiny_model("llama"), "--corpus",
                               corpus_files[1], "--seq-len", "100000"],
            "eval.seq_len: 100000 exceeds the model's context of 256 tokens")


@pytest.mark.parametrize("item,pattern", [
    ("quantization.bits=[4", "--set: quantization.bits: '[4' is not a YAML value"),
    ("=4", "--set: '=4' has no key"),
    ("quantization.bits", "--set: 'quantization.bits' must read key.path=value"),
])
def test_bad_set_syntax(capsys, tmp_path, tiny_model, corpus_files, item, pattern):
    refused(capsys, tmp_path, quantize_args(tmp_path, tiny_model("llama"), corpus_files[0],
                                            "--set", item), pattern)


@pytest.mark.parametrize("kind", ["directory", "binary"])
def test_recipe_that_cannot_be_read(capsys, tmp_path, kind):
    path = tmp_path / "recipe.yaml"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"\xff\xfe\x00model")
    pattern = (f"--config: cannot read {path} (Is a directory); give a YAML file"
               if kind == "directory" else f"--config: {path} is not UTF-8 text")
    refused(capsys, tmp_path, ["quantize", "--config", str(path)], pattern)


@pytest.mark.parametrize("sections,pattern", [
    ({"quantization": {"method": "omniquant", "omniquant": {"batch_size": 8}}},
     "quantization.omniquant.batch_size: 8 exceeds calibration.num_samples 4"),
    ({"quantization": {"method": "gptq", "lorc": {"rank": 65}}},
     "quantization.lorc.rank: 65 exceeds the smaller side of model.layers.0.self_attn.q_proj "
     "(64 x 64)"),
    ({"quantization": {"bits": 4, "budget": {"average_bits": 9}}},
     "quantization.budget.average_bits: 9.0 is above what the widest choice (8 bits) costs"),
    ({"quantization": {"bits": 4, "symmetric": True, "symmetric_range": "wide"}},
     "quantization.symmetric_range: 'wide' is not allowed; choose restricted (or null) or full"),
])
def test_settings_the_model_or_the_data_cannot_take(capsys, tmp_path, tiny_model, corpus_files,
                                                    sections, pattern):
    refused(capsys, tmp_path, quantize_args(tmp_path, tiny_model("llama"), corpus_files[0],
                                            **sections), pattern)


# corpora

@pytest.mark.parametrize("spec,pattern", [
    ("sotu:nope", "calibration.corpus: corpus sotu:nope is not known; known: sotu:train"),
    ("nosuchproto://bucket/train.txt", "calibration.corpus: cannot open "
                                       "'nosuchproto://bucket/train.txt' (Protocol not known"),
])
def test_corpus_name_or_url_that_cannot_be_opened(capsys, tmp_path, tiny_model, spec, pattern):
    refused(capsys, tmp_path, quantize_args(tmp_path, tiny_model("llama"), spec,
                                            quantization=STREAMED), pattern)


@pytest.mark.parametrize("name,content,pattern", [
    ("empty.txt", b"", ("calibration.corpus: too short: 0 tokens, but num_samples 4 x "
                        "seq_len 32 needs 128; use a longer corpus")),
    ("short.txt", b"a few words", "use a longer corpus or a seq_len of at most"),
    ("latin1.txt", "caf\u00e9 ".encode("latin-1") * 50, "is not UTF-8 text"),
    ("bad.jsonl", b'{"text": "a"}\nnot json\n', "line 2 is not JSON"),
    ("bad.parquet", b"garbage", "is not a readable parquet file"),
    ("folder.txt", None, "(Is a directory); give a file"),
])
def test_corpus_that_cannot_be_used(capsys, tmp_path, tiny_model, name, content, pattern):
    corpus = tmp_path / name
    if content is None:
        corpus.mkdir()
    else:
        corpus.write_bytes(content)
    line = refused(capsys, tmp_path, quantize_args(tmp_path, tiny_model("llama"), str(corpus),
                                                   quantization=STREAMED), pattern)
    assert "calibration.corpus:" in line


# output location

def test_output_that_is_a_file(capsys, tmp_path, tiny_model, corpus_files):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    refused(capsys, tmp_path, quantize_args(tmp_path, tiny_model("llama"), corpus_files[0],
                                            output=str(target)),
            f"output: {target} is a file; give a folder")
    assert target.read_text() == "not a folder"


def test_output_that_cannot_be_created(capsys, tmp_path, tiny_model, corpus_files):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    out = blocker / "out"  # a folder under a regular file: unwritable even for root
    refused(capsys, tmp_path, quantize_args(tmp_path, tiny_model("llama"), corpus_files[0],
                                            output=str(out)),
            f"output: cannot create or write {out} (Not a directory)")


def test_output_on_a_disk_too_small(capsys, tmp_path, tiny_model, corpus_files, monkeypatch):
    import collections

    import pipeline.output_dir

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(pipeline.output_dir.shutil, "disk_usage",
                        lambda path: usage(10**9, 10**9 - 50_000, 50_000))
    refused(capsys, tmp_path, quantize_args(tmp_path, tiny_model("llama"), corpus_files[0]),
            "output: the result needs about 0.2 MB (0.0 MB already there) but")
    assert not os.path.exists(tmp_path / "out" / "manifest.json")


def test_nothing_is_left_behind_by_a_refusal(capsys, tmp_path, tiny_model, corpus_files):
    """A refusal after the output folder was named leaves no manifest that a later run would
    take for a started run of a different config."""
    model = copied_model(tiny_model, tmp_path)
    with open(os.path.join(model, "config.json")) as f:
        config = json.load(f)
    config["max_position_embeddings"] = 16
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(config, f)
    refused(capsys, tmp_path, quantize_args(tmp_path, model, corpus_files[0],
                                            quantization=STREAMED),
            "calibration.seq_len: 32 exceeds the model's context of 16 tokens")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("address, pattern", [
    ("10.0.0.1", "cluster.address: '10.0.0.1' is not a Ray address"),
    ("http://10.0.0.1:8265", "is not a Ray address"),
    ("host:99999", "is not a Ray address"),
    ("127.0.0.1:1", "cluster.address: nothing answers at 127.0.0.1:1"),
])
def test_ray_address_that_cannot_work(capsys, tmp_path, tiny_model, corpus_files, address,
                                      pattern):
    """A malformed address is refused by the recipe's validation; one where nothing listens,
    before Ray spends a minute retrying."""
    refused(capsys, tmp_path, quantize_args(tmp_path, tiny_model("llama"), corpus_files[0],
                                            cluster={"address": address}), pattern)


def test_ray_address_from_the_environment_is_checked(capsys, tmp_path, tiny_model, corpus_files,
                                                     monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    refused(capsys, tmp_path, quantize_args(tmp_path, tiny_model("llama"), corpus_files[0]),
            "RAY_ADDRESS: nothing answers at 127.0.0.1:1")


def test_home_in_recipe_paths_is_the_home_folder(capsys, tmp_path, tiny_model, corpus_files,
                                                 monkeypatch):
    # a YAML value is never expanded by a shell: `output: ~/runs/x` must not make a folder `~`
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    refused(capsys, tmp_path, quantize_args(tmp_path, "~/models/none", corpus_files[0]),
            f"model.path: '{tmp_path}/home/models/none' does not exist")
    from jobs.recipes import load_recipe
    config = load_recipe(write_recipe(tmp_path, "~/m", "~/c.txt", output="~/runs/x",
                                      eval={"corpus": "~/e.txt"}))
    home = str(tmp_path / "home")
    assert (config.output, config.model.path) == (f"{home}/runs/x", f"{home}/m")
    assert (config.calibration.corpus, config.eval.corpus) == (f"{home}/c.txt", f"{home}/e.txt")
    assert not os.path.exists(tmp_path / "~")
