"""Bad corpora (calibration and evaluation) are refused before any work: exit 2, one line
naming the field or file and what is allowed, and no report.json (or manifest) in the output
folder. (Model folders and files: test_bad_inputs.py; recipe values: test_bad_recipes.py.)"""
import os

import pytest
from bad_input_helpers import STREAMED, quantize_args, refused

pytestmark = pytest.mark.e2e

# corpora

@pytest.mark.parametrize("spec,pattern", [
    ("sotu:nope", "calibration.corpus: corpus sotu:nope is not known; known: sotu:train"),
    ("nosuchproto://bucket/train.txt", ("calibration.corpus: cannot open "
                                       "'nosuchproto://bucket/train.txt' (Protocol not known")),
])
def test_corpus_name_or_url_that_cannot_be_opened(capsys, tmp_path, tiny_model, spec, pattern):
    refused(capsys, tmp_path, quantize_args(tmp_path, tiny_model("llama"), spec,
                                            quantization=STREAMED), pattern)


@pytest.mark.parametrize("name,content,pattern", [
    ("empty.txt", b"", ("calibration.corpus: too short: 0 tokens, but num_samples 4 x "
                        "seq_len 32 needs 128; use a longer corpus")),
    ("short.txt", b"a few words", "use a longer corpus or a seq_len of at most"),
    ("latin1.txt", "caf\u00e9 ".encode("latin-1") * 50, "is not UTF-8 text"),
    ("bad.jsonl", b'{"text": "a"}\nnot json\n', "line 2 is not JSON"),
    ("bad.parquet", b"garbage", "is not a readable parquet file"),
    ("folder.txt", None, "(Is a directory); give a file"),
])
def test_corpus_that_cannot_be_used(capsys, tmp_path, tiny_model, name, content, pattern):
    corpus = tmp_path / name
    if content is None:
        corpus.mkdir()
    else:
        corpus.write_bytes(content)
    line = refused(capsys, tmp_path, quantize_args(tmp_path, tiny_model("llama"), str(corpus),
                                                   quantization=STREAMED), pattern)
    assert "calibration.corpus:" in line


@pytest.mark.parametrize("name,content,pattern", [
    ("blank.txt", b" \n\t\n" * 100, "holds only whitespace; give a corpus of text"),
    ("zeros.txt", b"\0" * 1000, "holds NUL bytes, so it is not text"),
    ("null.jsonl", b'{"text": "a"}\n{"text": null}\n', ("record 2's 'text' is null, not a string "
                                                       "of text (set calibration.text_field")),
    ("rows.jsonl", b'"just a string"\n', ("record 1 has no 'text' field (set "
                                         "calibration.text_field")),
    ("ints.parquet", "ints", "column 'text' of '{corpus}' holds int64, not text"),
    ("fifo.txt", "fifo", "'{corpus}' is not a regular file (a pipe or a device); give a file"),
])
def test_corpus_that_holds_no_text(capsys, tmp_path, tiny_model, name, content, pattern):
    """Each would tokenize into windows of nothing (or, a pipe, block the first read)."""
    corpus = tmp_path / name
    if content == "ints":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": list(range(1000))}), corpus)
    elif content == "fifo":
        os.mkfifo(corpus)
    else:
        corpus.write_bytes(content)
    line = refused(capsys, tmp_path, quantize_args(tmp_path, tiny_model("llama"), str(corpus),
                                                   quantization=STREAMED),
                   pattern.format(corpus=corpus))
    assert line.startswith("relayquant: error: calibration.corpus:")


def test_eval_corpus_records_name_the_eval_field(capsys, tmp_path, tiny_model):
    corpus = tmp_path / "eval.jsonl"
    corpus.write_bytes(b'{"body": "text"}\n')
    refused(capsys, tmp_path, ["eval", "--model", tiny_model("llama"), "--corpus", str(corpus),
                               "--seq-len", "32"],
            "eval.corpus: record 1 has no 'text' field (an evaluation corpus keeps its text in "
            "the field 'text')")
