"""docs/recipes.md is generated from the config dataclasses: it must be what the code says now,
and every key must say what it means (a comment in pipeline/config/, or its allowed values)."""
import pytest

from jobs.recipe_docs import DOC, render, sections

pytestmark = pytest.mark.unit


def test_the_page_is_what_the_code_generates():
    assert DOC.read_text() == render(), "run: python -m jobs.recipe_docs"


def test_every_key_is_explained():
    unexplained = [row[0] for _, rows in sections() for row in rows
                   if not row[3] and "`" not in row[1]]
    assert not unexplained, f"add a comment beside these fields in pipeline/config/: {unexplained}"


def test_nested_sections_and_enums_are_listed():
    titles = [title for title, _ in sections()]
    assert {"quantization.omniquant", "quantization.budget", "quantization.lorc",
            "cluster"} <= set(titles)
    text = render()
    assert "| `quantization.method` | `rtn` \\| `gptq` \\| `omniquant` | `rtn` |" in text
