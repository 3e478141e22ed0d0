"""Shared fixtures: tiny random models of every supported family, batches with left padding."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

# tiny models gain nothing from intra-op threads, and two threads on a shared 2-core box thrash
torch.set_num_threads(1)

settings.register_profile(
    "kvprune", derandomize=True, deadline=None, max_examples=20, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "kvprune"))

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
VOCAB = 128
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_model(arch: str = "llama", attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """A random-initialised 2-layer GQA model of ``arch`` (deterministic per seed)."""
    kw = {**_COMMON, **overrides, "attn_implementation": attn}
    if arch == "llama":
        config, cls = LlamaConfig(**kw), LlamaForCausalLM
    elif arch == "mistral":
        config, cls = MistralConfig(sliding_window=None, **kw), MistralForCausalLM
    elif arch == "qwen2":
        config, cls = Qwen2Config(use_sliding_window=False, **kw), Qwen2ForCausalLM
    elif arch == "qwen3":
        config, cls = Qwen3Config(head_dim=16, use_sliding_window=False, **kw), Qwen3ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config).to(dtype).eval()
    # random init gives near-uniform attention; sharpen it so policies make distinct choices
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    return model


def generate_logits(model, ids, mask, cache, n: int = 6, **kw):
    """Greedy ``generate`` with ``cache``: (sequences, logits ``[B, n, V]``)."""
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                         past_key_values=cache, output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits, 1)


def padded_batch(lengths: list[int], seed: int = 0, total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` for prompts of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    total = total or max(lengths)
    ids = torch.zeros((len(lengths), total), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, total - n :] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, total - n :] = 1
    return ids, mask


@pytest.fixture
def llama():
    return tiny_model("llama")
