"""LoRC's factors as a standard PEFT LoRA adapter folder, OUTPUT/lorc/:

    adapter_config.json          peft_type LORA, r = lora_alpha = rank (scaling 1), target_modules
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight [r, in],
                                 base_model.model.<module>.lora_B.weight [out, r]
    lorc_int8.safetensors        (int8 factors only) their codes and per-component scales

`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(OUT), OUT/lorc)` loads it with
no relayquant import, and the names are the ones vLLM's LoRA loader parses. PEFT and vLLM load
float LoRA weights only, so int8 factors are stored there dequantized into the model's dtype.

Read back (`relayquant eval`, a resumed run's quantized stream), each factor pair is merged
into its linear's weight as it is loaded: W + scaling·B·A, in fp32 before the compute dtype.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from pipeline import storage
from pipeline.config import ConfigError, LorcConfig, LorcDtype
from pipeline.methods.lorc_block import PEFT_PREFIX, STATE_FOLDER
from pipeline.storage import CheckpointReader

if TYPE_CHECKING:
    from pipeline.model_parts import ModelParts

FOLDER = "lorc"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
INT8_NAME = "lorc_int8.safetensors"


@dataclasses.dataclass
class LoraWeights:
    """LoRA factor pairs read lazily by module name, merged into weights as they load."""

    reader: CheckpointReader
    scaling: float = 1.0

    def merge_(self, path: str, state: dict[str, torch.Tensor]) -> None:
        """Add scaling·B·A to every `.weight` in `state` (the module at `path`) that has a
        factor pair."""
        for key in list(state):
            if not key.endswith(".weight"):
                continue
            prefix = f"{PEFT_PREFIX}{path}.{key.removesuffix('.weight')}"
            a, b = f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"
            if a not in self.reader.entries:
                continue
            t = self.reader.read([a, b])
            product = t[b].float() @ t[a].float()
            state[key] = (state[key].float() + self.scaling * product).to(state[key].dtype)


def block_lora(output: str, file: str) -> LoraWeights:
    """One finished block's factors, from its shard in a run's output (scaling 1)."""
    return LoraWeights(CheckpointReader(output, config={}, files=[file]))


def adapter_folder(model: str) -> str | None:
    """OUTPUT/lorc when `model` has a LoRC adapter next to it, else None."""
    folder = storage.join(model, FOLDER)
    return folder if storage.exists(storage.join(folder, CONFIG_NAME)) else None


def read_adapter(folder: str) -> LoraWeights:
    """A PEFT LoRA adapter folder (relayquant's, or any plain LoRA one with the same names)."""
    config = storage.read_json_file(storage.join(folder, CONFIG_NAME), "lorc")
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ConfigError(f"lorc: {folder} holds no PEFT LoRA adapter (peft_type LORA)")
    if config.get("use_dora") or config.get("lora_bias"):
        raise ConfigError(f"lorc: {folder} uses DoRA or LoRA biases; only plain LoRA merges")
    r, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if isinstance(r, bool) or not isinstance(r, int) or r < 1 or \
            isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ConfigError(f"lorc: {folder}/{CONFIG_NAME} has r {r!r} and lora_alpha {alpha!r}; "
                          "r must be a positive integer and lora_alpha a number")
    scaling = alpha / (r ** 0.5 if config.get("use_rslora") else r)
    weights = storage.join(folder, WEIGHTS_NAME)
    if not storage.exists(weights):
        raise ConfigError(f"lorc: {folder} has no {WEIGHTS_NAME}")
    try:
        return LoraWeights(CheckpointReader(folder, config={}, files=[WEIGHTS_NAME]), scaling)
    except (ConfigError, OSError) as e:
        raise ConfigError(f"lorc: {e}") from e


def check_adapter(lora: LoraWeights, parts: ModelParts, folder: str) -> None:
    """Every factor pair fits the linear it names (headers only, no weights read), so a bad
    adapter is refused before any worker merges it."""
    entries = lora.reader.entries
    for a in (n for n in entries if n.endswith(".lora_A.weight")):
        module = a.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
        b = a.replace(".lora_A.weight", ".lora_B.weight")
        if b not in entries or not parts.has_module(module):
            raise ConfigError(f"lorc: {folder} holds {a} but " + (
                f"not {b}" if b not in entries else f"the model has no module {module}"))
        weight = parts.meta.get_submodule(module).state_dict().get("weight")
        expected = list(weight.shape) if weight is not None else None
        shape_a, shape_b = list(entries[a].shape), list(entries[b].shape)
        if len(shape_a) != 2 or len(shape_b) != 2 or shape_a[0] != shape_b[1] or \
                [shape_b[0], shape_a[1]] != expected:
            raise ConfigError(f"lorc: {folder}: factors A {shape_a} and B {shape_b} do not fit "
                              f"{module}'s weight {expected} (A [r, in], B [out, r]); the "
                              "adapter is of another model")


def target_modules(names: list[str], blocks: str, linears: Sequence[str],
                   num_blocks: int) -> list[str]:
    """PEFT's target_modules: the linears' short names (q_proj, ...) when every block's linear
    of each such name is corrected, as LoRA adapters usually say; else the full names."""
    kinds = sorted({_relative(n, blocks) for n in names})
    whole = {f"{blocks}.{i}.{k}" for k in kinds for i in range(num_blocks)}
    short = {k.rsplit(".", 1)[-1] for k in kinds}
    if whole == set(names) and len(short) == len(kinds) and set(kinds) <= set(linears):
        return sorted(short)
    return sorted(names)


def _relative(name: str, blocks: str) -> str:
    return name.removeprefix(blocks + ".").split(".", 1)[1]


def adapter_config(lorc: LorcConfig, modules: list[str], base: str | None) -> dict[str, Any]:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lorc.rank,
            "lora_alpha": lorc.rank, "lora_dropout": 0.0, "bias": "none",
            "target_modules": modules, "fan_in_fan_out": False, "inference_mode": True,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "modules_to_save": None, "base_model_name_or_path": base}


def write_adapter(output: str, markers: list[dict[str, Any]], lorc: LorcConfig, blocks: str,
                  linears: Sequence[str], base: str | None = None) -> dict[str, Any]:
    """Assemble OUTPUT/lorc/ from the blocks' factor shards; returns what the report says."""
    tensors: dict[str, torch.Tensor] = {}
    for m in markers:
        entry = m["files"].get(STATE_FOLDER)
        if entry is not None:
            tensors.update(storage.read_tensors(storage.join(output, entry["file"])))
    folder = storage.join(output, FOLDER)
    weights = {k: v for k, v in tensors.items() if k.endswith(".weight")}
    names = sorted({k.removeprefix(PEFT_PREFIX).rsplit(".", 2)[0] for k in weights})
    modules = target_modules(names, blocks, linears, len(markers))
    storage.write_tensors(storage.join(folder, WEIGHTS_NAME), weights, {"format": "pt"})
    if lorc.dtype is LorcDtype.INT8:
        storage.write_tensors(storage.join(folder, INT8_NAME),
                              {k: v for k, v in tensors.items() if k not in weights},
                              {"format": "pt"})
    storage.write_json(storage.join(folder, CONFIG_NAME), adapter_config(lorc, modules, base))
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in weights.values()})
    return {"path": folder, "linears": len(names), "rank": lorc.rank,
            "dtype": lorc.dtype.value, "stored_dtype": dtypes,
            "tensor_bytes": sum(v.numel() * v.element_size() for v in weights.values())}
