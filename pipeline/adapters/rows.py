"""Adapter rows: where a model's blocks, embedding and head live, which linears a block has,
which of them an inference engine fuses, and which norm feeds which linears.

Adding a model family is adding a row (see docs/adding-a-model.md); nothing else branches on
architecture names.
"""
from __future__ import annotations

import dataclasses
import enum

from pipeline.config import ConfigError


class Embedding(str, enum.Enum):
    TOKENS = "tokens"  # h = embed_tokens(ids)
    TOKENS_PLUS_LEARNED_POSITIONS = "tokens+learned_positions"  # OPT: project_in(embed) + pos


class Positions(str, enum.Enum):
    ROTARY = "rotary"  # the block receives (cos, sin) from the model's rotary module
    NONE = "none"  # positions were added at the embedding


@dataclasses.dataclass(frozen=True)
class Adapter:
    blocks: str  # module path of the ModuleList of transformer blocks
    num_blocks_key: str  # config.json key with the depth
    embedding: Embedding
    embed_modules: tuple[str, ...]  # modules the first stage runs, in order
    head_modules: tuple[str, ...]  # modules the last stage runs, in order (missing ones skipped)
    positions: Positions
    rotary: str | None  # module path of the rotary embedding, when positions are rotary
    tied_weights: tuple[tuple[str, str], ...]  # (tensor, source) when tie_word_embeddings
    linears: tuple[str, ...]  # quantizable linears, relative to a block
    fused_groups: tuple[tuple[str, ...], ...]  # linears an engine keeps on one scheme
    norm_to_linears: tuple[tuple[str, tuple[str, ...]], ...]
    value_out: tuple[str, str]  # (v projection, attention output projection)
    query_key: tuple[str, str]  # (q projection, k projection)


_LLAMA = Adapter(
    blocks="model.layers",
    num_blocks_key="num_hidden_layers",
    embedding=Embedding.TOKENS,
    embed_modules=("model.embed_tokens",),
    head_modules=("model.norm", "lm_head"),
    positions=Positions.ROTARY,
    rotary="model.rotary_emb",
    tied_weights=(("lm_head.weight", "model.embed_tokens.weight"),),
    linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    fused_groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                  ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
    norm_to_linears=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ),
    value_out=("self_attn.v_proj", "self_attn.o_proj"),
    query_key=("self_attn.q_proj", "self_attn.k_proj"),
)

_OPT = Adapter(
    blocks="model.decoder.layers",
    num_blocks_key="num_hidden_layers",
    embedding=Embedding.TOKENS_PLUS_LEARNED_POSITIONS,
    embed_modules=("model.decoder.embed_tokens", "model.decoder.project_in",
                   "model.decoder.embed_positions"),
    head_modules=("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"),
    positions=Positions.NONE,
    rotary=None,
    tied_weights=(("lm_head.weight", "model.decoder.embed_tokens.weight"),),
    linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
             "fc1", "fc2"),
    fused_groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                  ("self_attn.out_proj",), ("fc1",), ("fc2",)),
    norm_to_linears=(
        ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("final_layer_norm", ("fc1",)),
    ),
    value_out=("self_attn.v_proj", "self_attn.out_proj"),
    query_key=("self_attn.q_proj", "self_attn.k_proj"),
)

# Qwen3 adds q/k norms inside attention; they are not linears, so the Llama row still applies.
ADAPTERS: dict[str, Adapter] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _LLAMA,
    "Qwen3ForCausalLM": _LLAMA,
    "OPTForCausalLM": _OPT,
}


def adapter_for(architectures: list[str] | None) -> tuple[str, Adapter]:
    if architectures is not None and not (isinstance(architectures, list) and all(
            isinstance(a, str) for a in architectures)):
        raise ConfigError(f"model.path: config.json's architectures is {architectures!r}; it "
                          "must be a list of class names, e.g. [\"LlamaForCausalLM\"]")
    for name in architectures or []:
        if name in ADAPTERS:
            return name, ADAPTERS[name]
    raise ConfigError(
        f"model.path: architecture {', '.join(architectures or ['(none in config.json)'])} is not "
        f"supported; supported: {', '.join(sorted(ADAPTERS))}")
