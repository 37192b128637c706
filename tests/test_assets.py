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
