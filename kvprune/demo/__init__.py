"""kvprune's demo model: a small Llama trained by the project on the synthetic long-document QA tasks.

The model folder (``DEMO_MODEL_PATH``) is plain data in Hugging Face format (``config.json``,
``model.safetensors``, ``tokenizer.json``, model card ``README.md``); ``scripts/train_demo.py``
reproduces it. Its prompts are built with ``kvprune.eval.tasks.format_prompt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["DEMO_MODEL_PATH", "demo_model_available", "load_demo_model"]

#: folder of the demo model, loadable by ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``
DEMO_MODEL_PATH: Path = Path(__file__).resolve().parent / "model"


def demo_model_available() -> bool:
    """True when the model folder holds weights, config and tokenizer."""
    return all((DEMO_MODEL_PATH / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def load_demo_model(attn_implementation: str = "sdpa", dtype: Any = None, device: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` loaded offline from :data:`DEMO_MODEL_PATH`, model in eval mode.

    ``attn_implementation`` is passed to ``from_pretrained`` (``"eager"``, ``"sdpa"``,
    ``"flash_attention_2"``); ``dtype`` defaults to float32, ``device`` to CPU.
    """
    if not demo_model_available():
        raise FileNotFoundError(
            f"the demo model is not in {DEMO_MODEL_PATH}; it ships with the kvprune source tree and is rebuilt by "
            "`python scripts/train_demo.py`"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL_PATH), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(DEMO_MODEL_PATH),
        local_files_only=True,
        attn_implementation=attn_implementation,
        dtype=dtype if dtype is not None else torch.float32,
    )
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer
