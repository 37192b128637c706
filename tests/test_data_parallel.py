"""The data_parallel schedule: every worker keeps its share of the windows and all train each
block together. Integer codes byte-identical to one worker for RTN and GPTQ; learned
reconstruction equal up to floating-point reduction order, with the same keep_best choices;
resumes byte-identical, also across schedules."""
import glob
import os

import pytest
import torch
from safetensors.torch import load_file
from test_coordinator import assert_documented

from cluster.coordinator import evaluate, quantize
from pipeline.config import ClusterConfig, ConfigError, RunConfig, Schedule
from pipeline.config.tree import build_config
from pipeline.parallel.shares import WindowShare, split_windows_among
from pipeline.reconstruct import assign_by_cost
from pipeline.streams import MemoryStore
from pipeline.training.steps import Batches, StepGradients

# --- unit: the shares, the batches, the assignment --------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("total,workers,batch", [(12, 2, 2), (12, 2, 3), (13, 3, 4), (8, 3, 2),
                                                 (10, 2, 2), (7, 4, 4)])
def test_every_window_once_and_every_batch_spread(total, workers, batch):
    shares = split_windows_among(total, workers, batch)
    assert sorted(j for s in shares for j in s.indices) == list(range(total))
    whole = WindowShare.whole(total)
    for share in shares:
        assert list(share.indices) == sorted(share.indices) and share.total == total
        assert share.steps(batch) == whole.steps(batch)
    # summed over the workers, each step sees exactly the global batch
    sizes = [s.batch_sizes(batch) for s in shares]
    assert [sum(col) for col in zip(*sizes, strict=True)] == whole.batch_totals(batch)
    # each batch is split as evenly as whole windows allow (when it has enough windows)
    for k, col in enumerate(zip(*sizes, strict=True)):
        if whole.batch_totals(batch)[k] == batch and batch >= workers:
            assert max(col) - min(col) <= 1


@pytest.mark.unit
def test_batches_follow_the_sizes_including_empty_steps():
    store = MemoryStore()
    stream = [torch.arange(5.0).reshape(5, 1, 1), torch.arange(5.0, 7.0).reshape(2, 1, 1)]
    got = [b[0].flatten().tolist() if b else None
           for b in Batches([stream], store, [0, 2, 0, 3, 2, 0], "cpu")]
    assert got == [None, [0.0, 1.0], None, [2.0, 3.0, 4.0], [5.0, 6.0], None]


@pytest.mark.unit
def test_linears_are_spread_by_cost_the_same_way_everywhere():
    names = ["q", "k", "v", "o", "gate", "up", "down"]
    costs = [4.0, 1.0, 1.0, 4.0, 12.0, 12.0, 12.0]
    owners = assign_by_cost(names, costs, 2)
    load = [sum(c for c, o in zip(costs, owners, strict=True) if o == w) for w in range(2)]
    assert abs(load[0] - load[1]) <= 4.0
    assert owners == assign_by_cost(names, costs, 2)
    assert assign_by_cost(names, costs, 1) == [0] * 7


class FakeGroup:
    """Two workers where the other one always contributes the same gradients: the sum doubles
    them (and the loss)."""

    rank, world, wait_seconds = 0, 2, 0.0

    def sum_(self, tensors):
        for t in tensors:
            t.mul_(2)


@pytest.mark.unit
def test_step_gradients_sum_windows_in_float64_then_over_workers():
    """The windows' gradients are taken with respect to the step's tensors, summed (float64
    above two windows), summed over the workers, then sent back through the graph that made
    the tensors (here x3 on `a`) once."""
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(2, requires_grad=True)
    step = StepGradients(FakeGroup())
    tensors = step.start(4, {"a": a * 3, "b": b * 1, "fixed": torch.ones(2)})
    assert not tensors["a"].grad_fn and tensors["a"].requires_grad  # cut from the graph
    for w in range(2):
        loss = (tensors["a"] * (w + 1)).sum() / 2 + tensors["fixed"].sum() * 0
        step.add(loss, loss)
    assert step.finish() == 27.0  # (4.5 + 9) x 2 workers
    # d/da of 3 * (1 + 2) / 2 per element, x2 workers
    assert a.grad.tolist() == [9.0, 9.0, 9.0] and a.grad.dtype == torch.float32
    assert b.grad is None  # no window reached it on any worker


