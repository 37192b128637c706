"""Every class of bad input is refused before any work: exit 2, one line naming the field or
file and what is allowed, and no report.json (or manifest) in the output folder."""
import json
import os
import shutil

import pytest
import torch
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
    ({"num_hidden_layers": 2}, "the checkpoint holds tensor model.layers.2.input_layernorm.weight, "
                               "past the 2 blocks that config.json's num_hidden_layers says"),
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


DROP = object()  # edit_config: remove the key


def edit_config(model, **change):
    with open(os.path.join(model, "config.json")) as f:
        config = json.load(f)
    config.update(change)
    for key in [k for k, v in change.items() if v is DROP]:
        del config[key]
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize("change,pattern", [
    ({"num_hidden_layers": DROP}, "config.json has no num_hidden_layers; it must be the model's "
                                  "number of blocks, a positive integer"),
    ({"num_hidden_layers": 0}, "config.json has num_hidden_layers 0; it must be"),
    ({"num_hidden_layers": "4"}, "config.json has num_hidden_layers '4'; it must be"),
    ({"num_attention_heads": 3}, "config.json is not a valid llama config: ValueError: The "
                                 "hidden size (64) is not a multiple of the number of attention "
                                 "heads (3)."),
    ({"max_position_embeddings": None}, "is not a valid llama config: TypeError: Field "
                                        "'max_position_embeddings' expected int"),
    ({"model_type": "foo"}, "config.json's model_type 'foo' is not known to transformers"),
    ({"model_type": "mistral"}, "config.json's model_type 'mistral' builds MistralForCausalLM, "
                                "but its architectures say LlamaForCausalLM"),
    ({"architectures": "LlamaForCausalLM"}, "config.json's architectures is 'LlamaForCausalLM'; "
                                            "it must be a list of class names"),
    ({"dtype": "int8"}, "config.json does not describe a model transformers can build: "
                        "LlamaForCausalLM cannot be instantiated under `dtype=torch.int8`"),
    ({"quantization_config": {"quant_method": "awq", "bits": 4}},
     "config.json's quantization_config (quant_method 'awq') is not one relayquant reads"),
    ({"quantization_config": {"quant_method": "gptq"}},
     "config.json's gptq quantization_config cannot be read (KeyError: 'bits')"),
])
def test_config_that_describes_no_model_relayquant_reads(capsys, tmp_path, tiny_model,
                                                          corpus_files, change, pattern):
    model = copied_model(tiny_model, tmp_path)
    edit_config(model, **change)
    line = refused(capsys, tmp_path, quantize_args(tmp_path, model, corpus_files[0]), pattern)
    assert line.startswith("relayquant: error: model.path:")


@pytest.mark.parametrize("damage,pattern", [
    ("config", "model.path: {model}/config.json is not valid JSON"),
    ("layers", "model.path: config.json has num_hidden_layers 0"),
    ("shapes", "but config.json makes model.embed_tokens.weight [320, 128]"),
])
def test_plan_refuses_the_model_a_run_would_refuse(capsys, tmp_path, tiny_model, corpus_files,
                                                   damage, pattern):
    model = copied_model(tiny_model, tmp_path)
    if damage == "config":
        with open(os.path.join(model, "config.json"), "w") as f:
            f.write("{not json")
    else:
        edit_config(model, **({"num_hidden_layers": 0} if damage == "layers"
                              else {"hidden_size": 128}))
    refused(capsys, tmp_path, ["plan", "--config", write_recipe(tmp_path, model,
                                                               corpus_files[0])],
            pattern.format(model=model))


def rewrite_shard(folder, edit):
    """Rewrite the first shard's tensors through `edit(tensors) -> tensors`."""
    from safetensors.torch import load_file, save_file

    shard = os.path.join(folder, shards(folder)[0])
    save_file(edit(load_file(shard)), shard, metadata={"format": "pt"})
    return shard


def test_float_weight_stored_as_integers(capsys, tmp_path, tiny_model, corpus_files):
    # a quantized checkpoint without the quantization_config that says how to unpack it
    model = copied_model(tiny_model, tmp_path)
    rewrite_shard(model, lambda t: {k: v.to(torch.int8) if k.endswith("weight") and v.dim() == 2
                                    else v for k, v in t.items()})
    refused(capsys, tmp_path, quantize_args(tmp_path, model, corpus_files[0]),
            "model.path: tensor model.embed_tokens.weight is stored as int8, but it is a float "
            "weight and config.json has no quantization_config that says how to unpack it")


