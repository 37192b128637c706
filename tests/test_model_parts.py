"""Streaming the model part by part (no Ray) equals the plain transformers forward."""
import math

import pytest
import torch

from pipeline import block_pass
from pipeline.plan import open_model
from pipeline.streams import BudgetStore, MemoryStore, split_windows

pytestmark = pytest.mark.e2e


def streamed_nll(path, windows, store, chunk_size=3):
    parts = open_model(path)
    ids_chunks = split_windows(windows, chunk_size)
    stream = block_pass.embed_stream(parts, ids_chunks, store)
    for i in range(parts.num_blocks):
        stream = block_pass.forward_block(parts, i, stream, store)
    return block_pass.score_stream(parts, stream, ids_chunks, store)


@torch.no_grad()
def reference_nll(path, windows):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    logits = model(input_ids=windows).logits.float()
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction="sum")
    return nll.item(), windows[:, 1:].numel()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "mistral", "qwen3"])
def test_streamed_perplexity_equals_transformers(tiny_model, arch, tmp_path):
    path = tiny_model(arch)
    windows = torch.randint(0, 320, (7, 48), generator=torch.Generator().manual_seed(1))
    ref, n_ref = reference_nll(path, windows)
    for store in (MemoryStore(), BudgetStore(0, str(tmp_path / "stream"))):
        nll, n = streamed_nll(path, windows, store)
        assert n == n_ref
        assert math.exp(nll / n) == pytest.approx(math.exp(ref / n_ref), rel=1e-5)


def test_parts_read_only_their_tensors(tiny_model):
    parts = open_model(tiny_model("llama"))
    names = set(parts.tensor_names(parts.block_path(2)).values())
    assert names and all(n.startswith("model.layers.2.") for n in names)
    # the tied head reads the embedding tensor
    assert parts.tensor_names("lm_head") == {"weight": "model.embed_tokens.weight"}
