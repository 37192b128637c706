"""RAY_ADDRESS is respected: the job joins a running cluster instead of starting its own.

In the `slow` tier since the cluster-real test (tests/test_cluster_real.py, default run) checks
the same through `ray job submit`, whose driver finds the cluster through RAY_ADDRESS and
prints "connecting to Ray at" that cluster's address; this one adds the plain `relayquant
quantize` entry point against a `ray start` head (about a minute)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from test_cli import write_recipe

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
AUTH_OFF = {"RAY_AUTH_MODE": "disabled"}  # a throwaway loopback cluster needs no token


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    bindir = os.path.dirname(sys.executable)
    port = free_port()
    env = {**os.environ, **AUTH_OFF}
    head = subprocess.Popen(
        [os.path.join(bindir, "ray"), "start", "--head", "--block", f"--port={port}",
         "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env=env)
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        probe = subprocess.run([os.path.join(bindir, "ray"), "status", f"--address={address}"],
                               capture_output=True, text=True, check=False, env=env)
        if probe.returncode == 0 and "No cluster status" not in probe.stdout:
            break
        time.sleep(2)
    else:
        head.kill()
        pytest.fail("ray head did not start: " + (head.stdout.read() if head.stdout else ""))
    yield address
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)


def test_quantize_joins_the_cluster_named_by_ray_address(ray_head, tmp_path, tiny_model,
                                                          corpus_files):
    recipe = write_recipe(tmp_path, tiny_model("llama"), *corpus_files, eval={"enabled": False})
    exe = os.path.join(os.path.dirname(sys.executable), "relayquant")
    env = {**os.environ, **AUTH_OFF, "RAY_ADDRESS": ray_head}
    done = subprocess.run([exe, "quantize", "--config", recipe, "--json"], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    assert f"connecting to Ray at {ray_head}" in done.stderr
    assert json.loads(done.stdout)["blocks"] == 4
    # the same job through `python -m jobs.quantize`, as `ray job submit` runs it
    again = subprocess.run([sys.executable, "-m", "jobs.quantize", "--config", recipe,
                            "--output", str(tmp_path / "again"), "--json"], env=env,
                           capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["blocks"] == 4
