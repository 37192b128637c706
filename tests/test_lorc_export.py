"""LoRC end to end: the adapter folder loads in plain transformers + peft (no relayquant import)
and gives relayquant's logits; both schedules write the same adapter; the report and
`relayquant eval` apply it."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_resume import shards

from cluster.coordinator import evaluate, quantize
from pipeline.config import ClusterConfig, EvalConfig, RunConfig
from pipeline.config.tree import build_config
from pipeline.model_parts import embed, run_block, run_head
from pipeline.plan import open_model

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.usefixtures("local_ray")]

PEFT_LOGITS = """
import sys, torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig
from peft import PeftModel
out, ids_path, logits_path = sys.argv[1:]
# compressed-tensors 0.17.1 keeps packed linears without a `.weight`, which PEFT cannot wrap
base = AutoModelForCausalLM.from_pretrained(
    out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
model = PeftModel.from_pretrained(base, out + "/lorc").eval()
folded = AutoModelForCausalLM.from_pretrained(out + "/fake_quant_lorc", dtype=torch.float32)
ours = [m for m in sys.modules if m.split(".")[0] in ("pipeline", "cluster", "jobs", "relayquant")]
assert not ours, ours
ids = torch.load(ids_path)
with torch.no_grad():
    logits = {"peft": model(input_ids=ids).logits, "folded": folded.eval()(input_ids=ids).logits}
    with model.disable_adapter():
        logits["base"] = model(input_ids=ids).logits
torch.save(logits, logits_path)
"""


def config(model, out, train, test, workers, evaluate_it, dtype="float16"):
    return build_config(RunConfig, {
        "model": {"path": model}, "output": out,
        "calibration": {"corpus": train, "num_samples": 8, "seq_len": 32},
        "quantization": {"method": "gptq", "bits": 2, "group_size": 16,
                         "lorc": {"rank": 4, "dtype": dtype}},
        "export": {"formats": ["compressed-tensors", "fake_quant_lorc"]},
        "eval": {"enabled": evaluate_it, "corpus": test, "seq_len": 32, "max_windows": 4},
        "cluster": {"workers": workers, "chunk_size": 4}})


def relayquant_logits(out, ids):
    parts = open_model(out, "float32", lorc=os.path.join(out, "lorc"))
    with torch.no_grad():
        h = embed(parts, parts.load_embedding(), ids)
        for i in range(parts.num_blocks):
            h = run_block(parts, parts.load_block(i), h)
        return run_head(parts.load_head(), h)


def test_adapter_loads_in_peft_and_matches_both_schedules(tiny_model, corpus_files, tmp_path):
    model = tiny_model("llama")
    out = str(tmp_path / "seq")
    report = quantize(config(model, out, *corpus_files, 1, True))
    lorc = report["lorc"]
    assert (lorc["rank"], lorc["dtype"], lorc["linears"]) == (4, "float16", 4 * 7)
    assert lorc["relative_residual"] < 1 and lorc["relative_storage_error"] < 1e-3
    assert lorc["total_bits_per_weight"] == pytest.approx(
        report["bits_per_weight"]["weights"] + lorc["adapter_bits_per_weight"])
    ppl = report["perplexity"]
    assert ppl["quantized"] < ppl["quantized_without_lorc"]
    with open(os.path.join(out, "lorc", "adapter_config.json")) as f:
        adapter_config = json.load(f)
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (4, 4)
    assert sorted(adapter_config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    # one fresh interpreter: transformers + peft only
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", PEFT_LOGITS, out, str(tmp_path / "ids.pt"),
                    str(tmp_path / "logits.pt")], check=True, capture_output=True, cwd=tmp_path)
    got = torch.load(tmp_path / "logits.pt")
    ours = relayquant_logits(out, ids)
    scale = ours.abs().max()
    assert (got["peft"] - ours).abs().max() / scale < 1e-3
    assert (got["folded"] - ours).abs().max() / scale < 1e-3
    assert (got["base"] - ours).abs().max() / scale > 1e-2  # the adapter does something
    # `relayquant eval` merges the adapter it finds next to the model
    eval_config = EvalConfig(corpus=corpus_files[1], seq_len=32, max_windows=4)
    assert evaluate(out, eval_config, ClusterConfig(workers=1))["perplexity"] == \
        pytest.approx(ppl["quantized"], rel=1e-5)
    # data-parallel on two workers: the same factors (up to the SVD's rounding on another
    # thread count; within one run every worker installs the owner's broadcast bytes)
    dp = str(tmp_path / "dp")
    quantize(config(model, dp, *corpus_files, 2, False))
    a = load_file(os.path.join(out, "lorc", "adapter_model.safetensors"))
    b = load_file(os.path.join(dp, "lorc", "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all((a[k].float() - b[k].float()).abs().max() <= 1e-3 * a[k].float().abs().max()
               for k in a)


def test_a_resumed_run_writes_the_same_adapter_and_weights(tiny_model, corpus_files, tmp_path):
    """A run that died after its 3rd block (later markers and shards, report and adapter
    gone) resumes through the saved factors of the done blocks and ends with the same bytes
    (int8 factors, two stages: the stream crosses a stage with the corrected weights)."""
    out = str(tmp_path / "out")
    run = config(tiny_model("llama", 6), out, *corpus_files, 2, False, dtype="int8")
    quantize(run)
    whole = shards(out)
    assert "lorc/adapter_model.safetensors" in whole and "lorc/lorc_int8.safetensors" in whole
    os.remove(os.path.join(out, "report.json"))
    for marker in sorted(glob.glob(os.path.join(out, ".relayquant", "blocks", "*.json")))[3:]:
        os.remove(marker)
    for f in glob.glob(os.path.join(out, "lorc", "*")):  # the adapter is written at the end
        os.remove(f)
    for i in (3, 4, 5):  # the later blocks' shards, in every layout
        for f in glob.glob(os.path.join(out, "**", f"model-block-{i:05d}.safetensors"),
                           recursive=True):
            os.remove(f)
    report = quantize(run)
    assert report["resumed_blocks"] == [0, 1, 2]
    assert report["lorc"]["linears"] == 6 * 7
    assert shards(out) == whole
