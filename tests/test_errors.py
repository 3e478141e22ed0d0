"""Every misuse of kvprune raises a typed error from ``kvprune.errors`` whose message says what is valid.

Each case pairs a misuse with the specific error class it must raise and a phrase of the message
that states the valid range or options, so a user reading the error knows how to fix the call.
"""

from __future__ import annotations

import importlib
import re
import types

import pytest
import torch
from conftest import padded_batch, tiny_model
from transformers import GPT2Config, GPT2LMHeadModel, PretrainedConfig

import kvprune
from kvprune import errors
from kvprune.errors import (
    BatchMismatchError,
    CacheUsageError,
    InvalidBudgetError,
    InvalidParameterError,
    KVPruneError,
    UnknownPolicyError,
    UnsupportedArchitectureError,
    UnsupportedGenerationModeError,
)

NAN, INF = float("nan"), float("inf")
SUPPORTED = "supported: llama, mistral, qwen2, qwen3"
BACKENDS = "valid: eager, sdpa, flash_attention_2"
POLICY_NAMES = "valid names: a2sf, full, h2o, keydiff, knorm, kvzip, observed, random, snapkv, streaming, tova"
METHOD_NAMES = "valid names (any case): a2sf, full, h2o, keydiff, knorm, kvzip, lazyllm, observed, random, snapkv, spatten, streaming, tova"


def raises(cls: type[Exception], phrase: str):
    """``pytest.raises`` of exactly this kvprune error, whose message contains ``phrase`` verbatim."""
    return pytest.raises(cls, match=re.escape(phrase))


# -- budgets -----------------------------------------------------------------------------------
INT_BUDGET = "a token budget must be an integer >= 1"
RATIO_BUDGET = "a budget ratio must be a float in (0, 1)"
ANY_BUDGET = "a budget is an int >= 1 or a float ratio in (0, 1)"


@pytest.mark.parametrize(
    ("budget", "phrase"),
    [
        pytest.param(0, INT_BUDGET, id="zero"),
        pytest.param(-3, INT_BUDGET, id="negative-int"),
        pytest.param(NAN, RATIO_BUDGET, id="nan-ratio"),
        pytest.param(INF, RATIO_BUDGET, id="inf-ratio"),
        pytest.param(-INF, RATIO_BUDGET, id="minus-inf-ratio"),
        pytest.param(1.0, RATIO_BUDGET, id="ratio-1.0"),
        pytest.param(1.5, RATIO_BUDGET, id="ratio-1.5"),
        pytest.param(0.0, RATIO_BUDGET, id="ratio-0.0"),
        pytest.param(-0.25, RATIO_BUDGET, id="negative-ratio"),
        pytest.param(True, ANY_BUDGET, id="bool-true"),
        pytest.param(False, ANY_BUDGET, id="bool-false"),
        pytest.param("8", ANY_BUDGET, id="string"),
        pytest.param([8], ANY_BUDGET, id="list"),
    ],
)
def test_invalid_budget(budget, phrase):
    with raises(InvalidBudgetError, phrase):
        kvprune.PruningCache("a2sf", budget, num_layers=2)


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        pytest.param({}, "exactly one of tokens=<int >= 1> or ratio=<float in (0, 1)>", id="neither"),
        pytest.param({"tokens": 8, "ratio": 0.5}, "exactly one of tokens=<int >= 1>", id="both"),
        pytest.param({"tokens": 8.0}, INT_BUDGET, id="float-tokens"),
        pytest.param({"ratio": True}, RATIO_BUDGET, id="bool-ratio"),
    ],
)
def test_invalid_budget_object(kwargs, phrase):
    with raises(InvalidBudgetError, phrase):
        kvprune.Budget(**kwargs)


def test_invalid_budget_through_make_cache_leaves_model_untouched(llama):
    with raises(InvalidBudgetError, INT_BUDGET):
        kvprune.make_cache(llama, "h2o", budget=0)
    assert llama.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    ("policy", "min_budget"),
    [("streaming", 5), ("h2o", 1), ("tova", 1), ("snapkv", 32), ("knorm", 1), ("random", 1), ("a2sf", 1)],
)
def test_missing_budget_for_evicting_policy(policy, min_budget):
    phrase = f"needs a budget: an int token count >= {min_budget} or a float ratio in (0, 1)"
    with raises(InvalidBudgetError, phrase):
        kvprune.PruningCache(policy, num_layers=2)


