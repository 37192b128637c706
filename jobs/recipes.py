"""YAML recipes and `--set key.path=value` overrides to a typed `RunConfig`."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ConfigError, RunConfig
from pipeline.config_tree import apply_overrides, build_config

CONFIG_DIR = Path(__file__).parent / "configs"


def recipe_path(name: str) -> str:
    """A recipe file path, or the name of a bundled recipe (`p1-rtn-w4`)."""
    if os.path.exists(name):
        return name
    bundled = CONFIG_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if bundled.exists():
        return str(bundled)
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"--config: {name!r} is neither a file nor a bundled recipe ({known})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML whose mappings name each key once: PyYAML keeps the last of two silently, so a
    recipe with two `quantization:` sections would run without the first one's settings."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`, then keys override
                continue
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                first = lines.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: SafeLoader refuses it with its own message
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first at line {first}); keep one",
                    key_node.start_mark)
        return super().construct_mapping(node, deep)


def read_yaml(path: str, field: str) -> Any:
    """A YAML file the user gave (a recipe, a cluster description), refused in one line that
    names `field` when it cannot be read, is not UTF-8 text, is not YAML or repeats a key."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{field}: {path} is not UTF-8 text ({e.reason} at byte {e.start})"
                          ) from e
    except OSError as e:
        raise ConfigError(f"{field}: cannot read {path} ({e.strerror}); give a YAML file") from e
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{field}: {path} is not valid YAML{where}: {problem}") from e


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set: {item!r} must read key.path=value")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"--set: {item!r} has no key; write key.path=value")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or "not a YAML value"
            raise ConfigError(f"--set: {key.strip()}: {raw!r} is not a YAML value ({problem}); "
                              "quote strings, write lists as [a, b]") from e
    return out


def load_recipe(path: str, overrides: dict[str, Any] | None = None) -> RunConfig:
    data = read_yaml(recipe_path(path), "--config")
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of sections")
    return expand_home(build_config(RunConfig, apply_overrides(data, overrides or {})))


def expand_home(config: RunConfig) -> RunConfig:
    """`~/...` in a local path means the home folder, as in a shell (a YAML value is never
    expanded by one): otherwise `output: ~/runs/x` makes a folder named `~` here."""
    def expand(path: str | None) -> str | None:
        return os.path.expanduser(path) if path and path.startswith("~") else path

    budget = config.quantization.budget
    return dataclasses.replace(
        config, output=expand(config.output),
        model=dataclasses.replace(config.model, path=expand(config.model.path)),
        calibration=dataclasses.replace(config.calibration,
                                        corpus=expand(config.calibration.corpus)),
        eval=dataclasses.replace(config.eval, corpus=expand(config.eval.corpus)),
        quantization=dataclasses.replace(config.quantization, budget=dataclasses.replace(
            budget, sensitivity_from=expand(budget.sensitivity_from))))
