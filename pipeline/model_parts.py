"""A model as parts that a stage can load one at a time: the embedding, each block, the head.

The whole model exists only on the meta device (no memory); a part is copied from it and its
tensors are read from the checkpoint by name. Which parts exist and how they connect comes from
the adapter row.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline.adapters import ADAPTERS, Adapter, Embedding, Positions, adapter_for
from pipeline.config import ConfigError
from pipeline.formats import AffineFormat, gptq
from pipeline.formats import compressed_tensors as ct
from pipeline.storage import CheckpointReader

if TYPE_CHECKING:
    from pipeline.formats.peft_adapter import LoraWeights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_config_from_dict(config: dict[str, Any]) -> Any:
    import transformers
    from huggingface_hub.errors import StrictDataclassError
    from transformers import CONFIG_MAPPING, AutoConfig

    data = {k: v for k, v in config.items() if k != "quantization_config"}
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ConfigError("model.path: config.json has no model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ConfigError(f"model.path: config.json's model_type {model_type!r} is not known to "
                          f"transformers {transformers.__version__}; relayquant reads "
                          f"{', '.join(sorted(ADAPTERS))} models")
    try:
        hf_config = AutoConfig.for_model(model_type, **data)
    except (ValueError, TypeError, StrictDataclassError) as e:
        # transformers' own checks of the values (types, head counts): the last line says what
        reason = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.path: config.json is not a valid {model_type} config: "
                          f"{reason}") from e
    hf_config._attn_implementation = "sdpa"  # mask None => causal, as the full model does
    return hf_config


def build_meta_model(hf_config: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, TypeError) as e:  # e.g. a dtype that is not a float type
        raise ConfigError(f"model.path: config.json does not describe a model transformers "
                          f"can build: {str(e).strip().splitlines()[0]}") from e


def block_count(config: dict[str, Any], adapter: Adapter) -> int:
    """The model's depth from config.json (transformers would default a missing one)."""
    key = adapter.num_blocks_key
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        said = "has no " + key if key not in config else f"has {key} {value!r}"
        raise ConfigError(f"model.path: config.json {said}; it must be the model's number of "
                          "blocks, a positive integer")
    return value


def meta_model(config: dict[str, Any]) -> tuple[str, Adapter, Any, nn.Module, int]:
    """(architecture, adapter row, HF config, the model on the meta device, block count) of a
    config.json, each checked, so a config that cannot describe a supported model is refused
    before any weight is read."""
    architecture, adapter = adapter_for(config.get("architectures"))
    blocks = block_count(config, adapter)
    hf_config = hf_config_from_dict(config)
    meta = build_meta_model(hf_config)
    if type(meta).__name__ != architecture:
        raise ConfigError(f"model.path: config.json's model_type {config['model_type']!r} "
                          f"builds {type(meta).__name__}, but its architectures say "
                          f"{architecture}; the two must name the same model")
    return architecture, adapter, hf_config, meta, blocks


