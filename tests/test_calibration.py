import json

import pytest
import torch

from pipeline import calibration
from pipeline.config import ConfigError

pytestmark = pytest.mark.unit


def test_windows_follow_the_p1_recipe():
    ids = torch.arange(10_000)
    windows = calibration.calibration_windows(ids, 16, 64, seed=0)
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 10_000 - 64 + 1, (16,), generator=g)
    assert windows.shape == (16, 64)
    assert torch.equal(windows[:, 0], starts)
    assert torch.equal(windows, calibration.calibration_windows(ids, 16, 64, seed=0))
    assert not torch.equal(windows, calibration.calibration_windows(ids, 16, 64, seed=1))


def test_too_short_corpus_says_so():
    with pytest.raises(ConfigError, match=r"calibration.corpus: too short: 1000 tokens, but "
                                          r"num_samples 128 x seq_len 512 needs 65536; .* at most "
                                          r"1 samples"):
        calibration.calibration_windows(torch.arange(1000), 128, 512, 0)


def test_eval_windows_drop_the_tail():
    w = calibration.eval_windows(torch.arange(1000), 300)
    assert w.shape == (3, 300) and int(w[-1, -1]) == 899
    assert calibration.eval_windows(torch.arange(1000), 300, max_windows=2).shape == (2, 300)
    with pytest.raises(ConfigError, match="eval.corpus: too short"):
        calibration.eval_windows(torch.arange(10), 300)


def test_text_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert calibration.load_text(str(tmp_path / "a.txt")) == "hello world"
    rows = [{"text": "one"}, {"text": "two"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert calibration.load_text(str(tmp_path / "a.jsonl")) == "one\n\ntwo"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x", "y"]}), tmp_path / "a.parquet")
    assert calibration.load_text(str(tmp_path / "a.parquet"), text_field="body") == "x\n\ny"
    with pytest.raises(ConfigError, match="parquet file has no column 'text'"):
        calibration.load_text(str(tmp_path / "a.parquet"))
    with pytest.raises(ConfigError, match="calibration.corpus: .* does not exist"):
        calibration.load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="is not a known corpus"):
        calibration.load_text("wiki")


def test_builtin_corpus_needs_preparing(tmp_path, monkeypatch):
    monkeypatch.setenv("RELAYQUANT_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="sotu:train is not prepared yet; run `relayquant "
                                          "assets prepare`"):
        calibration.load_text("sotu:train")
    (tmp_path / "corpora" / "sotu").mkdir(parents=True)
    (tmp_path / "corpora" / "sotu" / "test.txt").write_text("abc")
    assert calibration.load_text("sotu:test") == "abc"
    with pytest.raises(ConfigError, match="corpus sotu:dev is not known"):
        calibration.load_text("sotu:dev")


def test_byte_order_mark_is_not_text(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhello world")
    assert calibration.load_text(str(tmp_path / "bom.txt")) == "hello world"
