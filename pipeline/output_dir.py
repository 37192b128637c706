"""Opening and finishing a run's output directory: the manifest and fingerprint at the start,
the shared tensors, index, config and tokenizer at the end, the report last."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

import pipeline
from pipeline import checkpoint, storage
from pipeline.config import ConfigError, ExportFormat, LorcConfig, RunConfig
from pipeline.config.tree import config_to_dict
from pipeline.export import FOLDERS, format_config, kernel_flags
from pipeline.formats import AffineFormat
from pipeline.formats.peft_adapter import write_adapter
from pipeline.model_parts import ModelParts
from pipeline.plan import Plan
from pipeline.schemes import vllm_servable

RESULT_SECTIONS = ("calibration", "quantization", "export")  # config sections that change the weights


def fingerprint(config: RunConfig, parts: ModelParts, calib: torch.Tensor | None
                ) -> dict[str, Any]:
    """What makes a run's result: the model, the result-bearing config, the calibration
    windows (None: a data-free run reads none), the code version."""
    data = config_to_dict(config)
    return {
        "model": parts.reader.fingerprint(),
        "config": {k: data[k] for k in RESULT_SECTIONS},
        "calibration_sha256": (hashlib.sha256(calib.numpy().tobytes()).hexdigest()
                               if calib is not None else None),
        "relayquant_version": pipeline.__version__,
    }


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{where}.{key}" if where else key)
        return out
    return [] if old == new else [f"{where}: {old!r} -> {new!r}"]


def fingerprint_differences(output: str, config: RunConfig, parts: ModelParts,
                            calib: torch.Tensor | None) -> list[str]:
    """What differs between the run in `output` and `config` (empty: same run)."""
    old = checkpoint.read_manifest(output)
    return _differences(old.get("fingerprint"), fingerprint(config, parts, calib))


def check_output_kind(out: str) -> None:
    """What can be told of the output without writing anything (what `relayquant plan`
    checks): not a file, and not in this process's memory."""
    with _refused_unless_usable(out, "open"):
        fs, inner = storage.filesystem(out)
        if "memory" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            raise ConfigError(f"output: {out} lives in this process's memory, but the stages "
                              "that write the blocks are other processes; give a local folder "
                              "or a store every worker reaches (s3://, gs://, a shared mount)")
        if fs.isfile(inner):
            raise ConfigError(f"output: {out} is a file; give a folder (new or empty)")


