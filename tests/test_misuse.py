"""Misuse that used to crash deep inside torch, pass silently or change the model first: each is refused with a
typed error that says what is valid, before anything on the model or in the cache changes."""

from __future__ import annotations

import gc
import importlib
import importlib.util
import re
import types

import pytest
import torch
from conftest import padded_batch, tiny_model

import kvprune
from kvprune.caches.lazy import LazyCache
from kvprune.errors import CacheUsageError, InvalidBudgetError, InvalidParameterError, UnknownPolicyError
from kvprune.integrations.compat import with_cache
from kvprune.policies import METHODS, POLICIES
from kvprune.policies.lazyllm import LazyLLM

LAZY = {"prune_layers": (0,), "prune_ratios": (0.5,)}


def raises(cls, phrase):
    return pytest.raises(cls, match=re.escape(phrase))


def _state(model) -> tuple:
    """What preparing a model changes: its attention implementation, the stepwise forward wrapper, generate."""
    return (model.config._attn_implementation, getattr(model.model, "_kvprune_stepwise", False),
            getattr(model, "_kvprune_generate_guard", False))


def _cache(model, method: str):
    if method == "lazyllm":
        return kvprune.make_cache(model, "lazyllm", **LAZY)
    if method == "spatten":
        return kvprune.make_cache(model, "spatten", head_ratio=0.25, head_start=0.0)
    if method == "full":
        return kvprune.make_cache(model, "full")
    return kvprune.make_cache(model, method, 6, **({"window": 2} if method == "snapkv" else {}))


ALL = sorted(METHODS)


# -- budgets ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [2**31, 2**63, 10**30])
def test_budget_beyond_int32_positions_refused_before_the_model_changes(budget):
    model = tiny_model()
    before = _state(model)
    with raises(InvalidBudgetError, "a token budget must be an integer >= 1 and <= 2147483647"):
        kvprune.make_cache(model, "h2o", budget)
    assert _state(model) == before
    assert kvprune.Budget.parse(2**31 - 1).tokens == 2**31 - 1


def test_full_with_a_budget_is_refused():
    model = tiny_model()
    with raises(InvalidBudgetError, "policy 'full' keeps every token and takes no budget; pass budget=None"):
        kvprune.make_cache(model, "full", 64)
    assert kvprune.make_cache(model, "full").stats().kv_bytes == 0


# -- names and backends -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["H2O", "LazyLLM", "SpAtten", "SnapKV", "A2SF", "Full"])
def test_method_names_any_case(name):
    model = tiny_model()
    budget = None if name.lower() in ("lazyllm", "full", "spatten") else 0.5
    kvprune.make_cache(model, name, budget)


def test_unknown_method_lists_every_method():
    with raises(UnknownPolicyError, f"valid names (any case): {', '.join(METHODS)}"):
        kvprune.make_cache(tiny_model(), "lru", 8)
    assert "lazyllm" in METHODS and "spatten" in METHODS


def test_pruning_cache_points_stepwise_methods_to_make_cache():
    with raises(UnknownPolicyError, "build its own cache with kvprune.make_cache(model, 'lazyllm')"):
        kvprune.PruningCache("LazyLLM", num_layers=2)


@pytest.mark.skipif(torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None,
                    reason="flash-attn and CUDA are present: the backend is available here")
@pytest.mark.parametrize("method", ["h2o", "spatten"])
def test_flash_attention_without_cuda_in_kvprune_words(method):
    model = tiny_model()
    before = _state(model)
    with raises(InvalidParameterError, "backend 'flash_attention_2' needs"):
        kvprune.make_cache(model, method, 0.5, backend="flash_attention_2")
    assert _state(model) == before


def test_unknown_backend_refused_before_the_model_changes():
    model = tiny_model()
    before = _state(model)
    with raises(InvalidParameterError, "valid: eager, sdpa, flash_attention_2"):
        kvprune.make_cache(model, "lazyllm", backend="xformers")
    assert _state(model) == before


