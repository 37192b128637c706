"""The `cluster-real` tier: a real two-node Ray cluster on this machine (a head with its dashboard
and job server, and a second node process), token authentication on as Ray 2.60 sets it up, a
tiny-model job submitted with `ray job submit` exactly as the README shows, its logs followed
with `ray job logs`, its output checked; then every process of the cluster is stopped and none
may be left behind."""
import glob
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile

import psutil
import pytest
import yaml

pytestmark = pytest.mark.cluster_real
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


_GIVEN: set[int] = set()


def free_port():
    """A port free now and not handed out before in this run: the OS may return a port it
    just released, and two components given the same one make `ray start` fail."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def ray(*args, env, timeout=180, check=True):
    done = subprocess.run([RAY, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"ray {' '.join(args)} exited {done.returncode}:\n"
                             f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def cluster_processes(temp_dir, gcs_port):
    """Every process of this cluster: those naming its temp dir or GCS port, and their
    descendants (core workers, agents)."""
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if temp_dir in cmd or f":{gcs_port}" in cmd:
                found[p.pid] = p
                for child in p.children(recursive=True):
                    found[child.pid] = child
        except psutil.Error:
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_cluster(temp_dir, gcs_port):
    """Stop this cluster's processes only (never `ray stop`: it would stop every Ray on the
    machine, other tests' included)."""
    procs = cluster_processes(temp_dir, gcs_port)
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture
def two_node_cluster():
    # Ray's socket paths must stay under 108 bytes: a short temp dir, not pytest's
    temp_dir = tempfile.mkdtemp(prefix="rq-ray-", dir="/tmp")
    token = os.path.join(temp_dir, "auth_token")
    with open(token, "w") as f:
        f.write(secrets.token_hex(32))
    # as the README says: Ray is started from relayquant's environment, activated, so the job's
    # `python` is the environment's (a job's entrypoint resolves on the PATH Ray started with)
    venv_bin = os.path.dirname(sys.executable)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token,
           "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
           "VIRTUAL_ENV": os.path.dirname(venv_bin)}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = free_port(), free_port()

    def agent_ports() -> list[str]:
        # each node's agents on ports of their own: Ray's fixed defaults (52365 for the job
        # agent) would collide with any other Ray on this machine, and the job server would
        # then answer "No available agent to submit job"
        return [f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}",
                f"--metrics-export-port={free_port()}"]

    try:
        ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            "--include-dashboard=true", f"--ray-client-server-port={free_port()}",
            *agent_ports(), "--num-cpus=1", f"--temp-dir={temp_dir}", "--disable-usage-stats",
            env=env)
        ray("start", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
            *agent_ports(), "--disable-usage-stats", env=env)
        yield {"env": env, "dashboard": f"http://127.0.0.1:{dashboard}", "gcs": gcs,
               "temp_dir": temp_dir}
    finally:
        stop_cluster(temp_dir, gcs)
        left = cluster_processes(temp_dir, gcs)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes left behind: {[p.pid for p in left]}"


def test_ray_job_submit_runs_on_two_nodes(two_node_cluster, tmp_path, tiny_model, corpus_files):
    c = two_node_cluster
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"path": tiny_model("llama")}, "output": str(out),
        "calibration": {"corpus": corpus_files[0], "num_samples": 4, "seq_len": 32},
        "quantization": {"method": "gptq", "bits": 4, "group_size": 16},
        "eval": {"corpus": corpus_files[1], "seq_len": 32, "max_windows": 4},
        "cluster": {"workers": 2}}))
    # token authentication is really on: a wrong token is refused by the job server
    wrong = {**c["env"], "RAY_AUTH_TOKEN": "not-the-token"}
    refused = ray("job", "list", f"--address={c['dashboard']}", env=wrong, timeout=60,
                  check=False)
    assert refused.returncode != 0
    assert "token" in (refused.stdout + refused.stderr).lower()
    # the README's command: the repository as the working dir (.gitignore/.rayignore keep
    # .venv, .git, runs/ and benchmark results out of the upload); model and output are paths
    submitted = subprocess.run(
        [RAY, "job", "submit", f"--address={c['dashboard']}", "--working-dir", ".", "--no-wait",
         "--", "python", "-m", "jobs.quantize", "--config", str(recipe), "--json"],
        cwd=REPO, env=c["env"], capture_output=True, text=True, timeout=300, check=False)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job = next(w for w in (submitted.stdout + submitted.stderr).split()
               if w.strip("'").startswith("raysubmit_")).strip("'")
    logs = ray("job", "logs", f"--address={c['dashboard']}", "--follow", job, env=c["env"],
               timeout=600)
    status = ray("job", "status", f"--address={c['dashboard']}", job, env=c["env"])
    assert "succeeded" in (status.stdout + status.stderr).lower(), logs.stdout[-3000:]
    assert "placed 4 blocks on 2 stage(s)" in logs.stdout
    assert f":{c['gcs']}" in logs.stdout  # "connecting to Ray at IP:PORT": this cluster's
    summary = json.loads(next(line for line in logs.stdout.splitlines()
                              if line.startswith('{"output"')))
    assert summary["blocks"] == 4 and summary["output"] == str(out)
    report = json.loads((out / "report.json").read_text())
    nodes = {s["node_id"] for s in report["stages"]}
    assert len(nodes) == 2, report["stages"]  # one stage on each node
    assert report["perplexity"]["quantized"] > 0
    # what was uploaded: the code, without the virtual environment, git history or results
    unpacked = glob.glob(os.path.join(c["temp_dir"], "session_*", "runtime_resources",
                                      "working_dir_files", "_ray_pkg_*"))
    unpacked = [p for p in unpacked if os.path.isdir(p)]
    assert unpacked
    names = set(os.listdir(unpacked[0]))
    assert {"pipeline", "cluster", "jobs"} <= names
    assert not names & {".venv", ".git", "runs"}, names
    assert not os.path.exists(os.path.join(unpacked[0], "benchmarks", "results"))
