"""YAML recipes and `--set key.path=value` overrides to a typed `RunConfig`."""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ConfigError, Method, RunConfig
from pipeline.config.quantization import Rounding
from pipeline.config.tree import apply_overrides, build_config

log = logging.getLogger(__name__)

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
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{field}: {path} is not valid YAML{where}: {problem}") from e
    if _expanded_size(data, MAX_YAML_VALUES) > MAX_YAML_VALUES:
        raise ConfigError(f"{field}: {path} expands to more than {MAX_YAML_VALUES} values "
                          "(aliases of aliases?); a recipe is a few dozen settings")
    return data


# YAML aliases share one object, so a few lines of nested aliases load small but expand
# exponentially once copied (`apply_overrides`) or walked: such a file is refused first
MAX_YAML_VALUES = 100_000


def _expanded_size(data: Any, limit: int) -> int:
    """The number of values `data` holds counted as if every alias were copied, stopping
    once past `limit` (so the count itself stays cheap)."""
    count, stack = 0, [data]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


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


def load_recipe(path: str, overrides: dict[str, Any] | None = None,
                warn: bool = False) -> RunConfig:
    """The recipe at `path` (or a bundled one's name) with `overrides`; `warn`: log a warning
    for each section the chosen method does not read (`ignored_settings`)."""
    data = read_yaml(recipe_path(path), "--config")
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of sections")
    data = apply_overrides(data, overrides or {})
    config = expand_home(build_config(RunConfig, data))
    for line in ignored_settings(data, config) if warn else []:
        log.warning("%s", line)
    return config


def unread_sections(quantization: Any) -> list[str]:
    """The `quantization` subsections the configured method does not read: `omniquant` but
    for method omniquant; `gptq` but for method gptq and omniquant rounding with GPTQ
    (`rounding: gptq` or `round_init: gptq`)."""
    method, omni = quantization.method, quantization.omniquant
    out = [] if method is Method.OMNIQUANT else ["omniquant"]
    if not (method is Method.GPTQ or (method is Method.OMNIQUANT and (
            omni.rounding is Rounding.GPTQ or omni.round_init == "gptq"))):
        out.append("gptq")
    return out


def ignored_settings(data: dict[str, Any], config: RunConfig) -> list[str]:
    """The sections a recipe (after its overrides) sets that the chosen method does not read:
    the dataclasses fill in every default, so only the recipe's own mapping can tell them."""
    q = data.get("quantization")
    if not isinstance(q, dict):
        return []
    method = config.quantization.method.value
    why = {"omniquant": f"it applies to method omniquant only, and quantization.method is "
                        f"{method}",
           "gptq": f"quantization.method {method} does not round with GPTQ (method gptq does, "
                   f"and omniquant with rounding: gptq or round_init: gptq)"}
    return [f"quantization.{name}: ignored: {why[name]}"
            for name in unread_sections(config.quantization) if q.get(name)]


def expand_home(config: RunConfig) -> RunConfig:
    """`~/...` in a local path means the home folder, as in a shell (a YAML value is never
    expanded by one): otherwise `output: ~/runs/x` makes a folder named `~` here."""
    def expand(path: Any) -> Any:  # str, or None where the field may be null
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