def test_tensor_stored_in_two_shards(capsys, tmp_path, tiny_model, corpus_files):
    from safetensors.torch import load_file

    model = copied_model(tiny_model, tmp_path)
    second = load_file(os.path.join(model, shards(model)[1]))
    name = next(iter(second))
    first = rewrite_shard(model, lambda t: {**t, name: torch.zeros_like(second[name])})
    refused(capsys, tmp_path, ["eval", "--model", model, "--corpus", corpus_files[1],
                               "--seq-len", "32"],
            f"model.path: tensor {name} is stored twice, in {first} and "
            f"{os.path.join(model, shards(model)[1])}")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json", "shard"])
def test_model_file_that_is_a_folder(capsys, tmp_path, tiny_model, corpus_files, name):
    model = copied_model(tiny_model, tmp_path)
    path = os.path.join(model, shards(model)[0] if name == "shard" else name)
    os.remove(path)
    os.mkdir(path)
    refused(capsys, tmp_path, quantize_args(tmp_path, model, corpus_files[0]),
            f"model.path: cannot read {path} (Is a directory)")


def test_broken_tokenizer_is_refused_before_a_data_free_run(capsys, tmp_path, tiny_model,
                                                            corpus_files):
    """RTN with evaluation off reads no text, but the output ships the tokenizer: a broken one
    is refused before any block is quantized, not when the export copies it."""
    model = copied_model(tiny_model, tmp_path)
    with open(os.path.join(model, "tokenizer.json"), "w") as f:
        f.write("{not json")
    refused(capsys, tmp_path, quantize_args(tmp_path, model, corpus_files[0]),
            "model.path: cannot load the tokenizer")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json", "shard",
                                  "tokenizer.json"])
def test_model_file_that_is_a_pipe(capsys, tmp_path, tiny_model, corpus_files, name):
    """A FIFO in place of a model file is refused, not opened (opening it waits for a writer);
    should the check ever miss, a writer thread ends the wait after 30 s so the test fails
    rather than hangs."""
    import threading

    model = copied_model(tiny_model, tmp_path)
    path = os.path.join(model, shards(model)[0] if name == "shard" else name)
    os.remove(path)
    os.mkfifo(path)
    done = threading.Event()

    def unblock() -> None:
        if not done.wait(30):
            with open(path, "wb"):
                pass

    threading.Thread(target=unblock, daemon=True).start()
    try:
        refused(capsys, tmp_path, quantize_args(tmp_path, model, corpus_files[0]),
                f"{path} is not a regular file (a pipe, socket or device)")
    finally:
        done.set()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
@pytest.mark.parametrize("name", ["config.json", "shard", "folder"])
def test_model_file_that_cannot_be_read(capsys, tmp_path, tiny_model, corpus_files, name):
    model = copied_model(tiny_model, tmp_path)
    path = (model if name == "folder" else
            os.path.join(model, shards(model)[0] if name == "shard" else name))
    os.chmod(path, 0)
    try:
        refused(capsys, tmp_path, quantize_args(tmp_path, model, corpus_files[0]),
                "(Permission denied)")
    finally:
        os.chmod(path, 0o755)


@pytest.mark.parametrize("argv,pattern", [
    (["--model", "{model}/config.json"], "model.path: '{model}/config.json' is a file; give the "
                                         "folder that holds it"),
    (["--model", ""], "model.path: required; give a model folder or an fsspec URL"),
    (["--model", "asset:nope"], "model.path: asset 'nope' is not known; known models: "),
    (["--model", "nosuchproto://bucket/model"], "model.path: cannot open "
                                                "'nosuchproto://bucket/model' (Protocol not known"),
])
def test_model_path_that_is_no_model_folder(capsys, tmp_path, tiny_model, corpus_files, argv,
                                            pattern):
    model = tiny_model("llama")
    refused(capsys, tmp_path, ["eval", *[a.format(model=model) for a in argv], "--corpus",
                               corpus_files[1], "--seq-len", "32"], pattern.format(model=model))


