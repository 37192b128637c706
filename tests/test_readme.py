"""The README's code blocks against the code: every `relayquant` command and flag they show is
one the CLI takes, every recipe, file and make target they name exists, and the read-only
commands run. (`tests/test_cluster_real.py` runs the `ray job submit` block itself.)"""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from jobs.cli import build_parser, main
from jobs.recipes import load_recipe

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parent.parent


def code_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def commands() -> list[list[str]]:
    """Each shell command line of the README's blocks (continuations joined, comments and
    [optional] brackets dropped), split into words."""
    out = []
    for block in code_blocks():
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if not line or line.startswith(("OUT/", "jobs/", "cluster/", "pipeline/", "│", "|")):
                continue
            line = re.sub(r"[\[\]]", " ", line)
            try:
                out.append(shlex.split(line))
            except ValueError:
                continue
    return out


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_relayquant_command_and_flag_shown_exists():
    subs = subparsers()
    shown = [c for c in commands() if c and c[0] == "relayquant"]
    assert len(shown) >= 6
    for words in shown:
        assert words[1] in subs, words
        options = {o for a in subs[words[1]]._actions for o in a.option_strings}
        for flag in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
            assert flag in options, (words[1], flag)


def test_every_recipe_file_target_and_module_shown_exists():
    makefile = (ROOT / "Makefile").read_text()
    for words in commands():
        for i, word in enumerate(words):
            placeholder = i + 1 < len(words) and re.fullmatch(r"[A-Z]+(\.yaml)?", words[i + 1])
            if word == "--config" and i + 1 < len(words) and not placeholder:
                load_recipe(words[i + 1])  # a path or a bundled recipe's name; raises if bad
            if word.endswith((".py", ".yaml")) and "/" in word and "..." not in word:
                assert (ROOT / word).exists(), word
        if words[:1] == ["make"]:
            assert re.search(rf"^{re.escape(words[1])}:", makefile, re.MULTILINE), words
        if words[:2] == ["python", "-m"]:
            module = words[2].replace(".", "/")
            assert (ROOT / f"{module}.py").exists() or (ROOT / module).is_dir(), words


def test_the_read_only_commands_run(capsys):
    assert main(["recipes"]) == 0
    assert main(["recipes", "--json"]) == 0
    assert '"recipes"' in capsys.readouterr().out