@pytest.mark.unit
def test_schedule_setting():
    assert ClusterConfig(workers=1).resolved_schedule is Schedule.SEQUENTIAL
    assert ClusterConfig(workers=2).resolved_schedule is Schedule.DATA_PARALLEL
    assert ClusterConfig(workers=2, schedule=Schedule.SEQUENTIAL).resolved_schedule is \
        Schedule.SEQUENTIAL
    with pytest.raises(ConfigError, match="cluster.schedule: 'pipeline' is not allowed; choose "
                                          "one of sequential, data_parallel"):
        build_config(RunConfig, {"output": "x", "cluster": {"schedule": "pipeline"}})


# --- end to end on local Ray ---------------------------------------------------------------------

cluster = pytest.mark.usefixtures("local_ray")


def run_config(model, out, train, test, workers, schedule=None, chunk_size=5, **quantization):
    return build_config(RunConfig, {
        "model": {"path": model}, "output": out,
        "export": {"formats": ["compressed-tensors", "fake_quant"]},
        "calibration": {"corpus": train, "num_samples": 12, "seq_len": 32, "seed": 0},
        "quantization": {"bits": 3, "group_size": 16, **quantization},
        "eval": {"corpus": test, "seq_len": 32, "max_windows": 12, "enabled": False},
        "cluster": {"workers": workers, "chunk_size": chunk_size, "schedule": schedule}})


def shards(folder):
    return {os.path.relpath(f, folder): open(f, "rb").read()
            for f in sorted(glob.glob(os.path.join(folder, "*.safetensors")))}


def fake_quant(folder):
    out = {}
    for f in glob.glob(os.path.join(folder, "fake_quant", "*.safetensors")):
        out.update(load_file(f))
    return out


@cluster
@pytest.mark.cluster
@pytest.mark.e2e
def test_gptq_codes_byte_identical_on_one_two_and_three_workers(tiny_model, corpus_files,
                                                                tmp_path):
    model = tiny_model("qwen2")
    reports = {}
    for workers in (1, 2, 3):
        out = str(tmp_path / f"w{workers}")
        reports[workers] = quantize(run_config(model, out, *corpus_files, workers,
                                               schedule="data_parallel", method="gptq",
                                               gptq={"act_order": True}))
    for workers in (2, 3):
        assert shards(str(tmp_path / f"w{workers}")) == shards(str(tmp_path / "w1"))
        for block in reports[workers]["blocks"]:
            assert [w["worker"] for w in block["workers"]] == list(range(workers))
            assert all(w["compute_seconds"] > 0 and w["collective_seconds"] >= 0
                       for w in block["workers"])


def _learned(optimizer, batch_size):
    return {"method": "omniquant", "omniquant": {
        "epochs": 2, "let": True, "lwc": True, "rounding": "learned", "clip_param": "direct",
        "lwc_init": 8.0, "optimizer": optimizer, "keep_best": True, "batch_size": batch_size,
        "lwc_lr": 5e-3, "let_lr": 5e-3, "round_lr": 5e-3}}


@cluster
@pytest.mark.cluster
@pytest.mark.e2e
@pytest.mark.parametrize("optimizer,batch_size,counts,split,shm,every,keep_best", [
    ("adamw", 4, (2, 3), False, True, 0, True), ("signsgd", 2, (2, 3), True, True, 2, True),
    ("adamw", 4, (3,), True, False, 0, False)])
