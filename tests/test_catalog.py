"""`relayquant recipes`: every bundled recipe, its scheme and method, and the P1 figures of the
benchmark rows whose config is exactly the recipe's."""
import json
import os

import pytest

from jobs.catalog import catalog
from jobs.cli import main
from jobs.recipes import CONFIG_DIR

pytestmark = pytest.mark.unit
RESULTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "results")


def test_every_bundled_recipe_is_listed_with_its_measured_row(capsys):
    assert main(["recipes", "--json"]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)["recipes"]}
    assert set(listed) == {p.stem for p in CONFIG_DIR.glob("*.yaml")}
    with open(os.path.join(RESULTS, "p1_reconstruct.json")) as f:
        rows = json.load(f)["rows"]
    row = next(r for r in rows
               if (r["scheme"], r["method"]) == ("w4_pc_asym", "omniquant_signround_let_direct"))
    w4 = listed["p1-signround-w4"]
    assert w4["scheme"] == "W4 per-channel asym"
    assert w4["method"].startswith("omniquant (LWC, LET, learned rounding, sign-SGD; 3 epochs")
    assert w4["measured"]["perplexity"] == row["perplexity"]
    # a row run with a different setting (here: a precomputed sensitivity file) is not the
    # recipe's figure, even from the same recipe file
    assert listed["p1-cvxq-rtn-3bit"]["measured"] is None
    assert listed["llama-70b-gptq-w4"]["measured"] is None


def test_the_table_reads_one_line_per_recipe(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    text = [line for line in lines if not line.startswith("relayquant:")]
    assert len(text) == len(catalog()["recipes"]) + 1
    assert any(line.startswith("p1-gptq-w4 ") and "P1 perplexity" in line for line in text)
    # a row whose run shared the machine shows its perplexity but no time
    with open(os.path.join(RESULTS, "p1_reconstruct.json")) as f:
        disturbed = [r for r in json.load(f)["rows"] if r.get("seconds_disturbed")]
    assert disturbed
    listed = {r["name"]: r for r in catalog()["recipes"]}
    names = [n for n, r in listed.items() if r["measured"] and r["measured"]["seconds_disturbed"]]
    assert names
    for name in names:
        line = next(x for x in text if x.startswith(f"{name} "))
        assert "quantize time not a figure" in line and " s on " not in line


def test_autocast_auto_shows_the_row_of_each_precision(capsys):
    """`autocast: auto` trains in bf16 or fp32 depending on the CPU: the recipe shows both
    measured rows, each named by its precision, and nothing when neither was measured."""
    rows = []  # p1_reconstruct.py's rows, in the order the catalog reads them (newest wins)
    for name in ("p1_reconstruct.json", "p1_cqe_ablation.json"):
        with open(os.path.join(RESULTS, name)) as f:
            rows += json.load(f)["rows"]
    fp32 = next(r for r in rows
                if (r["scheme"], r["method"]) == ("w3_g64_asym", "omniquant_signround_let_direct"))
    bf16 = [r for r in rows if (r["scheme"], r["method"]) ==
            ("w3_g64_asym", "omniquant_signround_let_direct_bf16")][-1]
    listed = {r["name"]: r for r in catalog()["recipes"]}
    measured = listed["p1-signround-w3g64"]["measured"]
    assert {k: v["perplexity"] for k, v in measured["by_autocast"].items()} == {
        "bfloat16": bf16["perplexity"], "float32": fp32["perplexity"]}
    # a row of the CQE+ ablation file is its recipe's figure too (the same config)
    # (the p1-cqe-plus recipes are the best preset's schedule with cross-layer learning: that
    # variant's row at each scheme, not the 3-epoch cqe_plus row)
    for recipe, scheme in (("p1-cqe-plus-w3g64", "w3_g64_asym"),
                           ("p1-cqe-plus-w2g64", "w2_g64_asym")):
        cqe = next(r for r in rows if (r["scheme"], r["method"]) == (scheme, "cqe_plus_best"))
        assert listed[recipe]["measured"]["perplexity"] == cqe["perplexity"]
    assert listed["llama-70b-omniquant-w3g64"]["measured"] is None  # auto too, never on P1
    assert main(["recipes"]) == 0
    line = next(x for x in capsys.readouterr().err.splitlines()
                if x.startswith("p1-signround-w3g64 "))
    assert f"{bf16['perplexity']:.3f} in bfloat16" in line
    assert f"{fp32['perplexity']:.3f} in float32" in line
