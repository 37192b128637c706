"""The output directory is the checkpoint: one shard per block, a marker per finished block
(written last, carrying the shard's checksum), the manifest, and at the end the index, config,
tokenizer and report.

    OUT/model-block-00007.safetensors     block 7's tensors (compressed-tensors layout)
    OUT/model-base.safetensors            embedding, final norm, head
    OUT/gptq/, OUT/fake_quant/            the same in the other requested layouts
    OUT/model.safetensors.index.json      written once every block is done
    OUT/.relayquant/blocks/00007.json     marker: shard names, sha256s, schemes, metrics
    OUT/manifest.json                     resolved config + input fingerprint
    OUT/report.json                       written last: the run is complete
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.streams import ChunkStore

log = logging.getLogger(__name__)

BASE_SHARD = "model-base.safetensors"
MANIFEST = "manifest.json"
REPORT = "report.json"
STATE_DIR = ".relayquant"


def block_shard_name(index: int) -> str:
    return f"model-block-{index:05d}.safetensors"


def marker_path(output: str, index: int) -> str:
    return storage.join(output, STATE_DIR, "blocks", f"{index:05d}.json")


def write_block(output: str, index: int, exports: dict[Any, dict[str, torch.Tensor]],
                schemes: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """Write the block's shard in every layout, then its marker; the marker alone says the
    block is done. `exports` maps a layout's folder ("" = the output itself) to tensors."""
    files = {}
    for folder, tensors in exports.items():
        name = f"{folder}/{block_shard_name(index)}" if folder else block_shard_name(index)
        sha = storage.write_tensors(storage.join(output, name), tensors, {"format": "pt"})
        files[folder] = {"file": name, "sha256": sha, "tensors": sorted(tensors)}
    marker = {"index": index, "files": files, "schemes": schemes, "metrics": metrics,
              "written_at": time.time()}
    storage.write_json(marker_path(output, index), marker)
    return marker


def read_markers(output: str) -> dict[int, dict[str, Any]]:
    folder = storage.join(output, STATE_DIR, "blocks")
    markers = {}
    for name in storage.list_names(folder):
        if name.endswith(".json") and name[:-5].isdigit():
            path = storage.join(folder, name)
            try:
                marker = json.loads(storage.read_bytes(path))
                files = marker["files"]
                ok = isinstance(files, dict) and all(
                    isinstance(f, dict) and {"file", "sha256"} <= set(f) for f in files.values())
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                ok = False
            if not ok:  # written by rename, so only outside damage gets here: redo the block
                log.warning("%s is damaged; block %d will be quantized again", path,
                            int(name[:-5]))
                continue
            markers[int(name[:-5])] = marker
    return markers


def verified_markers(output: str, total: int) -> tuple[dict[int, dict[str, Any]], list[int]]:
    """Markers whose every shard still has its recorded sha256, and the blocks whose shard is
    missing, truncated or changed (their markers are removed, so they are redone)."""
    good, bad = {}, []
    for index, marker in sorted(read_markers(output).items()):
        if index >= total:
            continue
        ok = all(storage.exists(storage.join(output, f["file"])) and
                 storage.sha256_file(storage.join(output, f["file"])) == f["sha256"]
                 for f in marker["files"].values())
        if ok:
            good[index] = marker
        else:
            bad.append(index)
            storage.remove(marker_path(output, index))
    return good, bad


def boundary_folder(output: str, boundary: int) -> str:
    return storage.join(output, STATE_DIR, "streams", f"{boundary:05d}")


def write_boundary(output: str, boundary: int, fp: list[torch.Tensor] | None,
                   q: list[torch.Tensor]) -> None:
    """Save the streams entering block `boundary` (fp None: the run carries no FP stream);
    `boundary.json` (checksums) is written last, then older boundaries are removed."""
    folder = boundary_folder(output, boundary)
    files = {}
    for kind, chunks in (("fp", fp or []), ("q", q)):
        for i, chunk in enumerate(chunks):
            name = f"{kind}-{i:05d}.safetensors"
            files[name] = storage.write_tensors(storage.join(folder, name), {"h": chunk})
    storage.write_json(storage.join(folder, "boundary.json"),
                       {"boundary": boundary, "chunks": len(q), "fp": fp is not None,
                        "sha256": files})
    parent = storage.join(output, STATE_DIR, "streams")
    for name in storage.list_names(parent):
        if name.isdigit() and int(name) != boundary:
            storage.remove(storage.join(parent, name))


