"""Where kvprune meets models: the attention function, model preparation, weight loaders."""

from .attention import kvprune_attention, register
from .models import SUPPORTED_MODEL_TYPES, check_architecture, make_cache, prepare_model

__all__ = ["SUPPORTED_MODEL_TYPES", "check_architecture", "kvprune_attention", "make_cache", "prepare_model", "register"]
