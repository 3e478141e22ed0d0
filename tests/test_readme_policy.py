"""The README's "Writing a policy" example, taken from the README text itself, registers and runs."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from conftest import padded_batch, tiny_model

import kvprune
from kvprune.integrations.compat import with_cache
from kvprune.policies import POLICIES, methods

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    text = README.read_text()
    block = re.search(r"<!-- policy-example -->\s*```python\n(.*?)```\s*<!-- /policy-example -->", text, re.S)
    assert block, "the README lost its policy example"
    return block.group(1)


def test_readme_policy_registers_and_evicts():
    model = tiny_model()
    namespace = {"model": model}
    exec(compile(_example(), str(README), "exec"), namespace)  # noqa: S102 - the project's own README
    try:
        assert "tova_heads" in POLICIES and "tova_heads" in methods()
        cache = namespace["cache"]
        assert cache.policy.name == "tova_heads" and cache.policy.recent == 8
        ids, mask = padded_batch([90, 70])
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                           **with_cache(cache))
        assert all(layer.physical_length <= 64 for layer in cache.layers)
        assert sum(cache.stats().evictions) > 0
        # one keep-set per KV head: the heads of a layer keep different tokens
        layer = cache.layers[0]
        assert not torch.equal(layer.positions[0, 0], layer.positions[0, 1])
        # by name, any case, through the same entry point as the built-in policies
        kvprune.make_cache(model, "TOVA_HEADS", 0.5)
        # defining it again (a notebook cell re-run) replaces it; another class may not take the name
        exec(compile(_example(), str(README), "exec"), dict(namespace))  # noqa: S102
    finally:
        POLICIES.pop("tova_heads", None)
    assert "tova_heads" not in methods()


def test_a_taken_name_is_refused():
    from dataclasses import dataclass

    import pytest

    from kvprune.errors import InvalidParameterError
    from kvprune.policies import Policy

    with pytest.raises(InvalidParameterError, match="policy name 'h2o' is already"):
        @dataclass
        class Mine(Policy):
            name = "h2o"
    with pytest.raises(InvalidParameterError, match="is taken by kvprune"):
        @dataclass
        class Lazy(Policy):
            name = "lazyllm"


def test_one_registry_answers_every_dispatch_question():
    """Name (any case) or configuration object -> configuration class and budget kind, for every method."""
    import pytest

    from kvprune.errors import UnknownPolicyError
    from kvprune.policies import H2O, LazyLLM, SpAtten, budget_kind, method_config

    assert method_config("LazyLLM") is LazyLLM and method_config(SpAtten()) is SpAtten and method_config(H2O()) is H2O
    assert [budget_kind(m) for m in ("h2o", "full", "lazyllm", "SpAtten")] == ["tokens", "none", "none", "kv_fraction"]
    for bad in ("lru", 3, object()):
        with pytest.raises(UnknownPolicyError):
            method_config(bad)
    assert set(methods()) == set(POLICIES) | {"lazyllm", "spatten"}
