"""Layer placement with accelerate on CPU: a ``device_map`` that offloads some decoder layers (and the head) to
disk gives every method the tokens and keep-sets of the same model held whole in memory.

Offloaded layers hold their weights on the ``meta`` device and accelerate's hooks load them for each call, so
this exercises kvprune's own forwards (LazyLLM's and SpAtten's layer-by-layer loops call the layers directly)
through accelerate's dispatch without a GPU; tests/test_devices.py splits a model across CPU and GPU where one exists.
"""

from __future__ import annotations

import pytest
import torch
from conftest import padded_batch, tiny_model

import kvprune
import tp_worker

pytestmark = pytest.mark.integration

pytest.importorskip("accelerate", reason="device_map placement needs accelerate (a kvprune dependency)")

DEVICE_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
              "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu", "lm_head": "disk"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("offload")
    tiny_model("llama", num_hidden_layers=4).save_pretrained(root / "model")
    whole = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32).eval()
    placed = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32, device_map=DEVICE_MAP,
                                                  offload_folder=str(root / "offload")).eval()
    return whole, placed


def test_the_device_map_really_offloads(models):
    _, placed = models
    assert placed.hf_device_map == DEVICE_MAP
    assert placed.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # loaded per call by the hook
    assert placed.model.layers[0].self_attn.q_proj.weight.device.type == "cpu"


@pytest.mark.parametrize("method", list(tp_worker.METHODS))
def test_every_method_on_disk_offloaded_layers_equals_the_whole_model(models, method):
    method, budget, params = tp_worker.METHODS[method]
    ids, mask = padded_batch([14, 9])
    results = []
    for model in models:
        cache = kvprune.make_cache(model, method, budget, **params)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                             past_key_values=cache)
        results.append((out.tolist(), tp_worker.keep_sets(cache)))
        assert all(layer.keys.device.type == "cpu" for layer in cache.layers if layer.is_initialized)
    assert results[1] == results[0]
