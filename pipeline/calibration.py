"""Text corpora to token windows: calibration windows sampled with a seed, evaluation windows
cut without overlap. Corpora are built-in assets (`sotu:train`), local or fsspec text / JSON
lines / parquet files, or a `datasets` dataset (`dataset:NAME[:CONFIG]:SPLIT`)."""
from __future__ import annotations

import io
import json
import logging
import os
from typing import Any

import torch

from pipeline import assets, storage
from pipeline.config import (
    CalibrationConfig,
    ConfigError,
    EvalConfig,
    Method,
    QuantizationConfig,
    RunConfig,
)

log = logging.getLogger(__name__)
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)


def load_text(spec: str, text_field: str = "text", field: str = "calibration.corpus") -> str:
    """The corpus as one string; records are joined with a blank line. A corpus of only
    whitespace, or with NUL bytes (a binary file), is refused: it would tokenize into windows
    that calibrate or score nothing."""
    text = _read_text(spec, text_field, field)
    if "\0" in text:
        raise ConfigError(f"{field}: {spec!r} holds NUL bytes, so it is not text; give a text, "
                          "JSON lines or parquet corpus")
    if text and not text.strip():
        raise ConfigError(f"{field}: {spec!r} holds only whitespace; give a corpus of text")
    return text


def _read_text(spec: str, text_field: str, field: str) -> str:
    if ":" in spec and spec.split(":", 1)[0] in assets.CORPORA:
        name, split = spec.split(":", 1)
        try:
            path = assets.corpus_file(name, split)
        except ConfigError as e:
            raise ConfigError(f"{field}: {e}") from e
        if not os.path.exists(path):
            raise ConfigError(f"{field}: {spec} is not prepared yet; run "
                              f"`{assets.prepare_command(name)}`")
        return open(path, encoding="utf-8").read()
    if spec.startswith("dataset:"):
        return "\n\n".join(_dataset_records(spec.removeprefix("dataset:"), text_field, field))
    suffix = os.path.splitext(spec)[1].lower()
    if suffix not in TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES:
        raise ConfigError(f"{field}: {spec!r} is not a known corpus; use sotu:train, sotu:test, "
                          "dataset:NAME[:CONFIG]:SPLIT, or a .txt/.jsonl/.parquet path or URL")
    storage.require_exists(spec, field, "file")
    try:
        raw = storage.read_bytes(spec)
    except (IsADirectoryError, PermissionError) as e:
        raise ConfigError(f"{field}: cannot read {spec!r} ({e.strerror}); give a file") from e
    if suffix in TEXT_SUFFIXES + JSONL_SUFFIXES:
        try:
            text = raw.decode("utf-8-sig")  # a byte order mark is not text
        except UnicodeDecodeError as e:
            raise ConfigError(f"{field}: {spec!r} is not UTF-8 text ({e.reason} at byte "
                              f"{e.start})") from e
    if suffix in TEXT_SUFFIXES:
        return text
    if suffix in JSONL_SUFFIXES:
        return "\n\n".join(_field(r, number, text_field, field)
                           for number, r in enumerate(_json_rows(text, spec, field), 1))
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(raw))
    except Exception as e:  # pyarrow's many error types all mean "not a parquet file"
        raise ConfigError(f"{field}: {spec!r} is not a readable parquet file ({e})") from e
    if text_field not in table.column_names:
        raise ConfigError(f"{field}: parquet file has no column {text_field!r}; columns: "
                          f"{', '.join(table.column_names)} ({_hint(field)})")
    column = table.column(text_field)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise ConfigError(f"{field}: column {text_field!r} of {spec!r} holds {column.type}, "
                          f"not text ({_hint(field)})")
    return "\n\n".join(v for v in column.to_pylist() if v is not None)


def _json_rows(text: str, spec: str, field: str) -> list[Any]:
    """JSON lines, one record a line (or one JSON array of records)."""
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{field}: {spec!r} is not valid JSON ({e})") from e
        return list(rows) if isinstance(rows, list) else [rows]
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{field}: {spec!r} line {number} is not JSON ({e.msg}); "
                                  "write one JSON object per line") from e
    return rows


def _field(row: Any, number: int, text_field: str, field: str) -> str:
    if not isinstance(row, dict) or text_field not in row:
        raise ConfigError(f"{field}: record {number} has no {text_field!r} field "
                          f"({_hint(field)})")
    if not isinstance(row[text_field], str):
        raise ConfigError(f"{field}: record {number}'s {text_field!r} is "
                          f"{json.dumps(row[text_field])[:40]}, not a string of text "
                          f"({_hint(field)})")
    return row[text_field]


def _hint(field: str) -> str:
    """Where the record field that holds the text is set (evaluation reads `text`)."""
    return ("set calibration.text_field to the field that holds the text"
            if field.startswith("calibration") else "an evaluation corpus keeps its text in "
            "the field 'text'")


def _dataset_records(spec: str, text_field: str, field: str) -> list[str]:
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise ConfigError(f"{field}: dataset:{spec} must read dataset:NAME[:CONFIG]:SPLIT")
    import datasets

    name, split = parts[0], parts[-1]
    config = parts[1] if len(parts) == 3 else None
    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises many types; all mean "cannot load this"
        raise ConfigError(f"{field}: cannot load dataset {spec!r}: {e}") from e
    if text_field not in data.column_names:
        raise ConfigError(f"{field}: dataset {spec!r} has no column {text_field!r}")
    return [str(t) for t in data[text_field]]