@dataclasses.dataclass
class ModelParts:
    """Loads parts of one checkpoint by name. Cheap to build: reads config and headers only."""

    reader: CheckpointReader
    compute_dtype: torch.dtype = torch.float32
    device: str = "cpu"
    # LoRA factors (LoRC's adapter) merged into the linears' weights as they load
    lora: LoraWeights | None = None

    def __post_init__(self) -> None:
        (self.architecture, self.adapter, self.hf_config, self.meta,
         self.num_blocks) = meta_model(self.reader.config)
        self._rotary: nn.Module | None = None
        self.packed = packed_linears(self.reader.config.get("quantization_config"),
                                     self.block_linears(), self.reader.entries)

    def block_linears(self) -> list[str]:
        return [f"{self.block_path(i)}.{name}" for i in range(self.num_blocks)
                for name in self.adapter.linears]

    @property
    def adapter_row(self) -> Adapter:
        return self.adapter

    def block_path(self, index: int) -> str:
        return f"{self.adapter.blocks}.{index}"

    def has_module(self, path: str) -> bool:
        try:
            return self.meta.get_submodule(path) is not None
        except AttributeError:
            return False

    def tensor_names(self, path: str) -> dict[str, str]:
        """Module state key -> checkpoint tensor name, for the module at `path`."""
        tied = dict(self.adapter.tied_weights) if self.hf_config.tie_word_embeddings else {}
        out = {}
        for key in self.meta.get_submodule(path).state_dict():
            full = f"{path}.{key}"
            if full.removesuffix(".weight") in self.packed:
                continue  # read by `load` from its packed tensors
            candidates = [full, full.removeprefix("model."), tied.get(full, "")]
            found = next((c for c in candidates if c in self.reader.entries), None)
            if found is None:
                raise ConfigError(f"model.path: tensor {full} is missing from the checkpoint")
            out[key] = found
        return out

    def check_shapes(self) -> None:
        """config.json and the stored tensors describe the same model (headers only, no
        weights read): otherwise the first block would fail to load minutes into a run."""
        self._refuse_blocks_beyond_the_config()
        paths = [*self.adapter.embed_modules,
                 *(self.block_path(i) for i in range(self.num_blocks)),
                 *self.adapter.head_modules]
        for path in paths:
            if not self.has_module(path):
                continue
            expected = self.meta.get_submodule(path).state_dict()
            for key, name in self.tensor_names(path).items():
                entry = self.reader.entries[name]
                if tuple(entry.shape) != tuple(expected[key].shape):
                    raise ConfigError(
                        f"model.path: tensor {name} has shape {list(entry.shape)} in the "
                        f"checkpoint, but config.json makes {path}.{key} "
                        f"{list(expected[key].shape)}; the config and the weights are of "
                        "different models")
                if expected[key].is_floating_point() and not entry.dtype.is_floating_point:
                    raise ConfigError(
                        f"model.path: tensor {name} is stored as "
                        f"{str(entry.dtype).removeprefix('torch.')}, but it is a float weight "
                        "and config.json has no quantization_config that says how to unpack "
                        "it; give an unquantized checkpoint or a compressed-tensors or GPTQ one")

    def _refuse_blocks_beyond_the_config(self) -> None:
        """Blocks stored past config.json's depth would be left out of the run (and of its
        output) without a word."""
        blocks = self.adapter.blocks
        pattern = re.compile(rf"(?:{re.escape(blocks)}|{re.escape(blocks.removeprefix('model.'))})"
                             r"\.(\d+)\.")
        beyond = [n for n in self.reader.entries
                  if (m := pattern.match(n)) and int(m.group(1)) >= self.num_blocks]
        if beyond:
            raise ConfigError(
                f"model.path: the checkpoint holds tensor {min(beyond)}, past the "
                f"{self.num_blocks} blocks that config.json's {self.adapter.num_blocks_key} "
                "says; the config and the weights are of different models")

    def packed_tensor_names(self, path: str) -> dict[str, list[str]]:
        """Weight key -> the packed tensors it is read from, for packed linears under `path`."""
        out = {}
        for module, layout in self.packed.items():
            if module.startswith(path + "."):
                names = [f"{module}.{s}" for s in layout.suffixes
                         if f"{module}.{s}" in self.reader.entries]
                out[f"{module.removeprefix(path + '.')}.weight"] = names
        return out

    def part_nbytes(self, path: str) -> int:
        packed = [n for names in self.packed_tensor_names(path).values() for n in names]
        return self.reader.nbytes(set(self.tensor_names(path).values()) | set(packed))

    def stored_dtypes(self, path: str) -> dict[str, torch.dtype]:
        dtypes = {k: self.reader.entries[n].dtype for k, n in self.tensor_names(path).items()}
        for key, names in self.packed_tensor_names(path).items():
            dtypes[key] = next(self.reader.entries[n].dtype for n in names
                               if n.endswith(("weight_scale", "scales")))
        return dtypes

    def load(self, path: str) -> nn.Module:
        """A real copy of the module at `path`, its tensors read from the checkpoint (packed
        linears are unpacked and dequantized)."""
        names = self.tensor_names(path)
        packed = self.packed_tensor_names(path)
        tensors = self.reader.read(set(names.values()) | {n for v in packed.values() for n in v})
        # converted one at a time, each stored tensor dropped once converted: the peak is the
        # block at the compute dtype plus one stored tensor, not both copies of the block
        state = {k: tensors.pop(n).to(self.compute_dtype) for k, n in names.items()}
        for key, tensor_names in packed.items():
            linear = f"{path}.{key.removesuffix('.weight')}"
            local = {n.removeprefix(linear + "."): tensors[n] for n in tensor_names}
            state[key] = self.packed[linear].unpack(local, self.compute_dtype)
        if self.lora is not None:
            self.lora.merge_(path, state)
        # one sum per tensor (no copy): a NaN or Inf would otherwise surface blocks later as a
        # Hessian that is not positive definite, or as a NaN perplexity
        damaged = next((k for k, t in state.items() if t.is_floating_point()
                        and not torch.isfinite(t.sum(dtype=torch.float32))), None)
        if damaged is not None:
            raise ConfigError(f"model.path: tensor {path}.{damaged} holds NaN or infinite "
                              "values; the checkpoint is damaged, so copy or download it again")
        module = copy.deepcopy(self.meta.get_submodule(path))
        module.load_state_dict(state, strict=True, assign=True)
        left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        assert not left, f"{path}: tensors left on the meta device: {left}"
        return module.to(self.device).eval()

    def load_block(self, index: int) -> nn.Module:
        return self.load(self.block_path(index))

    def rotary(self) -> nn.Module:
        assert self.adapter.rotary is not None
        if self._rotary is None:
            cls = type(self.meta.get_submodule(self.adapter.rotary))
            self._rotary = cls(config=self.hf_config).to(self.device)
        return self._rotary

    def load_embedding(self) -> list[nn.Module | None]:
        return [self.load(p) if self.has_module(p) else None for p in self.adapter.embed_modules]

    def load_head(self) -> list[nn.Module]:
        return [self.load(p) for p in self.adapter.head_modules if self.has_module(p)]


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """How one linear's weight is stored in a quantized checkpoint."""

    kind: str  # "compressed-tensors" or "gptq"
    fmt: AffineFormat

    @property
    def suffixes(self) -> tuple[str, ...]:
        return ct.SUFFIXES if self.kind == "compressed-tensors" else gptq.SUFFIXES

    def unpack(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        if self.kind == "compressed-tensors":
            return ct.decompress_linear(tensors, self.fmt, dtype)
        return gptq.decompress_linear(tensors, self.fmt.bits, dtype)


def packed_linears(qconfig: dict[str, Any] | None, linears: list[str],
                   entries: dict[str, Any]) -> dict[str, PackedLayout]:
    """Linears stored packed (compressed-tensors pack-quantized, or GPTQ v1), by full name."""
    if not qconfig:
        return {}
    method = qconfig.get("quant_method") if isinstance(qconfig, dict) else None
    if method not in ("compressed-tensors", "gptq"):
        raise ConfigError(f"model.path: config.json's quantization_config (quant_method "
                          f"{method!r}) is not one relayquant reads; give an unquantized "
                          "checkpoint or a compressed-tensors or GPTQ one")
    try:
        if method == "compressed-tensors":
            formats = ct.module_formats({"config_groups": {}, **qconfig}, linears)
            return {n: PackedLayout(method, f) for n, f in formats.items()
                    if f"{n}.weight_packed" in entries}
        group = qconfig.get("group_size", -1)
        fmt = AffineFormat(int(qconfig["bits"]), None if group in (-1, None) else int(group),
                           bool(qconfig.get("sym", True)))
    except (KeyError, TypeError, ValueError, AttributeError, re.error) as e:
        raise ConfigError(f"model.path: config.json's {method} quantization_config cannot be "
                          f"read ({type(e).__name__}: {e})") from e
    return {n: PackedLayout(method, fmt) for n in linears if f"{n}.qweight" in entries}


def embed(parts: ModelParts, modules: list[nn.Module | None], ids: torch.Tensor) -> torch.Tensor:
    """Hidden states entering block 0 for a [batch, seq] LongTensor of token ids."""
    tokens = modules[0]
    assert tokens is not None
    ids = ids.to(parts.device)
    h = tokens(ids)
    if parts.adapter.embedding is Embedding.TOKENS_PLUS_LEARNED_POSITIONS:
        project_in, positions = modules[1], modules[2]
        if project_in is not None:
            h = project_in(h)
        assert positions is not None
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
        h = h + positions(None, 0, position_ids=pos)
    return h.to(parts.compute_dtype)


def run_block(parts: ModelParts, block: nn.Module, h: torch.Tensor,
              tensors: dict[str, torch.Tensor] | None = None,
              compiled: Callable[..., Any] | None = None) -> torch.Tensor:
    """One block's forward on [batch, seq, hidden] (causal, no cache). `tensors` replaces some
    of the block's parameters for this call (relative names), keeping their autograd graph;
    with them, `compiled` (`pipeline.training.compiled.compiled_block_call`) runs the call compiled."""
    pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0).expand(h.shape[0], -1)

    def call(*args: Any, **kwargs: Any) -> Any:
        if tensors is None:
            return block(*args, **kwargs)
        return (compiled or torch.func.functional_call)(block, tensors, args, kwargs)

    if parts.adapter.positions is Positions.ROTARY:
        with torch.no_grad():
            cos_sin = parts.rotary()(h, pos)
        out = call(h, position_ids=pos, position_embeddings=cos_sin)
    else:
        out = call(h, position_ids=pos)
    return out[0] if isinstance(out, tuple) else out


def run_head(modules: list[nn.Module], h: torch.Tensor) -> torch.Tensor:
    for m in modules:
        h = m(h)
    return h


def token_nll(modules: list[nn.Module], h: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL (fp32) over windows, one window at a time to bound the logits."""
    total, count = 0.0, 0
    ids = ids.to(h.device)
    for i in range(h.shape[0]):
        logits = run_head(modules, h[i : i + 1]).float()
        total += torch.nn.functional.cross_entropy(
            logits[0, :-1], ids[i, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return total, count