@contextlib.contextmanager
def _refused_unless_usable(out: str, what: str) -> Iterator[None]:
    """A storage error inside becomes one line naming `output` (ConfigErrors pass as they are)."""
    try:
        yield
    except ConfigError:
        raise
    except (OSError, ValueError, ImportError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise ConfigError(f"output: cannot {what} {out} ({reason}); choose a folder this "
                          "process can write") from e


def check_output_location(out: str) -> None:
    """The output must be a folder (new or existing) that this process can create and write,
    and that the run's workers, other processes, reach too."""
    check_output_kind(out)
    with _refused_unless_usable(out, "create or write"):
        fs, inner = storage.filesystem(out)
        fs.makedirs(inner, exist_ok=True)
        probe = storage.join(out, f".relayquant-write-test-{os.getpid()}")
        storage.write_bytes(probe, b"")
        storage.remove(probe)


def _location(path: str) -> str:
    """A path or URL as one spelling: local paths resolved (links, `..`), URLs unslashed."""
    if "://" not in path or path.startswith("file://"):
        return os.path.realpath(path.removeprefix("file://"))
    return path.rstrip("/")


def check_output_apart(out: str, model_path: str) -> None:
    """The output is neither the model folder, nor inside it, nor around it: the run writes
    (and --restart deletes) the output folder, which must never touch the model it reads."""
    o, m = _location(out), _location(model_path)
    if o == m:
        raise ConfigError(f"output: {out} is the model folder (model.path); choose a new "
                          "folder for the result")
    if o.startswith(m.rstrip("/") + "/"):
        raise ConfigError(f"output: {out} is inside the model folder {model_path} "
                          "(model.path); choose a folder outside it")
    if m.startswith(o.rstrip("/") + "/"):
        raise ConfigError(f"output: {out} holds the model folder {model_path} (model.path), "
                          "which writing or --restart there could overwrite; choose a folder "
                          "that does not contain the model")


def predicted_output_bytes(parts: ModelParts, config: RunConfig) -> int:
    """What the finished output will hold, from the shapes and the recipe's formats: each
    quantized format the quantized linears at their stored bits plus everything else as
    stored; each fake-quant format a full copy of the checkpoint."""
    from pipeline.methods.lorc_block import model_bits
    from pipeline.schemes import format_for

    bits = model_bits(parts, config.quantization)
    original = parts.reader.nbytes(set(parts.reader.entries))
    linears = 0
    for i in range(parts.num_blocks):
        path = parts.block_path(i)
        names = parts.tensor_names(path)
        for name in parts.adapter.linears:
            if format_for(f"{path}.{name}", config.quantization) is not None \
                    and f"{name}.weight" in names:
                linears += parts.reader.entries[names[f"{name}.weight"]].nbytes
    quantized = max(original - linears, 0) + int(bits["quantized_weights"] * bits["total"] / 8)
    formats = sum(original if f in (ExportFormat.FAKE_QUANT, ExportFormat.FAKE_QUANT_LORC)
                  else quantized for f in config.export.formats)
    return int(formats * 1.02)  # shard headers, config and tokenizer files, the run's state


def check_free_space(out: str, needed: int) -> None:
    """A local output whose disk cannot hold the result is refused before any work (an
    fsspec URL's store is not asked)."""
    if "://" in out and not out.startswith("file://"):
        return
    folder = os.path.abspath(out.removeprefix("file://"))
    written = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder)
                  for f in files) if os.path.isdir(folder) else 0
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    missing = needed - written
    if missing > free:
        raise ConfigError(
            f"output: the result needs about {_size(needed)} ({_size(written)} already there) "
            f"but {probe} has {_size(free)} free; free some space or choose another location")


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def prepare_output(config: RunConfig, parts: ModelParts, plan: Plan,
                   calib: torch.Tensor | None, restart: bool) -> dict[str, Any]:
    """Refuse a folder that holds something else or cannot be written; write the manifest;
    return it."""
    out = config.output
    check_output_apart(out, parts.reader.folder)
    check_output_location(out)
    check_free_space(out, predicted_output_bytes(parts, config))
    fresh = fingerprint(config, parts, calib)
    if checkpoint.is_relayquant_output(out) and restart:
        storage.remove(out)  # a damaged manifest is no obstacle to starting over
    elif checkpoint.is_relayquant_output(out):
        old = checkpoint.read_manifest(out)
        diff = _differences(old.get("fingerprint"), fresh)
        if diff and not restart:
            raise ConfigError(
                f"output: {out} holds a different run ({'; '.join(diff[:3])}); pass --restart to "
                "discard it, or choose another output folder")
    elif storage.list_names(out):
        raise ConfigError(f"output: {out} exists and is not a relayquant output; choose a new or "
                          "empty folder")
    storage.remove(storage.join(out, checkpoint.REPORT))
    for folder in (out, *(storage.join(out, sub) for sub in FOLDERS.values() if sub),
                   storage.join(out, checkpoint.STATE_DIR, "blocks")):
        for name in storage.list_names(folder):
            if ".tmp-" in name:  # a write cut short by a crash; never renamed into place
                storage.remove(storage.join(folder, name))
    manifest = {"relayquant_version": pipeline.__version__, "config": config_to_dict(config),
                "fingerprint": fresh, "plan": plan.to_dict(), "started_at": time.time()}
    storage.write_json(storage.join(out, checkpoint.MANIFEST), manifest)
    return manifest


def base_tensor_names(parts: ModelParts) -> dict[str, str]:
    """Output name -> checkpoint name for everything outside the blocks (tied copies skipped)."""
    tied = {t for t, _ in parts.adapter.tied_weights} if parts.hf_config.tie_word_embeddings else set()
    prefix = parts.adapter.blocks + "."
    out = {}
    for path in parts.adapter.embed_modules + parts.adapter.head_modules:
        if not parts.has_module(path):
            continue
        for key, name in parts.tensor_names(path).items():
            full = f"{path}.{key}"
            if full not in tied and not full.startswith(prefix):
                out[full] = name
    return out


