"""The benchmarks' `--rows`: axes joined by ':', `*` for every value of an axis, a bad row refused
naming the axis and its allowed values, and a help that lists each axis once."""
import argparse
import importlib.util
import os

import pytest


def _results_file():
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results_file.py")
    spec = importlib.util.spec_from_file_location("results_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


AXES = [("SCHEME", ["w3g64", "w2g64"]), ("METHOD", ["gptq", "signround"]),
        ("LORC", ["none", "r8int8"])]


def _parser():
    rf = _results_file()
    parser = argparse.ArgumentParser(exit_on_error=False)
    every = rf.add_rows_argument(parser, AXES)
    return rf, parser, every


def test_rows_default_is_every_row_in_axis_order():
    rf, parser, every = _parser()
    assert len(every) == 8 and every[0] == "w3g64:gptq:none" and every[-1] == "w2g64:signround:r8int8"
    assert rf.chosen_rows(parser.parse_args([]).rows) == every


def test_star_expands_and_rows_keep_order_once():
    rf, parser, _ = _parser()
    args = parser.parse_args(["--rows", "w2g64:*:none", "w2g64:gptq:none", "w3g64:gptq:r8int8"])
    assert rf.chosen_rows(args.rows) == ["w2g64:gptq:none", "w2g64:signround:none",
                                         "w3g64:gptq:r8int8"]


@pytest.mark.parametrize("row, words", [
    ("w2g64:foo:none", ["METHOD", "'foo'", "gptq, signround"]),
    ("w2g64:gptq", ["SCHEME:METHOD:LORC", "3 parts"]),
    ("w9:gptq:none", ["SCHEME", "w3g64, w2g64"]),
])
def test_a_bad_row_names_the_axis_and_its_values(row, words):
    _, parser, _ = _parser()
    with pytest.raises(argparse.ArgumentError) as caught:
        parser.parse_args(["--rows", row])
    for word in words:
        assert word in str(caught.value)


def test_help_lists_each_axis_once_not_every_row():
    _, parser, _ = _parser()
    text = parser.format_help()
    assert "LORC: none, r8int8" in text
    assert "w2g64:signround:r8int8" not in text
