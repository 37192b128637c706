"""YAML recipes and `--set key.path=value` overrides to a typed `RunConfig`."""
from __future__ import annotations

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


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set: {item!r} must read key.path=value")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw else None
    return out


def load_recipe(path: str, overrides: dict[str, Any] | None = None) -> RunConfig:
    try:
        data = yaml.safe_load(Path(recipe_path(path)).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of sections")
    return build_config(RunConfig, apply_overrides(data, overrides or {}))