# -- LazyLLM schedules ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("layers", "phrase"),
    [((1, 1), "pruning layers 1 and 1 name one layer twice in (1, 1)"),
     ((0.2, 1), "pruning layers 0.2 and 1 are both layer 1 of 5"),
     ((1, 0.2), "pruning layers 1 and 0.2 are both layer 1 of 5"),
     ((1, 7), "pruning layer 7 leaves no later layer to skip; valid: 0..3 for 5 layers")],
)
def test_lazyllm_schedule_refused_before_the_model_changes(layers, phrase):
    model = tiny_model(num_hidden_layers=5)
    before = _state(model)
    with raises(InvalidParameterError, phrase):
        kvprune.make_cache(model, "lazyllm", prune_layers=layers, prune_ratios=(0.5, 0.5))
    assert _state(model) == before


def test_lazyllm_fractions_on_one_layer_compose():
    """The default schedule on a shallow model: 0.6 and 0.9 of 4 layers both land on layer 2; both ratios apply."""
    assert LazyLLM().schedule(4) == {1: 0.5, 2: 0.75}
    assert LazyLLM((0.5, 0.6), (0.2, 0.5)).schedule(5) == {2: pytest.approx(0.2), 3: pytest.approx(0.5)}


# -- a cache used with another model, or with a model kvprune does not drive -------------------------------
@pytest.mark.parametrize("method", ALL)
def test_cache_reused_on_a_model_with_another_head_size(method):
    small = tiny_model()  # head size 16
    big = kvprune.prepare_model(tiny_model(hidden_size=128, intermediate_size=256))  # head size 32, same KV heads
    cache = _cache(small, method)
    ids, mask = padded_batch([6])
    with torch.no_grad():
        small(input_ids=ids, attention_mask=mask, **with_cache(cache), use_cache=True)
        if method == "lazyllm":
            kvprune.make_cache(big, "lazyllm", **LAZY)
        elif method == "spatten":
            kvprune.make_cache(big, "spatten")
        with pytest.raises(CacheUsageError, match="belongs to another model"):
            big(input_ids=ids[:, :1], **with_cache(cache), use_cache=True)


@pytest.mark.parametrize("method", ["lazyllm", "spatten"])
def test_stepwise_cache_with_a_model_never_prepared(method):
    prepared, plain = tiny_model(), tiny_model()
    cache = _cache(prepared, method)
    ids, _ = padded_batch([8])
    with pytest.raises(CacheUsageError, match="nothing was stored"), torch.no_grad():
        plain(input_ids=ids, **with_cache(cache), use_cache=True)
    assert cache.get_seq_length() == 0 and all(not layer.is_initialized for layer in cache.layers)


def test_pruning_cache_never_holds_more_than_its_budget_with_an_unprepared_model():
    prepared, plain = tiny_model(), tiny_model()
    cache = kvprune.make_cache(prepared, "h2o", 4)  # sized by the prepared model's config
    ids, _ = padded_batch([12])
    with pytest.raises(CacheUsageError, match="call kvprune.prepare_model"), torch.no_grad():
        plain(input_ids=ids, **with_cache(cache), use_cache=True)
    assert all(layer.physical_length == 0 for layer in cache.layers)


# -- beam indices -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("index", [[0, 2], [-1, 0], [0.0, 1.0]])
def test_reorder_cache_with_bad_indices(method, index):
    model = tiny_model()
    cache = _cache(model, method)
    ids, mask = padded_batch([6, 4])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **with_cache(cache), use_cache=True)
    kv = cache.stats().kv_bytes
    with pytest.raises(InvalidParameterError, match=r"row indices must be"):
        cache.reorder_cache(torch.tensor(index))
    assert cache.stats().kv_bytes == kv
    cache.reorder_cache(torch.tensor([1, 1]))  # valid indices still work


# -- stats: every byte the cache holds ------------------------------------------------------------------
def _reachable_storage_bytes(root) -> int:
    """Independent of kvprune's accounting: follow the garbage collector's referents from ``root`` (modules,
    classes, functions and models excluded) and sum each distinct tensor storage once."""
    seen, total, stack = set(), {}, [root]
    skip = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, torch.nn.Module)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            st = obj.untyped_storage()
            total[(str(obj.device), st.data_ptr())] = st.nbytes()
            stack.extend(gc.get_referents(obj))
            continue
        stack.extend(gc.get_referents(obj))
    return sum(total.values())


