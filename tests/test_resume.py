"""A run picks up where an earlier one stopped and ends with the same bytes."""
import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("local_ray")]


def recipe(tmp_path, model, train, name):
    data = {"model": {"path": model}, "output": str(tmp_path / name),
            "calibration": {"corpus": train, "num_samples": 8, "seq_len": 32},
            "quantization": {"bits": 3, "group_size": 16},
            "export": {"formats": ["compressed-tensors", "fake_quant"]},
            # the streamed path on sequential stages (the data-free and data-parallel
            # resumes: tests/test_data_parallel.py)
            "eval": {"enabled": False, "block_errors": True},
            "cluster": {"workers": 2, "chunk_size": 4, "schedule": "sequential"}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def relayquant(capsys, *args):
    """`relayquant ARGS` in this process (one Ray instance for all the runs): (exit code,
    what it wrote to stderr)."""
    from jobs.cli import main

    capsys.readouterr()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)  # as the command line's basicConfig sets it (pytest's is WARNING)
    try:
        code = main(list(args))
    finally:
        root.setLevel(level)
    return code, capsys.readouterr().err


def shards(folder):
    files = sorted(glob.glob(os.path.join(folder, "**", "*.safetensors"), recursive=True))
    return {os.path.relpath(f, folder): open(f, "rb").read() for f in files}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, corpus_files):
    """A whole run's shards, and a copy of its folder for the tests that damage one."""
    tmp = tmp_path_factory.mktemp("ref")
    from jobs.cli import main

    assert main(["quantize", "--config", recipe(tmp, tiny_model("llama", 6), corpus_files[0],
                                                "out")]) == 0
    return shards(str(tmp / "out")), tmp / "out"


def copy_of(done, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(done, out)
    return out


def test_damaged_blocks_are_redone_and_done_ones_kept(capsys, tmp_path, tiny_model,
                                                      corpus_files, reference):
    reference, done = reference
    config = recipe(tmp_path, tiny_model("llama", 6), corpus_files[0], "out")
    out = copy_of(done, tmp_path)
    os.remove(out / "report.json")  # as if the driver had died before finishing
    os.remove(out / ".relayquant" / "blocks" / "00004.json")  # block 4 never finished
    shard = out / "model-block-00001.safetensors"  # flip bytes in a finished block
    data = bytearray(shard.read_bytes())
    data[-5:] = bytes(b ^ 0xFF for b in data[-5:])
    shard.write_bytes(bytes(data))
    fake = out / "fake_quant" / "model-block-00002.safetensors"  # truncate another
    fake.write_bytes(fake.read_bytes()[:100])
    code, err = relayquant(capsys, "quantize", "--config", config, "--json")
    assert code == 0, err
    assert "blocks [1, 2]: shard missing or checksum mismatch; redoing them" in err
    assert "resuming: 3 of 6 blocks already done" in err
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_blocks"] == [0, 3, 5] and report["redone_blocks"] == [1, 2]
    assert shards(str(out)) == reference


def status_of(capsys, out):
    """`relayquant status OUT --json`, in process (it reads files only)."""
    from jobs.cli import main

    capsys.readouterr()
    assert main(["status", str(out), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_killed_driver_leaves_a_resumable_run(capsys, tmp_path, tiny_model, corpus_files,
                                              reference):
    """The one run that must be its own process: it is killed mid-run."""
    reference, _done = reference
    config = recipe(tmp_path, tiny_model("llama", 6), corpus_files[0], "out")
    exe = os.path.join(os.path.dirname(sys.executable), "relayquant")
    job = subprocess.Popen([exe, "quantize", "--config", config], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    marker = tmp_path / "out" / ".relayquant" / "blocks" / "00001.json"
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    status = status_of(capsys, tmp_path / "out")
    assert not status["complete"] and 2 <= status["done"] < 6 or status["done"] == 6
    code, err = relayquant(capsys, "quantize", "--config", config)
    assert code == 0, err
    assert shards(str(tmp_path / "out")) == reference
    status = status_of(capsys, tmp_path / "out")
    assert status["complete"] and status["done"] == 6


def test_saved_stream_boundary_is_used_when_it_fits(capsys, tmp_path, tiny_model,
                                                     corpus_files, reference):
    reference, _done = reference
    config = recipe(tmp_path, tiny_model("llama", 6), corpus_files[0], "out")
    args = ["--config", config, "--set", "checkpoint.save_streams=true"]
    assert relayquant(capsys, "quantize", *args)[0] == 0
    out = tmp_path / "out"
    assert sorted(os.listdir(out / ".relayquant" / "streams")) == ["00005"]  # newest only
    os.remove(out / "report.json")
    os.remove(out / ".relayquant" / "blocks" / "00005.json")
    code, err = relayquant(capsys, "quantize", *args)
    assert code == 0, err
    assert "resuming from the saved streams entering block 6" in err
    assert "block 6/6 on stage" in err and "block 5/6" not in err
    assert shards(str(out)) == reference
    # a boundary past the first unfinished block is not usable: streams are recomputed
    os.remove(out / "report.json")
    for i in (3, 4):
        os.remove(out / ".relayquant" / "blocks" / f"0000{i}.json")
    code, err = relayquant(capsys, "quantize", *args)
    assert code == 0, err
    assert "resuming from the saved streams" not in err
    assert shards(str(out)) == reference
