"""Preparing a model for kvprune: architecture checks, backend checks, switching its attention to kvprune.

Nothing on the model changes until every check has passed.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch

from ..caches import ATTN_PREFIX
from ..errors import InvalidParameterError, UnsupportedArchitectureError
from .attention import BACKENDS, register

#: model families whose attention calls ``past_key_values.update`` and transformers' attention interface
SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")


def check_architecture(config: Any) -> None:
    """Raise :class:`UnsupportedArchitectureError` unless kvprune can drive this model family."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"model type {model_type!r} is not supported by kvprune; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    layer_types = getattr(text, "layer_types", None) or []
    odd = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
    if odd:
        raise UnsupportedArchitectureError(f"layer types {odd} are not supported; kvprune handles full and sliding attention")


_ROLLBACK_MODES = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")


def _guard_generate(model: torch.nn.Module) -> None:
    """Refuse assisted / prompt-lookup ``generate`` with a kvprune cache before it runs (idempotent).

    Those modes roll the cache back after rejected drafts, which an evicting cache cannot do; since
    transformers 5.24 generate would otherwise stop with its own ValueError after the prefill.
    """
    if getattr(model, "_kvprune_generate_guard", False) or not hasattr(model, "generate"):
        return
    original = model.generate

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any) -> Any:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if getattr(cache, "refuses_rollback", False):  # every kvprune cache declares it
            configs = [kwargs, vars(kwargs.get("generation_config") or model.generation_config)]
            if any(c.get(name) is not None for c in configs for name in _ROLLBACK_MODES):
                cache.crop(0)  # raises the cache's UnsupportedGenerationModeError
        return original(*args, **kwargs)

    model.generate = generate
    model._kvprune_generate_guard = True


def check_backend(backend: str) -> None:
    """Refuse an attention backend kvprune cannot run here, naming what is missing."""
    if backend not in BACKENDS:
        raise InvalidParameterError(f"attention backend {backend!r} is not supported; valid: {', '.join(BACKENDS)}")
    if backend == "flash_attention_2":
        missing = [what for what, ok in (("the flash-attn package (pip install flash-attn)",
                                          importlib.util.find_spec("flash_attn") is not None),
                                         ("a CUDA GPU", torch.cuda.is_available())) if not ok]
        if missing:
            raise InvalidParameterError(
                f"backend 'flash_attention_2' needs {' and '.join(missing)}, which this machine lacks; "
                "use backend='sdpa' (the same scores, through PyTorch's fused kernel) or 'eager'"
            )


def prepare_model(model: torch.nn.Module, backend: str | None = None) -> torch.nn.Module:
    """Route ``model``'s attention through kvprune, keeping its backend (or switching to ``backend``)."""
    check_architecture(model.config)
    current = model.config._attn_implementation or "eager"
    base = backend or (current[len(ATTN_PREFIX) :] if current.startswith(ATTN_PREFIX) else current)
    check_backend(base)
    register()  # every check passed: only now does anything on the model change
    _guard_generate(model)
    if current != ATTN_PREFIX + base:
        model.set_attn_implementation(ATTN_PREFIX + base)
    return model
