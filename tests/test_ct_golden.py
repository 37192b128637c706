"""relayquant's compressed-tensors writer against the bytes the real release writes
(tests/fixtures/ct_golden.json, recorded by tests/ct_golden.py)."""
import json
import os
import subprocess

import pytest
import torch
from ct_golden import CONFIG_GROUPS, IGNORE, case_arrays, cases, digest

from pipeline.formats import AffineFormat, QuantParams
from pipeline.formats import compressed_tensors as ct

pytestmark = pytest.mark.unit

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "ct_golden.json")


def golden() -> dict:
    with open(FIXTURE) as f:
        return json.load(f)


def relayquant_tensors(case: dict) -> dict[str, torch.Tensor]:
    """The same codes and parameters through relayquant's own writer, on its grids."""
    signed, zero, scale = case_arrays(case)
    fmt = AffineFormat(case["bits"], case["group_size"], case["symmetric"])
    shift = 0 if fmt.symmetric else 2 ** (fmt.bits - 1)
    codes = signed.to(torch.int32) + shift
    qparams = QuantParams(scale, zero.float() + shift if shift else torch.zeros_like(scale))
    return ct.compress_linear(codes, qparams, fmt, torch.float32)


def case_id(case: dict) -> str:
    kind = "sym" if case["symmetric"] else "asym"
    return f"w{case['bits']}-{kind}-g{case['group_size'] or 'ch'}-{case['out']}x{case['in']}"


def test_fixture_covers_every_scheme_and_the_current_release():
    data = golden()
    assert data["compressed_tensors"] == ct.LAYOUT_VERSION
    recorded = [{k: c[k] for k in ("bits", "symmetric", "out", "in", "group_size")}
                for c in data["cases"]]
    assert recorded == cases()
    assert {(c["bits"], c["symmetric"], c["group_size"] is None) for c in recorded} == {
        (b, s, ch) for b in range(2, 9) for s in (True, False) for ch in (True, False)}


@pytest.mark.parametrize("index", range(len(cases())), ids=[case_id(c) for c in cases()])
def test_bytes_match_the_current_compressed_tensors(index):
    expected = golden()["cases"][index]
    assert digest(relayquant_tensors(expected)) == expected["tensors"]


def test_quantization_config_is_what_the_release_writes():
    formats = {name: AffineFormat(bits, group, symmetric)
               for targets, bits, group, symmetric in CONFIG_GROUPS for name in targets}
    assert ct.quantization_config(formats, IGNORE) == golden()["quantization_config"]


def test_pinned_loader_parses_the_config():
    """compressed-tensors 0.17.1, which transformers loads through here, accepts the keys."""
    from compressed_tensors.quantization import QuantizationConfig

    formats = {name: AffineFormat(bits, group, symmetric)
               for targets, bits, group, symmetric in CONFIG_GROUPS for name in targets}
    config = QuantizationConfig.model_validate(ct.quantization_config(formats, IGNORE))
    assert sorted(config.config_groups) == ["group_0", "group_1", "group_2"]
    assert config.config_groups["group_1"].weights.symmetric is False


