"""Bad model folders and model files are refused before any work: exit 2, one line
naming the field or file and what is allowed, and no report.json (or manifest) in the output
folder. (Corpora: test_bad_corpora.py; recipe values, settings, outputs and flags: test_bad_recipes.py.)"""
import json
import os

import pytest
import torch
from bad_input_helpers import STREAMED, copied_model, quantize_args, refused, shards, write_recipe

pytestmark = pytest.mark.e2e

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
    ({"hidden_size": 128}, ("tensor model.embed_tokens.weight has shape [320, 64] in the "
                           "checkpoint, but config.json makes model.embed_tokens.weight [320, 128]")),
    ({"intermediate_size": 96}, "but config.json makes model.layers.0.mlp.gate_proj.weight [96, 64]"),
    ({"num_hidden_layers": 6}, "tensor model.layers.4.self_attn.q_proj.weight is missing"),
    ({"num_hidden_layers": 2}, ("the checkpoint holds tensor model.layers.2.input_layernorm.weight, "
                               "past the 2 blocks that config.json's num_hidden_layers says")),
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
    ({"num_hidden_layers": DROP}, ("config.json has no num_hidden_layers; it must be the model's "
                                  "number of blocks, a positive integer")),
    ({"num_hidden_layers": 0}, "config.json has num_hidden_layers 0; it must be"),
    ({"num_hidden_layers": "4"}, "config.json has num_hidden_layers '4'; it must be"),
    ({"num_attention_heads": 3}, ("config.json is not a valid llama config: ValueError: The "
                                 "hidden size (64) is not a multiple of the number of attention "
                                 "heads (3).")),
    ({"max_position_embeddings": None}, ("is not a valid llama config: TypeError: Field "
                                        "'max_position_embeddings' expected int")),
    ({"model_type": "foo"}, "config.json's model_type 'foo' is not known to transformers"),
    ({"model_type": "mistral"}, ("config.json's model_type 'mistral' builds MistralForCausalLM, "
                                "but its architectures say LlamaForCausalLM")),
    ({"architectures": "LlamaForCausalLM"}, ("config.json's architectures is 'LlamaForCausalLM'; "
                                            "it must be a list of class names")),
    ({"dtype": "int8"}, ("config.json does not describe a model transformers can build: "
                        "LlamaForCausalLM cannot be instantiated under `dtype=torch.int8`")),
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
    (["--model", "{model}/config.json"], ("model.path: '{model}/config.json' is a file; give the "
                                         "folder that holds it")),
    (["--model", ""], "model.path: required; give a model folder or an fsspec URL"),
    (["--model", "asset:nope"], "model.path: asset 'nope' is not known; known models: "),
    (["--model", "nosuchproto://bucket/model"], ("model.path: cannot open "
                                                "'nosuchproto://bucket/model' (Protocol not known")),
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
    ({"peft_type": "LORA"}, {"A": [4, 64], "B": [64, 4]}, ("has r None and lora_alpha None; r "
                                                          "must be a positive integer")),
    ({"peft_type": "LORA", "r": 4}, {"A": [4, 32], "B": [64, 4]},
     ("factors A [4, 32] and B [64, 4] do not fit model.layers.0.self_attn.q_proj's weight "
     "[64, 64] (A [r, in], B [out, r]); the adapter is of another model")),
    ({"peft_type": "LORA", "r": 4}, {"A": [4, 64]}, (f"holds {LORA}A.weight but not "
                                                    f"{LORA}B.weight")),
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
