"""Where kvprune meets models: the attention function, model preparation, weight loaders."""

from .attention import kvprune_attention, register
from .models import make_cache
from .prepare import SUPPORTED_MODEL_TYPES, check_architecture, prepare_model

__all__ = ["SUPPORTED_MODEL_TYPES", "check_architecture", "kvprune_attention", "make_cache", "prepare_model", "register"]
