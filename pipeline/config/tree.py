"""Plain data <-> the typed config tree: `build_config` builds a frozen dataclass tree from
YAML-like data (unknown keys and wrong types are errors naming the field), `config_to_dict`
inverts it, `apply_overrides` sets dotted `key.path` values."""
from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from pipeline.config import ConfigError
from pipeline.config.quantization import OVERRIDE_KEYS


def build_config(cls: type, data: Mapping[str, Any] | None, where: str = "") -> Any:
    """Build dataclass `cls` from plain data, rejecting unknown keys and wrong types."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)  # YAML keys need not be strings
    if unknown:
        field = f"{where}.{unknown[0]}" if where else str(unknown[0])
        raise ConfigError(f"{field}: unknown key; allowed keys here: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_hint, value_hint = typing.get_args(hint)
        return {_coerce(key_hint, k, where): _coerce(value_hint, v, f"{where}[{k!r}]")
                for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        return _coerce(inner[0], value, where)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return build_config(hint, value, where)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        allowed = [m.value for m in hint]
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {', '.join(allowed)}")
        return hint(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        number = float(value) if abs(value) < 1e300 else math.inf  # an int float() cannot hold
        if not math.isfinite(number):  # YAML's .nan and .inf are no setting's value
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if hint is Any:
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def config_to_dict(config: Any) -> Any:
    """Plain data (JSON/YAML-ready) from a config tree; `build_config` inverts it."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, enum.Enum):
        return config.value
    if isinstance(config, (list, tuple)):
        return [config_to_dict(v) for v in config]
    if isinstance(config, Mapping):
        return {k: config_to_dict(v) for k, v in config.items()}
    return config


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of `data` with dotted `key.path` overrides set (values already parsed).
    Under `quantization.overrides` the keys are module names, which hold dots themselves:
    `quantization.overrides.NAME.bits` (or `group_size`, `symmetric`) sets one key of NAME's
    entry, `quantization.overrides.NAME` the whole entry (a mapping, or null)."""
    out = _deep_copy(data)
    for dotted, value in overrides.items():
        keys = dotted.split(".")
        if keys[:2] == ["quantization", "overrides"] and len(keys) > 2:
            rest = keys[2:]
            name_keys = rest[:-1] if len(rest) > 1 and rest[-1] in OVERRIDE_KEYS else rest
            keys = ["quantization", "overrides", ".".join(name_keys)] + rest[len(name_keys):]
        node = out
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{dotted}: {key} is not a section")
            node = child
        node[keys[-1]] = value
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