def test_model_store_that_cannot_be_reached(capsys, tmp_path, corpus_files, monkeypatch):
    from fsspec.implementations.memory import MemoryFileSystem

    def unreachable(self, path, **kwargs):
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(MemoryFileSystem, "exists", unreachable)
    refused(capsys, tmp_path, quantize_args(tmp_path, "memory://bucket/model", corpus_files[0]),
            "model.path: cannot open 'memory://bucket/model' (connection reset by peer)")


def test_tokenizer_config_that_is_not_an_object(capsys, tmp_path, tiny_model, corpus_files):
    model = copied_model(tiny_model, tmp_path)
    with open(os.path.join(model, "tokenizer_config.json"), "w") as f:
        f.write("[]")
    refused(capsys, tmp_path, ["eval", "--model", model, "--corpus", corpus_files[1],
                               "--seq-len", "32"],
            f"model.path: cannot load the tokenizer in '{model}' (AttributeError: ")


LORA = "base_model.model.model.layers.0.self_attn.q_proj.lora_"


@pytest.mark.parametrize("config,factors,pattern", [
    ({"peft_type": "LORA"}, {"A": [4, 64], "B": [64, 4]}, "has r None and lora_alpha None; r "
                                                          "must be a positive integer"),
    ({"peft_type": "LORA", "r": 4}, {"A": [4, 32], "B": [64, 4]},
     "factors A [4, 32] and B [64, 4] do not fit model.layers.0.self_attn.q_proj's weight "
     "[64, 64] (A [r, in], B [out, r]); the adapter is of another model"),
    ({"peft_type": "LORA", "r": 4}, {"A": [4, 64]}, f"holds {LORA}A.weight but not "
                                                    f"{LORA}B.weight"),
    ({"peft_type": "LORA", "r": 4}, None, "has no adapter_model.safetensors"),
])
def test_lorc_adapter_that_does_not_fit(capsys, tmp_path, tiny_model, corpus_files, config,
                                        factors, pattern):
    """MODEL/lorc/ is checked on the driver: a bad one would fail inside a worker."""
    from safetensors.torch import save_file

    model = copied_model(tiny_model, tmp_path)
    os.mkdir(os.path.join(model, "lorc"))
    with open(os.path.join(model, "lorc", "adapter_config.json"), "w") as f:
        json.dump(config, f)
    if factors is not None:
        save_file({f"{LORA}{k}.weight": torch.zeros(s) for k, s in factors.items()},
                  os.path.join(model, "lorc", "adapter_model.safetensors"))
    line = refused(capsys, tmp_path, ["eval", "--model", model, "--corpus", corpus_files[1],
                                      "--seq-len", "32"], pattern)
    assert line.startswith("relayquant: error: lorc:")


def test_weights_with_nan_are_refused_as_they_load(tmp_path, tiny_model):
    """Values are only read by the workers, block by block: the block that holds a NaN is
    refused there (exit 2 through the worker's error; see the next test), not quantized into
    a Hessian failure or a NaN perplexity."""
    from pipeline.config import ConfigError
    from pipeline.plan import open_model

    model = copied_model(tiny_model, tmp_path)

    def poison(tensors):
        name = next(k for k in tensors if k.endswith("weight") and tensors[k].dim() == 2)
        tensors[name][0, 0] = float("nan")
        return tensors

    rewrite_shard(model, poison)
    parts = open_model(model)
    parts.check_shapes()  # headers are fine
    with pytest.raises(ConfigError, match=r"model.path: tensor \S+ holds NaN or infinite values; "
                                          "the checkpoint is damaged"):
        for path in [*parts.adapter.embed_modules,
                     *(parts.block_path(i) for i in range(parts.num_blocks))]:
            parts.load(path)


def test_input_error_raised_in_a_worker_is_one_line(capsys):
    """Ray re-raises a worker's ConfigError as a subclass that also holds the remote
    traceback; the user sees the worker's own message."""
    from jobs.cli import run_guarded
    from pipeline.config import ConfigError

    class RemoteConfigError(ConfigError):
        def __init__(self, cause):
            super().__init__("Traceback (most recent call last):\n  ...\n" + str(cause))
            self.cause = cause

    def action():
        raise RemoteConfigError(ConfigError("model.path: tensor x holds NaN"))

    assert run_guarded(action, False, str) == 2
    assert capsys.readouterr().err == "relayquant: error: model.path: tensor x holds NaN\n"


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


