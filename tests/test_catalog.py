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
