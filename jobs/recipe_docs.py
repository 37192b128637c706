"""docs/recipes.md, generated from the config dataclasses (`pipeline/config/`): every recipe
key, its type or allowed values, its default, and the comment written beside it in the code.
`tests/test_recipe_docs.py` fails when the page and the code drift apart.

    python -m jobs.recipe_docs            # rewrite docs/recipes.md
"""
from __future__ import annotations

import ast
import dataclasses
import enum
import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, base, budget, quantization, run

CONFIG_MODULES = (base, quantization, budget, run)

DOC = Path(__file__).resolve().parent.parent / "docs" / "recipes.md"


def field_comments() -> dict[tuple[str, str], str]:
    """(class, field) -> the comment lines just above the field and any trailing comment."""
    out: dict[tuple[str, str], str] = {}
    for module in CONFIG_MODULES:
        out.update(_module_comments(inspect.getsource(module)))
    return out


def _module_comments(source: str) -> dict[tuple[str, str], str]:
    lines = source.splitlines()
    out: dict[tuple[str, str], str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            above: list[str] = []
            row = item.lineno - 2
            while row >= 0 and lines[row].strip().startswith("#"):
                above.insert(0, lines[row].strip().lstrip("#").strip())
                row -= 1
            line = lines[item.lineno - 1]
            trailing = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            text = " ".join(part for part in (*above, trailing) if part)
            out[(node.name, item.target.id)] = text
    return out


def _dataclass_in(annotation: Any) -> type | None:
    if dataclasses.is_dataclass(annotation):
        return annotation  # type: ignore[return-value]
    for arg in typing.get_args(annotation):
        if dataclasses.is_dataclass(arg):
            return arg  # type: ignore[return-value]
    return None


def _type_text(annotation: Any) -> str:
    options = [a for a in typing.get_args(annotation) if a is not type(None)]
    nullable = type(None) in typing.get_args(annotation)
    union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    base = options[0] if union and len(options) == 1 else annotation
    items = typing.get_args(base)
    if typing.get_origin(base) is list and items and isinstance(items[0], type) and \
            issubclass(items[0], enum.Enum):
        text = "list of " + " \\| ".join(f"`{m.value}`" for m in items[0])
    elif isinstance(base, type) and issubclass(base, enum.Enum):
        text = " \\| ".join(f"`{m.value}`" for m in base)
    elif isinstance(base, type):
        text = base.__name__
    else:
        text = str(base).replace("typing.", "")
    return f"{text} or null" if nullable else text


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = field.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(value):
            return "(section)"
    else:
        return "required"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, list):
        value = [v.value if isinstance(v, enum.Enum) else v for v in value]
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`" if value != "" else "required"


def sections(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, list[list[str]]]]:
    comments = field_comments()
    hints = typing.get_type_hints(cls)
    rows: list[list[str]] = []
    nested: list[tuple[str, list[list[str]]]] = []
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        inner = _dataclass_in(hints[field.name])
        comment = comments.get((cls.__name__, field.name), "")
        if inner is not None:
            if field.default is None:
                comment = (comment + " " if comment else "") + "(a section; null: off)"
            nested += sections(inner, f"{key}.")
            continue
        rows.append([f"`{key}`", _type_text(hints[field.name]).replace(" | ", " \\| "),
                     _default_text(field),
                     comment.replace("|", "\\|")])
    return [(prefix.rstrip(".") or "top level", rows), *nested]


def render() -> str:
    out = ["# Recipe keys", "",
           ("Generated from `pipeline/config/` by `python -m jobs.recipe_docs`; do not edit by "
           "hand (`tests/test_recipe_docs.py` fails when this page and the code differ). Any key "
           "can be set in a recipe YAML or with `--set key.path=value`; an unknown key, a value "
           "of the wrong type or out of range is refused with exit 2 naming it. "
           "`relayquant recipes` lists the bundled recipes."), ""]
    for title, rows in sections():
        if not rows:
            continue
        out += [f"## {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        out.append("")
    return "\n".join(out)


def main() -> int:
    DOC.write_text(render())
    print(f"wrote {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