@pytest.mark.parametrize(
    ("policy", "params", "budget", "floor"),
    [
        pytest.param("streaming", {"n_sink": 4}, 3, 5, id="streaming-sinks"),
        pytest.param("h2o", {"recent": 8}, 5, 8, id="h2o-int-recent"),
        pytest.param("snapkv", {}, 16, 32, id="snapkv-window"),
        pytest.param("a2sf", {"n_sink": 4, "recent": 0.5}, 6, 8, id="a2sf-sinks-plus-fraction"),
    ],
)
def test_budget_below_protected_tokens(policy, params, budget, floor):
    with raises(InvalidBudgetError, f"use a budget >= {floor} or fewer protected tokens"):
        kvprune.PruningCache(policy, budget, num_layers=2, **params)


# -- policies and their parameters ---------------------------------------------------------------
ALPHA = "alpha (the forgetting factor) must be in (0, 1]"
RECENT = "recent must be a token count >= 0 or a fraction of the budget in [0, 1)"


@pytest.mark.parametrize(
    ("policy", "params", "phrase"),
    [
        pytest.param("a2sf", {"alpha": 0}, ALPHA, id="alpha-0"),
        pytest.param("a2sf", {"alpha": -0.1}, ALPHA, id="alpha-negative"),
        pytest.param("a2sf", {"alpha": 1.5}, ALPHA, id="alpha-1.5"),
        pytest.param("a2sf", {"alpha": NAN}, ALPHA, id="alpha-nan"),
        pytest.param("a2sf", {"alpha": INF}, ALPHA, id="alpha-inf"),
        pytest.param("a2sf", {"alpha": "0.5"}, ALPHA, id="alpha-string"),
        pytest.param("streaming", {"n_sink": -1}, "n_sink must be an integer >= 0", id="n_sink-negative"),
        pytest.param("h2o", {"n_sink": 2.5}, "n_sink must be an integer >= 0", id="n_sink-float"),
        pytest.param("h2o", {"recent": 1.0}, RECENT, id="recent-fraction-1"),
        pytest.param("tova", {"recent": -2}, RECENT, id="recent-negative"),
        pytest.param("h2o", {"recent": NAN}, RECENT, id="recent-nan"),
        pytest.param("snapkv", {"kernel_size": 4}, "kernel_size must be odd", id="snapkv-even-kernel"),
        pytest.param("snapkv", {"kernel_size": 0}, "kernel_size must be an integer >= 1", id="snapkv-kernel-0"),
        pytest.param("snapkv", {"pooling": "mean"}, "pooling must be 'max' or 'avg'", id="snapkv-pooling"),
        pytest.param("snapkv", {"window": 0}, "window must be an integer >= 1", id="snapkv-window-0"),
        pytest.param("random", {"seed": -1}, "seed must be an integer >= 0", id="random-seed-negative"),
        pytest.param(
            "a2sf", {"beta": 1}, "valid parameters: ['alpha', 'n_sink', 'recent']", id="unknown-param-a2sf"
        ),
        pytest.param(
            "streaming", {"alpha": 0.5}, "valid parameters: ['n_sink', 'recent']", id="unknown-param-streaming"
        ),
    ],
)
@pytest.mark.parametrize("entry", ["build_policy", "PruningCache"])
def test_invalid_policy_parameter(entry, policy, params, phrase):
    with raises(InvalidParameterError, phrase):
        if entry == "build_policy":
            kvprune.build_policy(policy, **params)
        else:
            kvprune.PruningCache(policy, 64, num_layers=2, **params)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("lru", id="unknown-name"),
        pytest.param("", id="empty-name"),
        pytest.param(None, id="none"),
        pytest.param(kvprune.A2SF, id="policy-class-not-instance"),
    ],
)
def test_unknown_policy(name):
    with raises(UnknownPolicyError, POLICY_NAMES):
        kvprune.build_policy(name)


def test_unknown_policy_through_make_cache(llama):
    with raises(UnknownPolicyError, METHOD_NAMES):
        kvprune.make_cache(llama, "lru", budget=8)