def test_round_trip_through_the_reader():
    for case in cases():
        signed, zero, scale = case_arrays(case)
        groups = scale.shape[1]
        expected = (signed.float() - zero.float().repeat_interleave(case["in"] // groups, 1)
                    ) * scale.repeat_interleave(case["in"] // groups, 1)
        fmt = AffineFormat(case["bits"], case["group_size"], case["symmetric"])
        w = ct.decompress_linear(relayquant_tensors(case), fmt, torch.float32)
        assert torch.equal(w, expected), case_id(case)


CURRENT_RELEASE = "0.20.1"


@pytest.fixture(scope="session")
def ct_release_python():
    """An interpreter with the current compressed-tensors release, in its own environment
    (the project pins 0.17.1 for loading): RELAYQUANT_CT_PYTHON if set, else a virtual
    environment made once under ~/.cache/relayquant/test-envs that installs only the release
    and reads everything else (torch, transformers) from this environment through a .pth."""
    if os.environ.get("RELAYQUANT_CT_PYTHON"):
        return os.environ["RELAYQUANT_CT_PYTHON"]
    import hashlib
    import shutil
    import sys
    import sysconfig

    main = sysconfig.get_paths()["purelib"]
    root = os.path.join(os.path.expanduser("~"), ".cache", "relayquant", "test-envs")
    env = os.path.join(root, f"compressed-tensors-{CURRENT_RELEASE}-"
                             f"{hashlib.sha256(main.encode()).hexdigest()[:8]}")
    python = os.path.join(env, "bin", "python")
    probe = [python, "-c", ("import compressed_tensors as c; assert c.__version__ == "
             f"{CURRENT_RELEASE!r}, c.__version__")]
    probed = os.path.exists(python) and subprocess.run(probe, capture_output=True,
                                                       check=False).returncode == 0
    if probed:
        return python
    os.makedirs(root, exist_ok=True)
    building = f"{env}.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", building], check=True, capture_output=True)
    site = subprocess.run([os.path.join(building, "bin", "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site, "zz_relayquant_main.pth"), "w") as f:
        f.write(main + "\n")  # after the env's own packages: its compressed-tensors wins
    done = subprocess.run([os.path.join(building, "bin", "python"), "-m", "pip", "install",
                           "--quiet", "--disable-pip-version-check",
                           f"compressed-tensors=={CURRENT_RELEASE}"],
                          capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        shutil.rmtree(building, ignore_errors=True)
        pytest.fail(f"could not install compressed-tensors {CURRENT_RELEASE} for the golden "
                    f"test: {done.stderr[-2000:]}")
    shutil.rmtree(env, ignore_errors=True)
    os.replace(building, env)  # venv scripts name their folder: use the interpreter directly
    return python


def test_fixture_regenerates_with_the_release(tmp_path, ct_release_python):
    """Re-record the golden bytes with the release itself (in its own environment, since the
    project pins an older compressed-tensors for loading) and compare."""
    out = tmp_path / "golden.json"
    script = os.path.join(os.path.dirname(__file__), "ct_golden.py")
    subprocess.run([ct_release_python, script, str(out)], check=True,
                   capture_output=True, timeout=300, cwd=tmp_path)
    assert json.loads(out.read_text()) == golden()


LOGITS = """
import sys, torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig
ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
for folder, out, dequantize in zip(sys.argv[1::3], sys.argv[2::3], sys.argv[3::3]):
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} \\
        if dequantize == "1" else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, out)
"""


def write_rtn_checkpoint(model: str, out: str, fmt: AffineFormat, packed: bool) -> str:
    """Every block linear of `model` rounded to `fmt`, packed (compressed-tensors) or
    dequantized in place (the reference); written without Ray."""
    import shutil

    from pipeline import storage
    from pipeline.formats import choose_qparams, dequantize, quantize

    shutil.copytree(model, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    reader = storage.CheckpointReader(model)
    tensors, formats = {}, {}
    for name, w in reader.read(list(reader.entries)).items():
        if not (name.startswith("model.layers.") and name.endswith("proj.weight")):
            tensors[name] = w
            continue
        qp = choose_qparams(w, fmt)
        codes = quantize(w, qp, fmt)
        linear = name.removesuffix(".weight")
        formats[linear] = fmt
        if not packed:
            tensors[name] = dequantize(codes, qp, fmt, w.dtype)
            continue
        for suffix, t in ct.compress_linear(codes, qp, fmt, w.dtype).items():
            tensors[f"{linear}.{suffix}"] = t
    storage.write_tensors(os.path.join(out, "model.safetensors"), tensors, {"format": "pt"})
    config = storage.read_json(os.path.join(model, "config.json"))
    if packed:
        config["quantization_config"] = ct.quantization_config(formats, ["lm_head"])
    storage.write_json(os.path.join(out, "config.json"), config)
    return out


@pytest.mark.parametrize("bits,symmetric", [(3, True), (3, False), (5, True), (4, False)])
def test_current_release_loads_it_in_transformers(tiny_model, tmp_path, bits, symmetric,
                                                  ct_release_python):
    """transformers with the current compressed-tensors loads the dense layout and computes
    what the dequantized weights compute. Asymmetric checkpoints need dequantize=True there:
    compressed-tensors >= 0.18 builds the compressed module on the meta device without packing
    the zero point, so its [out, groups] placeholder refuses the packed checkpoint tensor."""
    fmt = AffineFormat(bits, 16, symmetric)
    argv = []  # both checkpoints' logits from one interpreter (its imports cost seconds)
    for packed in (True, False):
        folder = write_rtn_checkpoint(tiny_model("llama", 2), str(tmp_path / f"m{packed}"),
                                      fmt, packed)
        argv += [folder, str(tmp_path / f"logits-{packed}.pt"),
                 "1" if packed and not symmetric else "0"]
    subprocess.run([ct_release_python, "-c", LOGITS, *argv], check=True, capture_output=True,
                   timeout=300, cwd=tmp_path)
    logits = {packed: torch.load(tmp_path / f"logits-{packed}.pt") for packed in (True, False)}
    assert torch.allclose(logits[True], logits[False], rtol=0, atol=1e-5)