def test_learned_reconstruction_matches_one_worker(tiny_model, corpus_files, tmp_path, optimizer,
                                                   batch_size, counts, split, shm, every,
                                                   keep_best, monkeypatch):
    """LWC + LET + learned rounding with keep_best: the weights within 1e-5 relative of one
    worker's and the same best step in every block (3 workers on a batch of 4: uneven shares
    2 + 1 + 1, float64 sums; signsgd with a batch of 2: float32 sums, and on 3 workers one
    holds no window and only joins the collectives), with the quantizer split among the
    workers (each computes its share of the linears; LET's scales summed from every owner's
    part) and without; the split exchanging through shared memory (one node) and through
    gloo (as workers on several nodes, or GPUs through NCCL, do); keep_best judged on the
    fixed set every 2 steps (`every`; with the split quantizer each check reads every
    tensor from its owner) or on each step's batch; through gloo without keep_best, so the
    last step's parameters count, bit for bit the same as one worker's (a step that differs
    in the last bit flips rounding decisions: the weights then differ by percents)."""
    if not shm:
        monkeypatch.setenv("RELAYQUANT_SHARED_MEMORY", "0")
    model = tiny_model("llama")
    quantization = _learned(optimizer, batch_size)
    quantization["omniquant"]["shard_quantizer"] = split
    quantization["omniquant"]["keep_best_every"] = every
    quantization["omniquant"]["keep_best"] = keep_best
    ref_report = quantize(run_config(model, str(tmp_path / "w1"), *corpus_files, 1,
                                     **quantization))
    ref = fake_quant(str(tmp_path / "w1"))
    for workers in counts:
        out = str(tmp_path / f"w{workers}")
        report = quantize(run_config(model, out, *corpus_files, workers,
                                     schedule="data_parallel", **quantization))
        got = fake_quant(out)
        assert got.keys() == ref.keys()
        for name in ref:
            diff = (got[name].double() - ref[name].double()).norm()
            assert diff <= 1e-5 * ref[name].double().norm(), (workers, name)
            if not keep_best:  # no choice made on summed losses: the same steps, same bits
                assert torch.equal(got[name], ref[name]), (workers, name)
        for mine, theirs in zip(report["blocks"], ref_report["blocks"], strict=True):
            assert mine["quantizer_split"] is split
            if split:
                assert mine["quantizer_exchange"] == ("shared_memory" if shm else "distributed")
            assert mine.get("best_step") == theirs.get("best_step")
            assert ("best_step" in mine) is keep_best
            kept = "best_check_loss" if every else "best_train_loss"
            if keep_best:
                assert mine[kept] == pytest.approx(theirs[kept], rel=1e-4)
            assert mine.get("best_checks") == theirs.get("best_checks")
            assert ("best_checks" in mine) is bool(every)
            assert mine["loss_before"] == pytest.approx(theirs["loss_before"], rel=1e-5)
        assert_documented(report)
    assert_documented(ref_report)


@cluster
@pytest.mark.cluster
@pytest.mark.e2e
def test_cqe_plus_on_two_workers_matches_one(tiny_model, corpus_files, tmp_path):
    """SDE (band, dense block, penalty) and cross-layer learning on 2 data-parallel workers:
    the weights within 1e-5 relative of one worker's, the same best steps; each worker reads
    the next block from storage itself."""
    model = tiny_model("llama", 2)  # block 0 reads block 1; block 1 is the last
    quantization = _learned("signsgd", 2)
    quantization["omniquant"].update(
        sde={"band": 1, "block": 4, "lr": 5e-3, "penalty": 0.01},
        cross_layer={"weight": 1.0, "depth": 1})
    reports, weights = {}, {}
    for workers in (1, 2):
        out = str(tmp_path / f"w{workers}")
        reports[workers] = quantize(run_config(model, out, *corpus_files, workers,
                                               schedule="data_parallel" if workers > 1
                                               else None, **quantization))
        weights[workers] = fake_quant(out)
    for name, ref in weights[1].items():
        diff = (weights[2][name].double() - ref.double()).norm()
        assert diff <= 1e-5 * ref.double().norm(), name
    for mine, theirs in zip(reports[2]["blocks"], reports[1]["blocks"], strict=True):
        assert mine["quantizer_split"] and "quantizer_split" not in theirs
        assert mine["best_step"] == theirs["best_step"]
        assert mine["cross_layer_blocks"] == theirs["cross_layer_blocks"]
        assert mine["sde_relative_change"] == pytest.approx(theirs["sde_relative_change"],
                                                            rel=1e-4)
    assert reports[1]["blocks"][-1]["cross_layer_blocks"] == []
    assert_documented(reports[2])