def test_policy_object_with_parameters():
    with raises(InvalidParameterError, "pass parameters either to the policy object or by name, not both"):
        kvprune.PruningCache(kvprune.A2SF(alpha=0.5), 8, num_layers=2, alpha=0.2)


# -- sizing the cache ------------------------------------------------------------------------------
NUM_LAYERS = "pass config=model.config or num_layers=<int >= 1> to size the cache"


@pytest.mark.parametrize("num_layers", [None, 0, -1, True, 2.0], ids=["missing", "zero", "negative", "bool", "float"])
def test_invalid_num_layers(num_layers):
    with raises(InvalidParameterError, NUM_LAYERS):
        kvprune.PruningCache("full", num_layers=num_layers)


def test_config_without_num_hidden_layers():
    with raises(InvalidParameterError, NUM_LAYERS):
        kvprune.PruningCache("full", config=PretrainedConfig())


# -- architectures and attention backends ------------------------------------------------------------
def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()


@pytest.mark.parametrize("entry", ["make_cache", "prepare_model"])
def test_unsupported_architecture(entry):
    model = tiny_gpt2()
    before = model.config._attn_implementation
    with raises(UnsupportedArchitectureError, SUPPORTED):
        if entry == "make_cache":
            kvprune.make_cache(model, "a2sf", budget=8)
        else:
            kvprune.prepare_model(model)
    assert model.config._attn_implementation == before


def test_unsupported_architecture_checked_before_sizing_cache():
    from transformers import BltConfig

    model = types.SimpleNamespace(config=BltConfig())  # make_cache only reads .config before refusing
    with raises(UnsupportedArchitectureError, SUPPORTED):
        kvprune.make_cache(model, "a2sf", budget=8)


def test_unsupported_layer_types(llama):
    llama.config.layer_types = ["full_attention", "linear_attention"]
    with raises(UnsupportedArchitectureError, "kvprune handles full and sliding attention"):
        kvprune.prepare_model(llama)


@pytest.mark.parametrize("backend", ["flex_attention", "paged_attention", "bogus"])
@pytest.mark.parametrize("entry", ["prepare_model", "make_cache"])
def test_unsupported_attention_backend(llama, entry, backend):
    with raises(InvalidParameterError, BACKENDS):
        if entry == "prepare_model":
            kvprune.prepare_model(llama, backend=backend)
        else:
            kvprune.make_cache(llama, "a2sf", budget=8, backend=backend)
    assert llama.config._attn_implementation == "sdpa"


