"""Each layer's storage lives on the device of its incoming keys (models split with accelerate)."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_batch, tiny_model
from transformers import DynamicCache

import kvprune

pytestmark = [pytest.mark.integration, pytest.mark.gpu]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="splitting a model across devices needs a CUDA GPU")
def test_layers_split_across_cpu_and_gpu_match_dynamic_cache():
    from accelerate import dispatch_model

    model = tiny_model("llama", "sdpa")
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": 0, "lm_head": "cpu"}
    model = dispatch_model(model, device_map=device_map)
    ids, mask = padded_batch([12, 7])
    ids, mask = ids.to(0), mask.to(0)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                         past_key_values=DynamicCache(), pad_token_id=0)
    cache = kvprune.make_cache(model, "a2sf", 64)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                         past_key_values=cache, pad_token_id=0)
    assert torch.equal(out.cpu(), ref.cpu())
    assert cache.layers[0].keys.device.type == "cuda" and cache.layers[1].keys.device.type == "cpu"
    assert cache.layers[0].positions.device.type == "cuda" and cache.layers[1].scores.device.type == "cpu"
