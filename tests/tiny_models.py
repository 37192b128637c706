"""Tiny models built in-process and saved as sharded safetensors with a tokenizer, and a
synthetic corpus. Never downloads anything."""
from __future__ import annotations

import os
import random

import torch

WORDS = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "they", "you", "were", "her", "she", "there", "one", "all", "we", "their", "been", "has", "when", "who", "will", "more", "no", "if", "out", "so", "said", "what", "up", "its", "about", "into", "than", "them", "can", "only", "other", "new", "some", "could", "time", "these", "two", "may", "then", "do", "first", "any", "my", "now", "such", "like", "our", "over", "man", "me", "even", "most", "made", "after", "also", "did", "many", "before", "must", "through", "back", "years", "where", "much", "your", "way", "well", "down", "should", "because", "each", "just", "those", "people", "how", "too", "little", "state", "good", "very", "make", "world", "still", "own", "see", "men", "work", "long", "get", "here", "between", "both", "life", "being", "under", "never", "day", "same", "another", "know", "while", "last", "might", "us", "great", "old", "year", "off", "come", "since", "against", "go", "came", "right", "used", "take", "three", "nation", "union", "congress", "president", "government", "law", "peace", "war", "people", "states"]


def corpus_text(num_words: int = 40000, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines, line = [], []
    for i in range(num_words):
        line.append(rng.choice(WORDS))
        if rng.random() < 0.08:
            lines.append(" ".join(line).capitalize() + ".")
            line = []
    return "\n".join(lines)


def build_tokenizer(folder: str, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus_text(5000, seed=1)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(folder)


def tiny_config(arch: str, num_layers: int = 4, vocab_size: int = 320):
    from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config, Qwen3Config

    if arch == "llama":  # GQA: 4 query heads share 2 key-value heads
        return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=num_layers, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256,
                           tie_word_embeddings=True)
    if arch == "qwen2":  # q/k/v biases, untied head
        return Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=num_layers, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256,
                           tie_word_embeddings=False)
    if arch == "mistral":
        return MistralConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=num_layers, num_attention_heads=4,
                             num_key_value_heads=1, max_position_embeddings=256,
                             sliding_window=None, tie_word_embeddings=False)
    if arch == "qwen3":  # q/k norms inside attention, explicit head_dim
        return Qwen3Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=num_layers, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                           tie_word_embeddings=True)
    if arch == "opt":
        return OPTConfig(vocab_size=vocab_size, hidden_size=64, ffn_dim=128,
                         num_hidden_layers=num_layers, num_attention_heads=4,
                         max_position_embeddings=256, word_embed_proj_dim=64)
    raise ValueError(arch)


def build_model(folder: str, arch: str, num_layers: int = 4, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> str:
    """Save a randomly initialised tiny model as >= 2 safetensors shards with an index."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, num_layers)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    with torch.no_grad():  # spread the weights so quantization error is visible
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    os.makedirs(folder, exist_ok=True)
    model.to(dtype).save_pretrained(folder, max_shard_size="150KB")
    build_tokenizer(folder, config.vocab_size)
    shards = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    assert len(shards) >= 2, shards
    return folder