@pytest.mark.parametrize("name,content,pattern", [
    ("blank.txt", b" \n\t\n" * 100, "holds only whitespace; give a corpus of text"),
    ("zeros.txt", b"\0" * 1000, "holds NUL bytes, so it is not text"),
    ("null.jsonl", b'{"text": "a"}\n{"text": null}\n', "record 2's 'text' is null, not a string "
                                                       "of text (set calibration.text_field"),
    ("rows.jsonl", b'"just a string"\n', "record 1 has no 'text' field (set "
                                         "calibration.text_field"),
    ("ints.parquet", "ints", "column 'text' of '{corpus}' holds int64, not text"),
    ("fifo.txt", "fifo", "'{corpus}' is not a regular file (a pipe or a device); give a file"),
])
def test_corpus_that_holds_no_text(capsys, tmp_path, tiny_model, name, content, pattern):
    """Each would tokenize into windows of nothing (or, a pipe, block the first read)."""
    corpus = tmp_path / name
    if content == "ints":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": list(range(1000))}), corpus)
    elif content == "fifo":
        os.mkfifo(corpus)
    else:
        corpus.write_bytes(content)
    line = refused(capsys, tmp_path, quantize_args(tmp_path, tiny_model("llama"), str(corpus),
                                                   quantization=STREAMED),
                   pattern.format(corpus=corpus))
    assert line.startswith("relayquant: error: calibration.corpus:")


def test_eval_corpus_records_name_the_eval_field(capsys, tmp_path, tiny_model):
    corpus = tmp_path / "eval.jsonl"
    corpus.write_bytes(b'{"body": "text"}\n')
    refused(capsys, tmp_path, ["eval", "--model", tiny_model("llama"), "--corpus", str(corpus),
                               "--seq-len", "32"],
            "eval.corpus: record 1 has no 'text' field (an evaluation corpus keeps its text in "
            "the field 'text')")


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


# recipe values, --set values, cluster settings, output location and the commands' own flags
# (each refused before any work: no Ray, no output folder content)

@pytest.mark.parametrize("text,pattern", [
    ("output: /a\nmodel: {path: /m}\noutput: /b\n",
     "is not valid YAML at line 3, column 1: key 'output' appears twice (first at line 1)"),
    ("model: {path: /m}\noutput: /o\nquantization:\n  bits: 3\n  bits: 4\n",
     "is not valid YAML at line 5, column 3: key 'bits' appears twice (first at line 4)"),
    ("model:\n\tpath: /m\n", "is not valid YAML at line 2, column 1: found character '\\t'"),
])
def test_recipe_yaml_with_a_repeated_key_or_a_tab(capsys, tmp_path, text, pattern):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    line = refused(capsys, tmp_path, ["quantize", "--config", str(path)], pattern)
    assert line.startswith(f"relayquant: error: --config: {path} ")


@pytest.mark.parametrize("item,pattern", [
    ("quantization.gptq.damp=.nan", "quantization.gptq.damp: expected a finite number, got nan"),
    ("quantization.budget.average_bits=.inf",
     "quantization.budget.average_bits: expected a finite number, got inf"),
    ("calibration.seed=-1", "calibration.seed: -1; use an integer from 0 to 4294967295"),
    ("export.formats=[compressed-tensors, compressed-tensors]", "names a format twice"),
    ("quantization.symmetric_range=full", "quantization.symmetric_range: full applies to "
                                          "symmetric grids, but quantization.symmetric is false"),
])
def test_set_values_no_run_can_use(capsys, tmp_path, tiny_model, corpus_files, item, pattern):
    refused(capsys, tmp_path, quantize_args(tmp_path, tiny_model("llama"), corpus_files[0],
                                            "--set", item), pattern)


@pytest.mark.parametrize("overrides,pattern", [
    ("{'re:.*proj': {bits: 8}, 're:.*down_proj': {bits: 2}}",
     "quantization.overrides['re:.*down_proj']: every linear it matches is taken first by "
     "another override (e.g. model.layers.0.mlp.down_proj by 're:.*proj'"),
    ("{'re:.*': null}", "quantization.overrides: keep all 28 linears of the model in full "
                        "precision, so nothing would be quantized"),
    ("{'re:.*mlp.*': {group_size: 24}}", "quantization.overrides['re:.*mlp.*'].group_size: 24 "
                                         "does not divide in_features 64 of "
                                         "model.layers.0.mlp.gate_proj"),
])
def test_overrides_that_change_nothing_or_cannot_apply(capsys, tmp_path, tiny_model,
                                                       corpus_files, overrides, pattern):
    refused(capsys, tmp_path, quantize_args(tmp_path, tiny_model("llama"), corpus_files[0],
                                            "--set", f"quantization.overrides={overrides}"),
            pattern)