TOKENIZER_MAIN_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def load_tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    if not any(storage.exists(storage.join(model_path, n)) for n in TOKENIZER_MAIN_FILES):
        raise ConfigError(f"model.path: no tokenizer in {model_path!r} (none of "
                          f"{', '.join(TOKENIZER_MAIN_FILES)}); copy the model's tokenizer files "
                          "next to its config.json")
    try:
        return AutoTokenizer.from_pretrained(storage.local_tokenizer_dir(model_path))
    except ConfigError:
        raise
    except Exception as e:  # transformers and tokenizers raise many types for bad files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"model.path: cannot load the tokenizer in {model_path!r} "
                          f"({type(e).__name__}: {reason}); copy the model's own tokenizer "
                          "files next to its config.json") from e


def model_context(model_path: str) -> tuple[int, str] | None:
    """The longest sequence the model was built for, and the config.json key that says so."""
    config = storage.read_json_file(storage.join(model_path, "config.json"), "model.path")
    for key in CONTEXT_KEYS:
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, int) and value > 0:
            return value, key
    return None


def check_seq_len(model_path: str, seq_len: int, field: str) -> None:
    """Refuse windows longer than the model's context, before any tokenizing."""
    context = model_context(model_path)
    if context is not None and seq_len > context[0]:
        raise ConfigError(f"{field}: {seq_len} exceeds the model's context of {context[0]} "
                          f"tokens ({context[1]} in config.json); use at most {context[0]}")


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(ids: torch.Tensor, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """[num_samples, seq_len] windows at uniform random offsets drawn in one call."""
    if ids.numel() < num_samples * seq_len:
        most = ids.numel() // seq_len
        fix = (f" or at most {most} samples of this length" if most else
               f" or a seq_len of at most {ids.numel()}" if ids.numel() >= 2 else "")
        raise ConfigError(
            f"calibration.corpus: too short: {ids.numel()} tokens, but num_samples {num_samples} x "
            f"seq_len {seq_len} needs {num_samples * seq_len}; use a longer corpus{fix}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (num_samples,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def eval_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows, the partial tail dropped; the first `max_windows` if given."""
    n = ids.numel() // seq_len
    if n == 0:
        raise ConfigError(f"eval.corpus: too short: {ids.numel()} tokens, fewer than one window "
                          f"of eval.seq_len {seq_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].view(n, seq_len)


def check_token_ids(model_path: str, ids: torch.Tensor) -> None:
    """Every token id must index the model's embedding: a tokenizer from another model would
    otherwise fail deep inside the first block's forward pass."""
    config = storage.read_json_file(storage.join(model_path, "config.json"), "model.path")
    vocab = config.get("vocab_size") if isinstance(config, dict) else None
    if isinstance(vocab, int) and ids.numel() and int(ids.max()) >= vocab:
        raise ConfigError(f"model.path: the tokenizer in {model_path!r} produces token id "
                          f"{int(ids.max())}, but config.json's vocab_size is {vocab}; the "
                          "tokenizer files must be the model's own")


def calibration_windows_for(model_path: str, c: CalibrationConfig) -> torch.Tensor:
    """The run's calibration windows, tokenized with the model's own tokenizer."""
    check_seq_len(model_path, c.seq_len, "calibration.seq_len")
    ids = tokenize(load_tokenizer(model_path), load_text(c.corpus, c.text_field))
    check_token_ids(model_path, ids)
    windows = calibration_windows(ids, c.num_samples, c.seq_len, c.seed)
    log.info("calibration: %s, %d tokens -> %d windows of %d (seed %d)", c.corpus, ids.numel(),
             c.num_samples, c.seq_len, c.seed)
    return windows


def eval_windows_for(model_path: str, e: EvalConfig) -> torch.Tensor:
    """The evaluation windows, tokenized with the model's own tokenizer."""
    check_seq_len(model_path, e.seq_len, "eval.seq_len")
    ids = tokenize(load_tokenizer(model_path), load_text(e.corpus, field="eval.corpus"))
    check_token_ids(model_path, ids)
    windows = eval_windows(ids, e.seq_len, e.max_windows)
    log.info("evaluation: %s, %d windows of %d", e.corpus, windows.shape[0], e.seq_len)
    return windows


def streams_needed(quantization: QuantizationConfig, block_errors: bool | None) -> bool:
    """Whether quantizing the blocks reads calibration streams: every method but RTN does,
    RTN only for bias correction, activation-aware LoRC, or when the per-block output errors
    are asked for."""
    return (quantization.method is not Method.RTN or quantization.bias_correction
            or (quantization.lorc is not None and quantization.lorc.activation_aware)
            or bool(block_errors))


def fp_stream_needed(quantization: QuantizationConfig, block_errors: bool | None) -> bool:
    """Whether the FP stream (the unquantized model's activations, block by block) is carried
    beside the quantized one: learned methods fit the block to it, and it is what each
    block's output error is measured against. GPTQ, RTN's bias correction and LoRC read the
    quantized stream only: without `eval.block_errors: true` they carry no FP stream (one
    forward pass per block and one stream less)."""
    return quantization.method is Method.OMNIQUANT or bool(block_errors)


def run_calibration(model_path: str, config: RunConfig) -> torch.Tensor | None:
    """The run's calibration windows, or None for a data-free run (nothing streamed and no
    CVXQ sensitivity pass): then the corpus is not even opened."""
    q = config.quantization
    sensitivity = q.budget.average_bits is not None and q.budget.sensitivity_from is None
    if streams_needed(q, config.eval.block_errors) or sensitivity:
        return calibration_windows_for(model_path, config.calibration)
    return None