@cluster
@pytest.mark.cluster
@pytest.mark.e2e
def test_resume_across_schedules_is_byte_identical(tiny_model, corpus_files, tmp_path):
    """A run with its last blocks unfinished resumes in the other schedule (and on another
    worker count) with the same bytes; evaluation agrees on every schedule."""
    model = tiny_model("llama", 6)
    ref = None  # the first whole run's shards (both schedules give the same)
    for first, second in (("sequential", "data_parallel"), ("data_parallel", "sequential")):
        out = str(tmp_path / f"{first}-{second}")
        quantize(run_config(model, out, *corpus_files, 2, schedule=first, method="gptq"))
        whole = shards(out)
        ref = whole if ref is None else ref
        assert whole == ref
        for index in (3, 4, 5):  # as if the run had stopped after block 3
            os.remove(os.path.join(out, ".relayquant", "blocks", f"{index:05d}.json"))
            os.remove(os.path.join(out, f"model-block-{index:05d}.safetensors"))
        os.remove(os.path.join(out, "report.json"))
        report = quantize(run_config(model, out, *corpus_files, 3, schedule=second,
                                     method="gptq"))
        assert report["resumed_blocks"] == [0, 1, 2]
        assert shards(out) == ref
    eval_config = run_config(model, out, *corpus_files, 1).eval
    ppl = {(w, s): evaluate(out, eval_config, ClusterConfig(workers=w, chunk_size=5,
                                                              schedule=s))["perplexity"]
           for w, s in ((1, None), (2, Schedule.SEQUENTIAL), (3, Schedule.DATA_PARALLEL))}
    assert ppl[(2, Schedule.SEQUENTIAL)] == pytest.approx(ppl[(1, None)], rel=1e-6)
    assert ppl[(3, Schedule.DATA_PARALLEL)] == pytest.approx(ppl[(1, None)], rel=1e-6)


@cluster
@pytest.mark.cluster
@pytest.mark.e2e
def test_data_free_rtn_gives_the_streamed_shards_and_resumes(tiny_model, corpus_files,
                                                             tmp_path):
    """RTN reads no calibration: the shards are those of the streamed path (which measures
    each block's output error), on both schedules; a damaged block is redone."""
    model = tiny_model("llama", 6)
    streamed = str(tmp_path / "streamed")
    ref = quantize(build_config(RunConfig, {**_plain(run_config(
        model, streamed, *corpus_files, 1)), "eval": {"enabled": False, "block_errors": True}}))
    assert all("output_relative_error" in b for b in ref["blocks"])
    for workers, schedule in ((1, None), (2, "sequential"), (3, "data_parallel")):
        out = str(tmp_path / f"free-{workers}")
        report = quantize(run_config(model, out, *corpus_files, workers, schedule=schedule))
        assert all(b["data_free"] and "output_relative_error" not in b
                   for b in report["blocks"])
        assert report["fingerprint"]["calibration_sha256"] is None
        assert shards(out) == shards(streamed)
    out = str(tmp_path / "free-3")
    os.remove(os.path.join(out, "report.json"))
    os.remove(os.path.join(out, ".relayquant", "blocks", "00004.json"))
    report = quantize(run_config(model, out, *corpus_files, 3, schedule="data_parallel"))
    assert report["resumed_blocks"] == [0, 1, 2, 3, 5]
    assert shards(out) == shards(streamed)


def _plain(config):
    from pipeline.config.tree import config_to_dict

    return config_to_dict(config)


@cluster
@pytest.mark.cluster
@pytest.mark.e2e
def test_a_tenth_of_the_streams_in_memory_gives_the_same_bytes(tiny_model, corpus_files,
                                                                 tmp_path):
    """cluster.activation_memory_bytes: chunks beyond it go to local disk and come back
    bit-identical; the report says how much each worker spilled and read."""
    model = tiny_model("llama")
    hidden = 64
    streams = 2 * 12 * 32 * hidden * 4  # both streams of all windows, float32
    reports = {}
    for name, budget in (("free", None), ("tight", streams // 10)):
        config = build_config(RunConfig, {**_plain(run_config(
            model, str(tmp_path / name), *corpus_files, 2, schedule="data_parallel",
            method="gptq")), "cluster": {"workers": 2, "chunk_size": 2,
                                         "schedule": "data_parallel",
                                         "activation_memory_bytes": budget}})
        reports[name] = quantize(config)
    assert shards(str(tmp_path / "tight")) == shards(str(tmp_path / "free"))
    last = {k: r["blocks"][-1]["workers"] for k, r in reports.items()}
    assert all(w["spilled_bytes"] == 0 for w in last["free"])
    for w in last["tight"]:
        assert w["spilled_bytes"] > streams / 2 and w["spill_read_bytes"] > 0
        assert w["stream_memory_peak_bytes"] <= streams // 10