def test_sensitivity_from_that_is_not_json(capsys, tmp_path, tiny_model, corpus_files):
    refused(capsys, tmp_path, quantize_args(
        tmp_path, tiny_model("llama"), corpus_files[0],
        quantization={"budget": {"average_bits": 3.0, "sensitivity_from": corpus_files[0]}}),
        f"quantization.budget.sensitivity_from: {corpus_files[0]} is not valid JSON")


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_output_that_overlaps_the_model_folder(capsys, tmp_path, tiny_model, corpus_files,
                                               where):
    """The output is written (and cleared by --restart): it must never touch the model."""
    model = copied_model(tiny_model, tmp_path)
    before = sorted(os.listdir(model))
    output = {"same": model, "inside": os.path.join(model, "q"), "around": str(tmp_path)}[where]
    pattern = {"same": f"output: {model} is the model folder (model.path)",
               "inside": f"output: {output} is inside the model folder {model} (model.path)",
               "around": f"output: {tmp_path} holds the model folder {model} (model.path)"}
    refused(capsys, tmp_path, quantize_args(tmp_path, model, corpus_files[0], "--restart",
                                            output=output), pattern[where])
    assert sorted(os.listdir(model)) == before


def test_cuda_device_on_a_machine_without_gpus(capsys, tmp_path, tiny_model, corpus_files,
                                               monkeypatch):
    import torch

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    refused(capsys, tmp_path, quantize_args(tmp_path, tiny_model("llama"), corpus_files[0],
                                            cluster={"device": "cuda"}),
            "cluster.device: cuda, but this machine has 0 CUDA GPU(s) for the 1 worker(s) of a "
            "local Ray")
    assert not os.path.exists(tmp_path / "out")


def test_depth_errors_beyond_the_evaluation_windows(capsys, tmp_path, tiny_model, corpus_files):
    refused(capsys, tmp_path, quantize_args(
        tmp_path, tiny_model("llama"), corpus_files[0],
        eval={"enabled": True, "corpus": corpus_files[1], "seq_len": 32, "max_windows": 3,
              "depth_errors": 5}),
        "eval.depth_errors: 5 exceeds the 3 evaluation windows")


@pytest.mark.parametrize("content,pattern", [
    ("device: h100-80g\nnodes: four\n", "--cluster: nodes: expected an integer, got 'four'"),
    ("device: h100-80g\nnodes: 1.5\n", "--cluster: nodes: expected an integer, got 1.5"),
    ("device: h100-80g\ndevices_per_node: 0\n", "--cluster: devices_per_node: 0; must be an "
                                                "integer >= 1"),
    ("device: h100-80g\nnetwork_bytes_per_s: -1\n", "--cluster: network_bytes_per_s: -1.0; "
                                                    "must be > 0"),
    ("device: h100-80g\nnetwork_bytes_per_s: .nan\n", "--cluster: network_bytes_per_s: "
                                                      "expected a finite number, got nan"),
    ("device: h100-80g\ngpus: 8\n", "--cluster: gpus: unknown key; allowed keys here: device"),
    ("nodes: 1\nnodes: 2\n", "key 'nodes' appears twice (first at line 1)"),
    ("nodes: 4\n", "--cluster: nodes: 4 needs a device preset (this machine is one node"),
    (b"\xff\xfe", "is not UTF-8 text"),
    ("device: h100-80g\nnodes: 2\ndevices_per_node: 8\n",
     "--cluster: 2 nodes x 8 devices_per_node = 16 workers exceed the model's 4 blocks in the "
     "sequential schedule"),
])
def test_plan_cluster_file_that_cannot_be_used(capsys, tmp_path, tiny_model, corpus_files,
                                               content, pattern):
    cluster = tmp_path / "cluster.yaml"
    if isinstance(content, bytes):
        cluster.write_bytes(content)
    else:
        cluster.write_text(content)
    refused(capsys, tmp_path, ["plan", "--config", write_recipe(
        tmp_path, tiny_model("llama"), corpus_files[0], cluster={"schedule": "sequential"}),
        "--cluster", str(cluster)], pattern)