def marker_formats(markers: list[dict[str, Any]]) -> dict[str, AffineFormat | None]:
    """Linear full name -> the format its block's marker records (None: full precision)."""
    return {name: None if scheme is None else AffineFormat(*scheme)
            for m in markers for name, scheme in m["schemes"].items()}


def finish_output(output: str, parts: ModelParts, model_path: str,
                  markers: list[dict[str, Any]], layouts: list[ExportFormat],
                  lorc: LorcConfig | None = None) -> dict[str, Any]:
    """Write, in every layout's folder, the non-block tensors, the index, config.json (with
    its quantization_config) and the tokenizer files; with LoRC, the PEFT adapter folder
    OUTPUT/lorc/. Returns what was exported."""
    names = base_tensor_names(parts)
    tensors = parts.reader.read(set(names.values()))
    base = {full: tensors[name] for full, name in names.items()}
    formats = marker_formats(markers)
    folders = {}
    for layout in layouts:
        sub = FOLDERS[layout]
        folder = storage.join(output, sub) if sub else output
        storage.write_tensors(storage.join(folder, checkpoint.BASE_SHARD), base, {"format": "pt"})
        files = {checkpoint.BASE_SHARD: sorted(base)}
        total = sum(t.numel() * t.element_size() for t in base.values())
        for m in markers:
            entry = m["files"][sub]
            file = entry["file"].removeprefix(f"{sub}/") if sub else entry["file"]
            files[file] = entry["tensors"]
            total += sum(e.nbytes for e in storage.read_header(storage.join(output, entry["file"]))
                         .values())
        checkpoint.write_index(folder, files, total)
        config = {k: v for k, v in parts.reader.config.items() if k != "quantization_config"}
        qconfig = format_config(layout, formats)
        if qconfig is not None:
            config["quantization_config"] = qconfig
        storage.write_json(storage.join(folder, "config.json"), config)
        if layout is ExportFormat.GPTQ:
            storage.write_json(storage.join(folder, "quantize_config.json"), qconfig)
        for name in storage.TOKENIZER_FILES:
            src = storage.join(model_path, name)
            if storage.exists(src):
                storage.copy_file(src, storage.join(folder, name))
        folders[layout.value] = {"path": folder, "tensor_bytes": total}
    flags = kernel_flags(formats)
    wraps = sum(m["metrics"].get("gptq_zero_wraps", 0) for m in markers)
    if wraps:
        flags.append({"layout": "gptq", "groups": wraps,
                      "note": "zero point 0 is stored as zero - 1 = -1 by GPTQ v1 and loads "
                              "wrong; use the compressed-tensors folder for these groups"})
    servable, why = vllm_servable(formats.values())
    exported = {"formats": [layout.value for layout in layouts], "folders": folders,
                "flags": flags, "vllm_servable": servable, "vllm_why": why,
                "transformers": transformers_loading(formats.values())}
    if lorc is not None:
        exported["lorc"] = write_adapter(output, markers, lorc, parts.adapter.blocks,
                                         parts.adapter.linears)
    return exported


def transformers_loading(formats: Iterable[AffineFormat | None]) -> str:
    """How transformers loads the compressed-tensors folder, given the packing of its widths."""
    used = {f for f in formats if f is not None}
    dense = sorted({f.bits for f in used if f.bits not in (2, 4, 8)})
    asymmetric = any(not f.symmetric for f in used)
    if not dense:
        return ("loads with compressed-tensors 0.17.1 (pinned), and with 0.18+ when every "
                "linear is symmetric (asymmetric: pass CompressedTensorsConfig(dequantize=True))")
    widths = "/".join(str(b) for b in dense)
    return (f"{widths}-bit weights are packed densely (compressed-tensors 0.18+): load with "
            "compressed-tensors >= 0.18" + (", passing CompressedTensorsConfig(dequantize=True) "
                                            "for the asymmetric linears" if asymmetric else "")
            + "; the pinned 0.17.1 refuses them")


def write_report(output: str, report: dict[str, Any]) -> None:
    storage.write_json(storage.join(output, checkpoint.REPORT), report)
