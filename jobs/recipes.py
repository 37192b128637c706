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
    file = recipe_path(path)
    try:
        data = yaml.safe_load(Path(file).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path} is not valid YAML: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config: {path} is not UTF-8 text ({e.reason} at byte {e.start})"
                          ) from e
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path} ({e.strerror}); give a YAML file") from e
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of sections")
    return build_config(RunConfig, apply_overrides(data, overrides or {}))
