"""Durable block checkpoints on fsspec (memory:// and local), with writes that fail midway."""
import uuid

import fsspec
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem

from pipeline import checkpoint, storage

pytestmark = pytest.mark.unit


def block(seed):
    g = torch.Generator().manual_seed(seed)
    return {"": {"model.layers.0.w": torch.randn(4, 8, generator=g)},
            "fake_quant": {"model.layers.0.w": torch.randn(4, 8, generator=g)}}


def write(output, index, seed=0):
    return checkpoint.write_block(output, index, block(seed), {"x": [4, None, False]},
                                  {"seconds": 1.0})


@pytest.mark.parametrize("kind", ["memory", "local"])
def test_markers_verify_and_damage_is_detected(tmp_path, kind):
    out = f"memory://run-{uuid.uuid4().hex}" if kind == "memory" else str(tmp_path / "out")
    for i in range(3):
        write(out, i, seed=i)
    good, bad = checkpoint.verified_markers(out, 3)
    assert sorted(good) == [0, 1, 2] and bad == []
    shard = storage.join(out, "fake_quant", checkpoint.block_shard_name(1))
    data = bytearray(storage.read_bytes(shard))
    data[-1] ^= 0x01
    storage.write_bytes(shard, bytes(data))
    good, bad = checkpoint.verified_markers(out, 3)
    assert sorted(good) == [0, 2] and bad == [1]
    assert not storage.exists(checkpoint.marker_path(out, 1))  # so the block is redone


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"files": 3}', b'{"metrics": {}}'])
def test_a_damaged_marker_counts_as_not_done(tmp_path, content):
    """A marker that cannot be read (only outside damage: markers are written by rename) is
    skipped with a warning, so its block is quantized again instead of the run failing."""
    out = str(tmp_path / "out")
    for i in range(3):
        write(out, i, seed=i)
    storage.write_bytes(checkpoint.marker_path(out, 1), content)
    good, bad = checkpoint.verified_markers(out, 3)
    assert sorted(good) == [0, 2] and bad == []
    assert sorted(checkpoint.read_markers(out)) == [0, 2]


class FailingFS(LocalFileSystem):
    """Local files, but the n-th write (open for writing or rename) raises."""

    protocol = "failing"
    fail_at = -1
    count = 0

    def _maybe_fail(self, what):
        FailingFS.count += 1
        if FailingFS.count == FailingFS.fail_at:
            raise OSError(f"injected failure during {what}")

    def open(self, path, mode="rb", **kwargs):
        f = super().open(path, mode, **kwargs)
        if "w" in mode:
            original = f.write

            def write(data):
                original(data[: len(data) // 2])  # half the bytes reach the file
                self._maybe_fail("write")
                return original(data[len(data) // 2 :])

            f.write = write
        return f

    def mv(self, path1, path2, **kwargs):
        self._maybe_fail("rename")
        return super().mv(path1, path2, **kwargs)


# write_block: shard "" (write, rename), shard fake_quant (write, rename), marker (write, rename)
@pytest.mark.parametrize("fail_at", range(1, 7))
def test_a_write_that_fails_midway_never_counts_as_done(tmp_path, fail_at):
    fsspec.register_implementation("failing", FailingFS, clobber=True)
    out = f"failing://{tmp_path}/out"
    FailingFS.count, FailingFS.fail_at = 0, fail_at
    with pytest.raises(OSError, match="injected failure"):
        write(out, 0)
    good, _ = checkpoint.verified_markers(out, 1)
    assert good == {}
    names = [n for sub in ("", "/fake_quant", "/.relayquant/blocks")
             for n in storage.list_names(f"{tmp_path}/out{sub}")]
    half_written = [n for n in names if ".tmp-" in n]
    assert all(n.startswith("model-block-") for n in names if ".tmp-" not in n and
               n.endswith(".safetensors"))
    # the retry succeeds and yields the same bytes as a clean write
    FailingFS.fail_at = -1
    marker = write(out, 0)
    good, bad = checkpoint.verified_markers(out, 1)
    assert list(good) == [0] and bad == []
    clean = write(str(tmp_path / "clean"), 0)
    assert marker["files"] == clean["files"]
    assert fail_at not in (1, 3, 5) or half_written  # a cut write leaves only a temporary
