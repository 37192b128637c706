"""One progress view on the driver: the actors post their events to it instead of printing,
each epoch is shown once whatever the number of workers, a live status line is redrawn in
place, quiet mode keeps the summary only, --log-json writes every event as a JSON line."""
import io
import json
import logging

import pytest
from test_cli import write_recipe

from cluster.progress import Progress, active, note
from jobs.cli import main


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.unit
def test_live_view_redraws_one_status_line_and_dedups_epochs(tmp_path):
    out = Terminal()
    log_file = tmp_path / "events.jsonl"
    with active(Progress("auto", str(log_file), stream=out)) as view:
        assert view.mode == "live"
        note("phase", "", name="quantize")
        for worker in (0, 1):  # both data-parallel workers train the same epoch
            view.epoch({"kind": "epoch", "message": "block 2: epoch 1/3, loss 1.0e+00",
                        "block": 1, "epoch": 1, "epochs": 3, "loss": 1.0, "worker": worker})
        note("block", "block 2/4 on 2 workers: 3.00s", block=1, blocks=4, eta=90.0,
             rss_bytes=2**31, loss=0.5)
        logging.getLogger("cluster.coordinator").warning("a log line through the view")
    text = out.getvalue()
    assert "\r\x1b[2K" in text
    drawn = [seg for seg in text.split("\r\x1b[2K") if seg and not seg.startswith("relayquant:")]
    status = drawn[-1]  # the status line as it stood when the view closed
    assert "quantize" in status and "block 2/4" in status and "epoch 1/3" in status
    assert "ETA 1m30s" in status and "RSS 2.0 GiB" in status and "busy: w0 w1" in status
    assert "relayquant: block 2/4 on 2 workers: 3.00s\n" in text
    assert "relayquant: a log line through the view\n" in text
    events = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [e["kind"] for e in events] == ["phase", "epoch", "block", "log"]  # epoch once
    assert events[2]["eta"] == 90.0 and events[2]["phase"] == "quantize"


@pytest.mark.e2e
@pytest.mark.cluster
@pytest.mark.usefixtures("local_ray")  # one Ray for both runs
def test_actors_feed_the_driver_view(capsys, tmp_path, tiny_model, corpus_files):
    log_file = tmp_path / "events.jsonl"
    recipe = write_recipe(tmp_path, tiny_model("llama"), *corpus_files,
                          quantization={"method": "omniquant", "bits": 4, "group_size": 16,
                                        "omniquant": {"epochs": 2, "batch_size": 2}},
                          cluster={"workers": 2, "schedule": "data_parallel"})
    assert main(["quantize", "--config", recipe, "--log-json", str(log_file)]) == 0
    err = capsys.readouterr().err
    events = [json.loads(line) for line in log_file.read_text().splitlines()]
    phases = [e["name"] for e in events if e["kind"] == "phase"]
    assert phases == ["prepare", "quantize", "finish", "evaluate"]
    epochs = [e for e in events if e["kind"] == "epoch"]
    assert [(e["block"], e["epoch"]) for e in epochs] == [(b, k) for b in range(4)
                                                          for k in (1, 2)]
    assert all(e["worker"] in (0, 1) for e in epochs)
    blocks = [e for e in events if e["kind"] == "block"]
    assert [e["block"] for e in blocks] == [0, 1, 2, 3] and blocks[-1]["eta"] == 0
    # the actors' own epoch prints are gone: each epoch is one driver line
    assert err.count("epoch 1/2") == 4 and "StageActor pid" not in err

    quiet = tmp_path / "quiet"
    assert main(["quantize", "--config", recipe, "--output", str(quiet), "--quiet"]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert not [line for line in lines if line.startswith("relayquant:")], lines
    assert lines[0].startswith("quantized 4 blocks with omniquant")


@pytest.mark.unit
def test_log_json_in_a_missing_folder_is_refused(capsys, tmp_path, tiny_model, corpus_files):
    recipe = write_recipe(tmp_path, tiny_model("llama"), *corpus_files)
    code = main(["quantize", "--config", recipe, "--log-json", str(tmp_path / "no" / "e.jsonl")])
    assert code == 2
    assert "relayquant: error: --log-json: cannot write" in capsys.readouterr().err
