"""Bad recipe values, --set values, cluster and evaluation settings, output locations and
command flags are refused before any work: exit 2, one line naming the field and what is
allowed, and no report.json (or manifest) in the output folder. (Model folders, model files
and corpora: test_bad_inputs.py.)"""
import json
import os

import pytest
import torch
from bad_input_helpers import STREAMED, copied_model, quantize_args, refused, write_recipe

from jobs.cli import main

pytestmark = pytest.mark.e2e

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
     ("quantization.lorc.rank: 65 exceeds the smaller side of model.layers.0.self_attn.q_proj "
     "(64 x 64)")),
    ({"quantization": {"bits": 4, "budget": {"average_bits": 9}}},
     "quantization.budget.average_bits: 9.0 is above what the widest choice (8 bits) costs"),
    ({"quantization": {"bits": 4, "symmetric": True, "symmetric_range": "wide"}},
     "quantization.symmetric_range: 'wide' is not allowed; choose restricted (or null) or full"),
])
def test_settings_the_model_or_the_data_cannot_take(capsys, tmp_path, tiny_model, corpus_files,
                                                    sections, pattern):
    refused(capsys, tmp_path, quantize_args(tmp_path, tiny_model("llama"), corpus_files[0],
                                            **sections), pattern)


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
    # nested aliases ("billion laughs"): 9 levels of 9 would copy to 9^9 values
    ("a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9))
     + "model: {path: /m}\noutput: /o\n", "expands to more than 100000 values"),
])
def test_recipe_yaml_with_a_repeated_key_a_tab_or_nested_aliases(capsys, tmp_path, text, pattern):
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
    ("quantization.symmetric_range=full", ("quantization.symmetric_range: full applies to "
                                          "symmetric grids, but quantization.symmetric is false")),
])
def test_set_values_no_run_can_use(capsys, tmp_path, tiny_model, corpus_files, item, pattern):
    refused(capsys, tmp_path, quantize_args(tmp_path, tiny_model("llama"), corpus_files[0],
                                            "--set", item), pattern)


@pytest.mark.parametrize("overrides,pattern", [
    ("{'re:.*proj': {bits: 8}, 're:.*down_proj': {bits: 2}}",
     ("quantization.overrides['re:.*down_proj']: every linear it matches is taken first by "
     "another override (e.g. model.layers.0.mlp.down_proj by 're:.*proj'")),
    ("{'re:.*': null}", ("quantization.overrides: keep all 28 linears of the model in full "
                        "precision, so nothing would be quantized")),
    ("{'re:.*mlp.*': {group_size: 24}}", ("quantization.overrides['re:.*mlp.*'].group_size: 24 "
                                         "does not divide in_features 64 of "
                                         "model.layers.0.mlp.gate_proj")),
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
    ("device: h100-80g\ndevices_per_node: 0\n", ("--cluster: devices_per_node: 0; must be an "
                                                "integer >= 1")),
    ("device: h100-80g\nnetwork_bytes_per_s: -1\n", ("--cluster: network_bytes_per_s: -1.0; "
                                                    "must be > 0")),
    ("device: h100-80g\nnetwork_bytes_per_s: .nan\n", ("--cluster: network_bytes_per_s: "
                                                      "expected a finite number, got nan")),
    ("device: h100-80g\ngpus: 8\n", "--cluster: gpus: unknown key; allowed keys here: device"),
    ("nodes: 1\nnodes: 2\n", "key 'nodes' appears twice (first at line 1)"),
    ("nodes: 4\n", "--cluster: nodes: 4 needs a device preset (this machine is one node"),
    (b"\xff\xfe", "is not UTF-8 text"),
    ("device: h100-80g\nnodes: 2\ndevices_per_node: 8\n",
     ("--cluster: 2 nodes x 8 devices_per_node = 16 workers exceed the model's 4 blocks in the "
     "sequential schedule")),
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
    ({"quantization": {"group_size": 24}}, ("quantization.group_size: 24 does not divide "
                                           "in_features 64")),
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
    (["--tasks", "hellaswag", "--abits", "4"], ("--abits: applies to the perplexity evaluation, "
                                               "not to --tasks")),
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
    (["status", "nosuchproto://bucket/run"], ("output: cannot open 'nosuchproto://bucket/run' "
                                             "(Protocol not known")),
    (["status", "OUT", "--set", "quantization.bits=3"], "--set: needs --config"),
    (["status", "OUT", "--config", "no-such-recipe"], ("--config: 'no-such-recipe' is neither a "
                                                      "file nor a bundled recipe")),
    (["assets", "prepare", "nosuch"], ("assets prepare: 'nosuch' is not known; choose from "
                                      "smollm2-135m, sotu, mail")),
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


@pytest.mark.parametrize("where", ["same", "file", "memory"])
def test_plan_checks_the_output_without_writing(capsys, tmp_path, tiny_model, corpus_files,
                                                where):
    """`relayquant plan` refuses what a run would refuse of its output, and writes nothing."""
    model = copied_model(tiny_model, tmp_path)
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    output = {"same": model, "file": str(taken), "memory": "memory://plan-out"}[where]
    pattern = {"same": f"output: {model} is the model folder (model.path)",
               "file": f"output: {taken} is a file; give a folder",
               "memory": "output: memory://plan-out lives in this process's memory"}[where]
    args = quantize_args(tmp_path, model, corpus_files[0], output=output)
    before = sorted(os.listdir(tmp_path))
    refused(capsys, tmp_path, ["plan", *args[1:]], pattern)
    assert sorted(os.listdir(tmp_path)) == before
    assert taken.read_text() == "not a folder"
