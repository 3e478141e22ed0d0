"""One method registry: every name resolves to a configuration class and a cache factory with the common options;
a new policy needs no factory of its own; options a method does not take are refused before the model changes."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_model

import kvprune
from kvprune.caches import PruningCache
from kvprune.errors import InvalidParameterError
from kvprune.integrations.factories import factory_for
from kvprune.integrations.models import make_pruning_cache
from kvprune.policies import H2O, POLICIES, Policy, method_config, methods

COMMON = ("backend", "prefill_only", "evict_every", "kv_bits")


@pytest.mark.parametrize("name", methods())
def test_every_method_has_a_factory_with_the_common_options(name):
    factory = factory_for(method_config(name))
    params = inspect.signature(factory).parameters
    assert all(p in params for p in COMMON), (name, list(params))


def test_a_new_policy_builds_a_pruning_cache_without_a_factory_of_its_own():
    @dataclass
    class OldestFirst(H2O):
        """Test policy: the scores of H2O, under another name."""

        name = "test_oldest_first"

    try:
        model = tiny_model()
        assert factory_for(OldestFirst) is make_pruning_cache
        cache = kvprune.make_cache(model, "Test_Oldest_First", 8)
        assert type(cache) is PruningCache and isinstance(cache.policy, OldestFirst)
        ids = torch.randint(3, model.config.vocab_size, (1, 20))
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache)
        assert all(layer.physical_length <= 8 for layer in cache.layers)
    finally:
        POLICIES.pop("test_oldest_first", None)  # other tests list the registered names


def test_the_base_policy_answers_for_every_eviction_policy():
    assert factory_for(Policy) is make_pruning_cache and factory_for(H2O) is make_pruning_cache


@pytest.mark.parametrize("method", ["lazyllm", "spatten"])
@pytest.mark.parametrize("option", [{"evict_every": 4}, {"prefill_only": True}, {"kv_bits": 8}])
def test_options_a_method_does_not_take_are_refused_before_the_model_changes(method, option):
    model = tiny_model()
    before = model.config._attn_implementation
    with pytest.raises(InvalidParameterError):
        kvprune.make_cache(model, method, **option)
    assert model.config._attn_implementation == before


def test_the_registry_says_which_methods_take_a_tokenizer():
    from kvprune.eval.qa import with_tokenizer
    from kvprune.policies import wants_tokenizer

    assert [m for m in methods() if wants_tokenizer(m)] == ["kvzip"]
    tok = object()
    assert with_tokenizer("KVzip", {"chunk_size": 8}, tok) == {"chunk_size": 8, "tokenizer": tok}
    assert with_tokenizer("kvzip", {"tokenizer": None}, tok) == {"tokenizer": None}  # the caller's choice stands
    assert with_tokenizer("h2o", {}, tok) == {} and with_tokenizer("kvzip", {}, None) == {}


@pytest.mark.parametrize("method,config", [("lazyllm", "LazyLLM"), ("spatten", "SpAtten"), ("kvzip", "KVzip")])
def test_a_configuration_object_and_parameters_by_name_are_refused_together(method, config):
    import kvprune.policies as policies

    model = tiny_model()
    obj = getattr(policies, config)() if hasattr(policies, config) else method_config(method)()
    with pytest.raises(InvalidParameterError, match="not both"):
        kvprune.make_cache(model, obj, 0.5 if method == "kvzip" else None, n_sink=1)
