"""Safe loader for llama2.c "legacy v0" checkpoints (e.g. stories260K.bin) into ``LlamaForCausalLM``.

Parses the raw little-endian binary with ``struct``/``numpy`` only (no pickle), validating the header
and the exact file size before allocating, so tests can run on a real pretrained tiny Llama offline.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

__all__ = ["STORIES260K_SHA256", "default_stories260k_path", "read_llama2c_config", "load_llama2c"]

STORIES260K_SHA256 = "9414d5a285453a7eab631713d171753232c978f6f97654211469aff8be93c8d6"

_HEADER = struct.Struct("<7i")  # dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
_MAX_DIM = 65536
_MAX_LAYERS = 4096
_MAX_VOCAB = 10_000_000
_MAX_SEQ = 1 << 24


def default_stories260k_path() -> Path:
    """``../shared/models/stories260K.bin`` relative to the repo root; overridable via ``KVPRUNE_STORIES260K``."""
    env = os.environ.get("KVPRUNE_STORIES260K")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "models" / "stories260K.bin"


def _read_header(path: str | os.PathLike) -> tuple[int, int, int, int, int, int, int, bool]:
    with open(path, "rb") as f:
        raw = f.read(_HEADER.size)
    if len(raw) != _HEADER.size:
        raise ValueError(f"{path}: file too small for a llama2.c header ({len(raw)} < {_HEADER.size} bytes)")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = _HEADER.unpack(raw)
    shared = vocab > 0
    vocab = abs(vocab)
    checks = [
        (0 < dim <= _MAX_DIM, f"dim={dim} must be in [1, {_MAX_DIM}]"),
        (0 < hidden <= _MAX_DIM, f"hidden_dim={hidden} must be in [1, {_MAX_DIM}]"),
        (0 < n_layers <= _MAX_LAYERS, f"n_layers={n_layers} must be in [1, {_MAX_LAYERS}]"),
        (0 < n_heads <= dim, f"n_heads={n_heads} must be in [1, dim={dim}]"),
        (0 < n_kv <= n_heads, f"n_kv_heads={n_kv} must be in [1, n_heads={n_heads}]"),
        (0 < vocab <= _MAX_VOCAB, f"|vocab_size|={vocab} must be in [1, {_MAX_VOCAB}]"),
        (0 < seq_len <= _MAX_SEQ, f"seq_len={seq_len} must be in [1, {_MAX_SEQ}]"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(f"{path}: invalid llama2.c header: {msg}")
    if dim % n_heads:
        raise ValueError(f"{path}: invalid llama2.c header: dim={dim} not divisible by n_heads={n_heads}")
    if n_heads % n_kv:
        raise ValueError(f"{path}: invalid llama2.c header: n_heads={n_heads} not divisible by n_kv_heads={n_kv}")
    if (dim // n_heads) % 2:
        raise ValueError(f"{path}: invalid llama2.c header: head_dim={dim // n_heads} must be even for RoPE")
    return dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len, shared


def _weight_shapes(dim: int, hidden: int, n_layers: int, n_heads: int, n_kv: int, vocab: int,
                   seq_len: int, shared: bool) -> list[tuple[str, tuple[int, ...]]]:
    """Arrays in file order (llama2.c legacy v0), each in ``nn.Linear.weight`` layout."""
    head_dim, L = dim // n_heads, n_layers
    kv_dim = n_kv * head_dim
    shapes = [
        ("tok_embeddings", (vocab, dim)), ("attention_norm", (L, dim)),
        ("wq", (L, dim, dim)), ("wk", (L, kv_dim, dim)), ("wv", (L, kv_dim, dim)), ("wo", (L, dim, dim)),
        ("ffn_norm", (L, dim)), ("w1", (L, hidden, dim)), ("w2", (L, dim, hidden)), ("w3", (L, hidden, dim)),
        ("norm", (dim,)), ("freq_cis_real", (seq_len, head_dim // 2)), ("freq_cis_imag", (seq_len, head_dim // 2)),
    ]
    if not shared:
        shapes.append(("wcls", (vocab, dim)))
    return shapes


def _config_from_header(dim: int, hidden: int, n_layers: int, n_heads: int, n_kv: int, vocab: int,
                        seq_len: int, shared: bool, attn_implementation: str = "eager") -> LlamaConfig:
    return LlamaConfig(
        hidden_size=dim, intermediate_size=hidden, num_hidden_layers=n_layers, num_attention_heads=n_heads,
        num_key_value_heads=n_kv, vocab_size=vocab, max_position_embeddings=seq_len, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=shared,
        bos_token_id=1, eos_token_id=2, pad_token_id=None, hidden_act="silu",
        attn_implementation=attn_implementation,
    )


def read_llama2c_config(path: str | os.PathLike) -> LlamaConfig:
    """Build a ``LlamaConfig`` from the checkpoint header only (weights are not read)."""
    return _config_from_header(*_read_header(path))


def _permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Interleaved-pair RoPE rows (llama2.c) -> rotate-half rows (transformers), per head."""
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def load_llama2c(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                 attn_implementation: str = "eager") -> LlamaForCausalLM:
    """Load a llama2.c legacy-v0 ``.bin`` into an eval-mode ``LlamaForCausalLM`` (strict state-dict load)."""
    header = _read_header(path)
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len, shared = header
    shapes = _weight_shapes(*header)
    n_floats = sum(int(np.prod(s)) for _, s in shapes)
    expected = _HEADER.size + 4 * n_floats
    actual = os.stat(path).st_size
    if actual != expected:
        raise ValueError(f"{path}: file size {actual} bytes does not match the expected size {expected} bytes "
                         f"for header {header[:7]} ({'truncated' if actual < expected else 'trailing data'})")
    arrays: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        f.seek(_HEADER.size)
        for name, shape in shapes:
            count = int(np.prod(shape))
            a = np.fromfile(f, dtype="<f4", count=count)
            if a.size != count:  # file changed under us
                raise ValueError(f"{path}: unexpected end of file while reading {name}")
            arrays[name] = a.reshape(shape)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    sd: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": t(arrays["tok_embeddings"]),
        "model.norm.weight": t(arrays["norm"]),
        "lm_head.weight": t(arrays["tok_embeddings"] if shared else arrays["wcls"]),
    }
    for i in range(n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = t(arrays["attention_norm"][i])
        sd[p + "post_attention_layernorm.weight"] = t(arrays["ffn_norm"][i])
        sd[p + "self_attn.q_proj.weight"] = t(_permute_rope(arrays["wq"][i], n_heads))
        sd[p + "self_attn.k_proj.weight"] = t(_permute_rope(arrays["wk"][i], n_kv))
        sd[p + "self_attn.v_proj.weight"] = t(arrays["wv"][i])
        sd[p + "self_attn.o_proj.weight"] = t(arrays["wo"][i])
        sd[p + "mlp.gate_proj.weight"] = t(arrays["w1"][i])
        sd[p + "mlp.down_proj.weight"] = t(arrays["w2"][i])
        sd[p + "mlp.up_proj.weight"] = t(arrays["w3"][i])

    config = _config_from_header(*header, attn_implementation=attn_implementation)
    model = LlamaForCausalLM(config)
    model.load_state_dict(sd, strict=True)
    if shared and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("expected lm_head to be tied to embed_tokens for a shared-classifier checkpoint")
    if model.config._attn_implementation != attn_implementation:
        raise RuntimeError(f"attn_implementation {attn_implementation!r} was not applied "
                           f"(got {model.config._attn_implementation!r})")
    return model.to(dtype=dtype).eval()
