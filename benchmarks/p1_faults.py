"""Protocol P1 under faults: kill the quantization run at random points (the driver, or one
stage actor), resume, and check the finished output is byte-identical to an uninterrupted run.

An uninterrupted reference run comes first. Then RUNS runs each take FAULTS faults at distinct
random blocks (in order): the run is killed at a random moment while that block is in work (SIGKILL of the driver's whole
process group, after which the same command is submitted again; or SIGKILL of one stage actor,
which the running job recovers from by itself). Time lost per fault = (faulted wall time -
reference wall time) / faults, reported relative to the mean block time. Writes
benchmarks/results/p1_faults.json.

    python benchmarks/p1_faults.py [--runs 4] [--faults 5] [--seed 0]
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

EXE = os.path.join(os.path.dirname(sys.executable), "relayquant")
# max_retries: every actor fault in a run is recovered in-process, whatever their number
SETTINGS = ["--set", "eval.enabled=false", "--set", "checkpoint.save_streams=true",
            "--set", "cluster.workers=2", "--set", "cluster.max_retries=20"]


sys.path.insert(0, os.path.dirname(__file__))
from results_file import write_result


def start(output: str) -> subprocess.Popen:
    return subprocess.Popen([EXE, "quantize", "--config", "p1-rtn-w4", "--output", output,
                             *SETTINGS], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def digests(output: str) -> dict[str, str]:
    return {os.path.relpath(f, output): hashlib.sha256(Path(f).read_bytes()).hexdigest()
            for f in sorted(glob.glob(os.path.join(output, "**", "*.safetensors"),
                                      recursive=True))}


def markers(output: str) -> int:
    return len(glob.glob(os.path.join(output, ".relayquant", "blocks", "*.json")))


def kill_stage_actor(job: subprocess.Popen) -> bool:
    for proc in psutil.Process(job.pid).children(recursive=True):
        try:
            if "StageActor" in " ".join(proc.cmdline()):
                proc.kill()
                return True
        except psutil.Error:
            continue
    return False


def faulted_run(output: str, faults: int, block_seconds: float, rng: random.Random) -> dict:
    events, wall = [], 0.0
    job, started = start(output), time.perf_counter()
    # distinct blocks spread over the run, in order: the fault hits while that block is in work
    for target in sorted(rng.sample(range(29), faults)):
        while markers(output) < target and job.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0, block_seconds))
        kind = rng.choice(["driver", "actor"])
        if job.poll() is not None:
            break
        if kind == "actor" and kill_stage_actor(job):
            events.append({"kind": "actor", "after_blocks": markers(output)})
            continue
        try:
            os.killpg(job.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        job.wait()
        wall += time.perf_counter() - started
        events.append({"kind": "driver", "after_blocks": markers(output)})
        job, started = start(output), time.perf_counter()
    code = job.wait()
    wall += time.perf_counter() - started
    return {"exit_code": code, "faults": events, "wall_seconds": wall}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--faults", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "p1_faults.json"))
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="relayquant-faults-") as work:
        ref_out = os.path.join(work, "reference")
        t0 = time.perf_counter()
        assert start(ref_out).wait() == 0, "the reference run failed"
        ref_wall = time.perf_counter() - t0
        report = json.loads(Path(ref_out, "report.json").read_text())
        block_seconds = sum(b["seconds"] for b in report["blocks"]) / len(report["blocks"])
        reference = digests(ref_out)
        runs = []
        for r in range(args.runs):
            out = os.path.join(work, f"run-{r}")
            run = faulted_run(out, args.faults, block_seconds, rng)
            run["identical"] = run["exit_code"] == 0 and digests(out) == reference
            run["lost_seconds_per_fault"] = (run["wall_seconds"] - ref_wall) / max(
                len(run["faults"]), 1)
            runs.append(run)
            print(json.dumps({"run": r, **run}), flush=True)
    faults = sum(len(r["faults"]) for r in runs)
    lost = sum(r["wall_seconds"] - ref_wall for r in runs) / max(faults, 1)
    result = {
        "benchmark": "p1_faults", "scheme": "rtn w4 per-channel asym, checkpoint.save_streams",
        "reference_wall_seconds": ref_wall, "mean_block_seconds": block_seconds,
        "runs_identical": sum(r["identical"] for r in runs), "runs": len(runs),
        "faults": faults,
        "faults_by_kind": {k: sum(e["kind"] == k for r in runs for e in r["faults"])
                           for k in ("driver", "actor")},
        "lost_seconds_per_fault": lost, "lost_per_fault_in_blocks": lost / block_seconds,
        "details": runs,
    }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