def latest_boundary(output: str) -> dict[str, Any] | None:
    """The newest saved boundary whose files all match their checksums."""
    parent = storage.join(output, STATE_DIR, "streams")
    for name in sorted((n for n in storage.list_names(parent) if n.isdigit()), reverse=True):
        folder = storage.join(parent, name)
        meta_path = storage.join(folder, "boundary.json")
        if not storage.exists(meta_path):
            continue
        meta = storage.read_json(meta_path)
        if all(storage.exists(storage.join(folder, f)) and
               storage.sha256_file(storage.join(folder, f)) == h
               for f, h in meta["sha256"].items()):
            return {**meta, "folder": folder}
    return None


def read_boundary_chunk(boundary: dict[str, Any], kind: str, index: int) -> torch.Tensor:
    path = storage.join(boundary["folder"], f"{kind}-{index:05d}.safetensors")
    return storage.read_tensors(path)["h"]


def save_boundary(output: str, boundary: int, fp: list[Any] | None, q: list[Any],
                  store: ChunkStore) -> None:
    write_boundary(output, boundary, None if fp is None else [store.get(h) for h in fp],
                   [store.get(h) for h in q])


def load_boundary(boundary: dict[str, Any], store: ChunkStore
                  ) -> tuple[list[Any] | None, list[Any]]:
    """(fp, q) saved at a boundary; fp None where the run carries no FP stream."""
    def load(kind: str) -> list[Any]:
        return [store.put(read_boundary_chunk(boundary, kind, i))
                for i in range(boundary["chunks"])]

    return (load("fp") if boundary.get("fp", True) else None), load("q")


def write_index(output: str, files: dict[str, list[str]], total_size: int) -> None:
    weight_map = {t: f for f, names in sorted(files.items()) for t in names}
    storage.write_json(storage.join(output, storage.INDEX_NAME),
                       {"metadata": {"total_size": total_size},
                        "weight_map": dict(sorted(weight_map.items()))})


def is_relayquant_output(output: str) -> bool:
    return storage.exists(storage.join(output, MANIFEST))


def read_manifest(output: str) -> dict[str, Any]:
    """The run's manifest.json, checked for what resuming and `status` read from it; a damaged
    one is refused naming the file (the run cannot be resumed from it, only restarted)."""
    path = storage.join(output, MANIFEST)
    try:
        manifest = json.loads(storage.read_bytes(path))
        blocks = manifest["plan"]["num_blocks"]
        manifest["config"]["quantization"]["method"]
        if not isinstance(manifest.get("fingerprint"), dict) or isinstance(blocks, bool) or \
                not isinstance(blocks, int) or blocks < 1:
            raise ValueError("fingerprint or plan.num_blocks")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise ConfigError(f"output: {path} is damaged ({reason}); the run cannot resume from "
                          "it: pass --restart to quantize it again, or choose another output "
                          "folder") from e
    except OSError as e:
        raise ConfigError(f"output: cannot read {path} ({e.strerror or e})") from e
    return manifest


def status(output: str) -> dict[str, Any]:
    """What a run has done so far, from the files alone."""
    if not is_relayquant_output(output):
        return {"output": output, "exists": storage.exists(output), "relayquant": False,
                "done": 0, "total": 0, "complete": False}
    manifest = read_manifest(output)
    markers = read_markers(output)
    total = int(manifest["plan"]["num_blocks"])
    done = sorted(i for i in markers if i < total)
    report_path = storage.join(output, REPORT)
    complete = storage.exists(report_path)
    seconds = [markers[i]["metrics"].get("seconds", 0.0) for i in done]
    mean = sum(seconds) / len(seconds) if seconds else None
    return {
        "output": output, "relayquant": True, "done": len(done), "total": total,
        "complete": complete, "done_blocks": done,
        "remaining_blocks": [i for i in range(total) if i not in markers],
        # the block a live run works on now, or the one a resumed run starts with
        "next_block": None if complete else next((i for i in range(total) if i not in markers),
                                                 None),
        "started_at": manifest.get("started_at"),
        "elapsed_seconds": (time.time() - manifest["started_at"]) if manifest.get("started_at")
        else None,
        "estimated_remaining_seconds": None if mean is None or complete
        else mean * (total - len(done)),
        "method": manifest["config"]["quantization"]["method"],
    }