# -- using a cache at run time ---------------------------------------------------------------------
@pytest.mark.parametrize(("first", "second"), [(2, 3), (2, 1)], ids=["grow-2-to-3", "shrink-2-to-1"])
def test_batch_mismatch(llama, first, second):
    cache = kvprune.make_cache(llama, "a2sf", budget=8)
    ids, mask = padded_batch([5] * first)
    llama(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    ids2, mask2 = padded_batch([1] * second, seed=1)
    mask2 = torch.cat([mask[:1].expand(second, -1), mask2], dim=1)
    with raises(BatchMismatchError, f"holds batch {first} x 2 KV heads but got {second} x 2; use one cache per batch"):
        llama(ids2, attention_mask=mask2, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 5  # nothing was appended


def test_kv_heads_mismatch_with_other_model(llama):
    cache = kvprune.make_cache(llama, "a2sf", budget=8)
    ids, _ = padded_batch([5])
    llama(ids, past_key_values=cache, use_cache=True)
    other = kvprune.prepare_model(tiny_model("llama", num_key_value_heads=4))
    with raises(BatchMismatchError, "holds batch 1 x 2 KV heads but got 1 x 4; use one cache per batch"):
        other(ids[:, :1], past_key_values=cache, use_cache=True)


def test_cache_with_unprepared_model(llama):
    cache = kvprune.PruningCache("a2sf", 8, config=llama.config)
    ids, mask = padded_batch([5, 4])
    with raises(CacheUsageError, "call kvprune.prepare_model(model) first"):
        llama(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 0
    kvprune.prepare_model(llama)  # the fix the message names works on the same cache
    llama(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 5


def test_cache_without_config_with_unprepared_model(llama):
    """Sized by num_layers only, the cache still asks the calling attention module and refuses before storing
    anything: it never holds more than its budget, not even for one forward."""
    cache = kvprune.PruningCache("a2sf", 8, num_layers=2)
    ids, _ = padded_batch([12])
    with raises(CacheUsageError, "call kvprune.prepare_model(model) first"):
        llama(ids, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 0 and not any(layer.is_initialized for layer in cache.layers)


def test_cache_with_too_few_layers(llama):
    kvprune.prepare_model(llama)
    cache = kvprune.PruningCache("a2sf", 8, num_layers=1)
    with raises(InvalidParameterError, "layer index 1 is out of range for a cache of 1 layers"):
        llama(padded_batch([5])[0], past_key_values=cache, use_cache=True)


def test_four_dimensional_attention_mask(llama):
    cache = kvprune.make_cache(llama, "a2sf", budget=8)
    ids, _ = padded_batch([6])
    mask4d = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    with raises(InvalidParameterError, "needs the 2D padding mask [batch, tokens]"):
        llama(ids, attention_mask=mask4d, past_key_values=cache, use_cache=True)


# -- generate modes a pruning cache cannot serve ------------------------------------------------------
ROLLBACK = (
    "assisted/speculative decoding and prompt-lookup decoding are not supported; use greedy, sampling or beam search"
)


@pytest.mark.parametrize("args", [(-1,), (0,), (3,)], ids=["crop-minus-1", "crop-0", "crop-3"])
def test_crop_refused(llama, args):
    cache = kvprune.make_cache(llama, "a2sf", budget=8)
    llama(padded_batch([5])[0], past_key_values=cache, use_cache=True)
    with raises(UnsupportedGenerationModeError, ROLLBACK):
        cache.crop(*args)


@pytest.mark.parametrize("mode", ["assistant_model", "prompt_lookup"])
def test_assisted_generate_refused(llama, mode):
    cache = kvprune.make_cache(llama, "a2sf", budget=8)
    ids, mask = padded_batch([6])
    if mode == "assistant_model":
        extra = {"assistant_model": tiny_model("llama", seed=1)}
    else:
        extra = {"prompt_lookup_num_tokens": 2}
    with raises(UnsupportedGenerationModeError, ROLLBACK):
        llama.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=6, do_sample=False, **extra)


def test_torch_compile_refused(llama, monkeypatch):
    cache = kvprune.make_cache(llama, "a2sf", budget=8)
    monkeypatch.setattr(importlib.import_module("kvprune.caches.layer"), "_is_compiling", lambda: True)
    with raises(UnsupportedGenerationModeError, "generate without compile"):
        llama(padded_batch([5])[0], past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 0
    assert cache.is_compileable is False


# -- the error hierarchy -------------------------------------------------------------------------------
ALL_ERRORS = [
    InvalidBudgetError,
    InvalidParameterError,
    UnknownPolicyError,
    UnsupportedArchitectureError,
    UnsupportedGenerationModeError,
    BatchMismatchError,
    CacheUsageError,
]


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (InvalidBudgetError, ValueError),
        (InvalidParameterError, ValueError),
        (UnknownPolicyError, ValueError),
        (BatchMismatchError, ValueError),
        (UnsupportedArchitectureError, NotImplementedError),
        (UnsupportedGenerationModeError, NotImplementedError),
        (CacheUsageError, RuntimeError),
    ],
    ids=lambda v: v.__name__,
)
def test_error_hierarchy(cls, builtin):
    assert issubclass(cls, KVPruneError)
    assert issubclass(cls, builtin)
    with pytest.raises(builtin):  # users' existing ``except ValueError:`` clauses still catch it
        raise cls("x")


def test_every_error_is_exported_and_covered():
    defined = {
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == errors.__name__
    }
    assert defined == {KVPruneError, *ALL_ERRORS}
    for cls in defined:
        assert getattr(kvprune, cls.__name__) is cls
        assert cls.__name__ in kvprune.__all__


def test_real_torch_compile_refused(llama):
    """Not only the guard: a model compiled with torch.compile reaches it and raises the typed error."""
    cache = kvprune.make_cache(llama, "a2sf", 16)
    llama.forward = torch.compile(llama.forward)
    with raises(UnsupportedGenerationModeError, "cannot run under torch.compile"):
        llama(input_ids=torch.randint(3, 100, (1, 10)), past_key_values=cache)
