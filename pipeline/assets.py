"""Where the prepared assets live: `$RELAYQUANT_HOME` (default ~/.cache/relayquant).

Only paths here; fetching and converting is `jobs/assets.py`.
"""
from __future__ import annotations

import os

from pipeline.config import ConfigError

MODELS = ("smollm2-135m",)
# sotu: P1's calibration (train) and test text; mail: a held-out text of another kind, never
# calibrated on (ham mail bodies from SpamAssassin's public corpus; `relayquant assets prepare
# mail`), to score a recipe on text unlike what it was fitted to
CORPORA = {"sotu": ("train", "test"), "mail": ("test",)}
OPTIONAL = ("mail",)  # not prepared by a bare `relayquant assets prepare`


def prepare_command(name: str) -> str:
    """The command that prepares asset `name`."""
    return "relayquant assets prepare" + (f" {name}" if name in OPTIONAL else "")


def home() -> str:
    return os.environ.get("RELAYQUANT_HOME") or os.path.expanduser("~/.cache/relayquant")


def model_dir(name: str) -> str:
    if name not in MODELS:
        raise ConfigError(f"asset {name!r} is not known; known models: {', '.join(MODELS)}")
    return os.path.join(home(), "models", name)


def corpus_file(name: str, split: str) -> str:
    if name not in CORPORA or split not in CORPORA[name]:
        known = ", ".join(f"{c}:{s}" for c, splits in CORPORA.items() for s in splits)
        raise ConfigError(f"corpus {name}:{split} is not known; known: {known}")
    return os.path.join(home(), "corpora", name, f"{split}.txt")


def resolve_model_path(path: str) -> str:
    """`asset:NAME` -> the prepared folder; anything else is returned as given."""
    if path.startswith("asset:"):
        try:
            folder = model_dir(path.removeprefix("asset:"))
        except ConfigError as e:
            raise ConfigError(f"model.path: {e}") from e
        if not os.path.exists(os.path.join(folder, "config.json")):
            raise ConfigError(f"model.path: {path} is not prepared yet; run `relayquant assets "
                              "prepare` (or `make setup`)")
        return folder
    return path