@pytest.mark.parametrize("method", ALL)
def test_stats_count_every_byte_the_cache_holds(method):
    model = tiny_model()
    if method == "spatten":
        cache = kvprune.make_cache(model, "spatten", head_ratio=0.25, head_start=0.0, quant_bits=(8, 4))
    else:
        cache = _cache(model, method)
    ids, mask = padded_batch([9, 5, 7])
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                       num_beams=2 if method != "random" else 1, **with_cache(cache))
    stats = cache.stats()
    assert stats.kv_bytes > 0
    assert stats.kv_bytes + stats.metadata_bytes == _reachable_storage_bytes(cache)


def test_every_method_is_covered_here():
    assert set(ALL) == set(POLICIES) | {"lazyllm", "spatten"}


def test_lazy_cache_type_is_public():
    assert kvprune.LazyCache is LazyCache


@pytest.mark.parametrize("method", ["lazyllm", "spatten", "h2o"])
def test_unknown_parameter_is_a_typed_error_before_the_model_changes(method):
    model = tiny_model()
    before = _state(model)
    with raises(InvalidParameterError, "has no parameter(s) ['windw']"):
        kvprune.make_cache(model, method, 0.5 if method != "lazyllm" else None, windw=3)
    assert _state(model) == before


def test_compare_checks_every_argument_before_the_baseline_runs(monkeypatch):
    compare_module = importlib.import_module("kvprune.eval.compare")

    def refuse(*args, **kwargs):
        raise AssertionError("a run started before the arguments were checked")

    monkeypatch.setattr(compare_module, "_qa_rows", refuse)
    examples = [{"context": "a b", "question": "c", "answer": "d"}]
    model = tiny_model()
    with raises(InvalidBudgetError, "a budget ratio must be a float in (0, 1)"):
        compare_module.compare(model, object(), task=examples, policies=["h2o"], budgets=[0.5, 1.5])
    with raises(InvalidParameterError, "has no parameter(s) ['alphaa']"):
        compare_module.compare(model, object(), task=examples, policies=["a2sf"], budgets=[0.5],
                               policy_params={"a2sf": {"alphaa": 0.1}})
    with raises(InvalidParameterError, "protocol must be one of"):
        compare_module.compare(model, object(), task=examples, policies=["h2o"], budgets=[0.5], protocol="both")


def test_padding_mask_edited_in_place_is_read_again():
    """The newest-token padding check is made once per mask object and version, so a mask a caller edits in
    place between forwards (the same tensor object) is read again, never answered from the previous forward."""
    from kvprune.integrations.attention import _newest_real

    mask = torch.ones(2, 5, dtype=torch.long)
    assert _newest_real(mask)
    mask[1, -1] = 0  # in place: same object, new version
    assert not _newest_real(mask)
    assert _newest_real(torch.ones(2, 6, dtype=torch.long))


def test_bmm_views_are_kept_only_on_views_so_plain_keys_free_at_once():
    """The decode row keeps its ``bmm``-shaped view on a cache layer's held-slot view, never on a tensor that owns
    its memory (a plain cache's concatenated keys): there the view would form a reference cycle and hold the old
    keys until the garbage collector runs (a plain ``DynamicCache`` step went 3.4 -> 5.5 ms on the demo)."""
    import weakref

    from kvprune.integrations.attention import _batched

    gc.disable()
    try:
        owner = torch.randn(1, 2, 8, 4)
        alive = weakref.ref(owner)
        _batched(owner, transpose=True)
        del owner
        assert alive() is None, "freed at once, with no cycle"
        buffer = torch.randn(1, 2, 16, 4)
        held = buffer[:, :, :8]
        first = _batched(held, transpose=True)
        assert _batched(held, transpose=True) is first  # kept on the view
        torch.testing.assert_close(first, held.flatten(0, 1).transpose(1, 2))
    finally:
        gc.enable()
