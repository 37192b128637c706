import json
import uuid

import pytest
import torch

from pipeline import storage
from pipeline.config import ConfigError

pytestmark = pytest.mark.unit


def make_checkpoint(root):
    a = {"model.layers.0.w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
         "model.layers.0.b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16)}
    b = {"model.layers.1.w": torch.arange(4, dtype=torch.int32), "model.norm.weight": torch.ones(3)}
    storage.write_tensors(storage.join(root, "s1.safetensors"), a)
    storage.write_tensors(storage.join(root, "s2.safetensors"), b)
    weight_map = {**{k: "s1.safetensors" for k in a}, **{k: "s2.safetensors" for k in b}}
    storage.write_json(storage.join(root, storage.INDEX_NAME), {"weight_map": weight_map})
    storage.write_json(storage.join(root, "config.json"), {"architectures": ["LlamaForCausalLM"]})
    return {**a, **b}


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_lazy_reads_by_name(tmp_path, kind):
    root = str(tmp_path) if kind == "local" else f"memory://ckpt-{uuid.uuid4().hex}"
    tensors = make_checkpoint(root)
    reader = storage.CheckpointReader(root)
    assert set(reader.entries) == set(tensors)
    assert reader.weight_files() == ["s1.safetensors", "s2.safetensors"]
    got = reader.read(["model.layers.0.b", "model.layers.1.w"])
    assert set(got) == {"model.layers.0.b", "model.layers.1.w"}
    for name, t in got.items():
        assert t.dtype == tensors[name].dtype and torch.equal(t, tensors[name])
    assert reader.nbytes(["model.layers.0.w"]) == 24
    fp = reader.fingerprint()
    assert set(fp["files"]) == {"s1.safetensors", "s2.safetensors"}
    assert len(fp["config_sha256"]) == 64


def test_missing_folder_and_weights(tmp_path):
    with pytest.raises(ConfigError, match="model.path: no config.json"):
        storage.CheckpointReader(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({}))
    with pytest.raises(ConfigError, match="model.path: no model.safetensors.index.json or "
                                          "model.safetensors"):
        storage.CheckpointReader(str(tmp_path))


def test_write_is_atomic_and_leaves_no_temporaries(tmp_path):
    path = str(tmp_path / "x" / "t.safetensors")
    sha = storage.write_tensors(path, {"a": torch.zeros(3)})
    assert storage.sha256_file(path) == sha
    assert storage.list_names(str(tmp_path / "x")) == ["t.safetensors"]