@pytest.mark.parametrize("sections,pattern", [
    ({"quantization": {"group_size": 24}}, "quantization.group_size: 24 does not divide "
                                           "in_features 64"),
    ({"quantization": {"method": "gptq"}, "calibration": {"seq_len": 100000}},
     "calibration.seq_len: 100000 exceeds the model's context of 256 tokens"),
    ({"quantization": {"method": "gptq", "lorc": {"rank": 65}}},
     "quantization.lorc.rank: 65 exceeds the smaller side"),
])
def test_plan_checks_the_recipe_against_the_model(capsys, tmp_path, tiny_model, corpus_files,
                                                  sections, pattern):
    """`relayquant plan` refuses what `relayquant quantize` would, with the same message."""
    refused(capsys, tmp_path, ["plan", "--config", write_recipe(
        tmp_path, tiny_model("llama"), corpus_files[0], **sections)], pattern)


@pytest.mark.parametrize("extra,pattern", [
    (["--tasks", "hellaswag", "--abits", "4"], "--abits: applies to the perplexity evaluation, "
                                               "not to --tasks"),
    (["--tasks", "hellaswag", "--seq-len", "64"], "--seq-len: applies to the perplexity"),
    (["--limit", "5"], "--limit: applies to --tasks only"),
    (["--batch-size", "4"], "--batch-size: applies to --tasks only"),
    (["--tasks", "hellaswag", "--num-fewshot", "-1"], "--num-fewshot: -1; must be >= 0"),
    (["--tasks", "hellaswag", "--batch-size", "0"], "--batch-size: 0; must be >= 1"),
])
def test_eval_flags_of_the_other_evaluation_or_out_of_range(capsys, tmp_path, tiny_model,
                                                            extra, pattern):
    refused(capsys, tmp_path, ["eval", "--model", tiny_model("llama"), *extra], pattern)


def test_eval_tasks_on_a_folder_that_is_not_a_model(capsys, tmp_path):
    # refused before lm-eval starts (it would fail after its task index, with exit 1)
    refused(capsys, tmp_path, ["eval", "--model", str(tmp_path / "none"), "--tasks",
                               "hellaswag"], f"model.path: '{tmp_path / 'none'}' does not exist")
    refused(capsys, tmp_path, ["eval", "--model", str(tmp_path), "--tasks", "hellaswag"],
            f"model.path: no config.json in '{tmp_path}'")


@pytest.mark.parametrize("argv,pattern", [
    (["status", "nosuchproto://bucket/run"], "output: cannot open 'nosuchproto://bucket/run' "
                                             "(Protocol not known"),
    (["status", "OUT", "--set", "quantization.bits=3"], "--set: needs --config"),
    (["status", "OUT", "--config", "no-such-recipe"], "--config: 'no-such-recipe' is neither a "
                                                      "file nor a bundled recipe"),
    (["assets", "prepare", "sotu"], "assets prepare: takes no name"),
])
def test_status_and_assets_arguments(capsys, tmp_path, argv, pattern):
    refused(capsys, tmp_path, [str(tmp_path) if a == "OUT" else a for a in argv], pattern)


def test_output_in_this_process_memory(capsys, tmp_path, tiny_model, corpus_files):
    # the stage actors are other processes: they would write the blocks into their own memory
    # and the run would fail once every block is quantized
    refused(capsys, tmp_path, quantize_args(tmp_path, tiny_model("llama"), corpus_files[0],
                                            output="memory://relayquant-test/out"),
            "output: memory://relayquant-test/out lives in this process's memory")


@pytest.mark.parametrize("content", ["{}", "[1]", "not json", '{"plan": {"num_blocks": "4"}}'])
def test_damaged_manifest_in_the_output(capsys, tmp_path, tiny_model, corpus_files, content):
    """A run folder whose manifest.json is damaged is named, for quantize (which would resume
    from it) and for status, with exit 2; nothing is written over it."""
    model = copied_model(tiny_model, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(content)
    for argv in (quantize_args(tmp_path, model, corpus_files[0]), ["status", str(out)]):
        assert main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines()
               if line.startswith("relayquant: error")]
        assert len(err) == 1 and f"{out / 'manifest.json'} is damaged" in err[0], err
        assert "--restart" in err[0]
    assert (out / "manifest.json").read_text() == content
    assert not (out / "report.json").exists()
