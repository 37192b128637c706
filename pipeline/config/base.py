"""What every part of the run configuration shares: the error for bad input and its checks."""
from __future__ import annotations

import re


class ConfigError(ValueError):
    """Bad input from the user: a message that names the field and what is allowed."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


MAX_SEED = 2**32 - 1


def check_seed(seed: int, where: str) -> None:
    """A random seed: what torch's generators take from every code path that uses one."""
    _require(0 <= seed <= MAX_SEED, f"{where}: {seed}; use an integer from 0 to {MAX_SEED}")


def check_module_pattern(pattern: str, where: str) -> None:
    """A module name, or `re:` and a regular expression that must compile."""
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as e:
            raise ConfigError(f"{where}: {pattern[3:]!r} is not a valid regular expression "
                              f"({e}); write re: followed by a Python regex matched against "
                              "the whole module name") from e
