"""Tests for the llama2.c legacy-v0 loader (kvprune.models.llama2c)."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from kvprune.models.llama2c import (
    STORIES260K_SHA256,
    default_stories260k_path,
    load_llama2c,
    read_llama2c_config,
)

FIXTURE = default_stories260k_path()
needs_fixture = pytest.mark.skipif(
    not FIXTURE.is_file(),
    reason=f"llama2.c fixture not found at {FIXTURE} (set KVPRUNE_STORIES260K or provide ../shared/models/)",
)

# Reference llama2.c greedy decode from BOS (see ../shared/models/README.md).
CHECK_TOKENS = [int(x) for x in """
461 461 401 401 401 461 378 455 473 456 435 299 362 409 283 264 283 452 288 13
431 431 431 431 431 431 431 431 431 431 431 431 431 293 430 417 363 416 315 342
418 424 400 442 402 303 266 299 374 466 396 303 271 362 390 469 306 469 423 314
""".split()]


def _write_synthetic(path: Path, header: tuple[int, ...], n_floats: int, seed: int = 0) -> np.ndarray:
    data = np.random.default_rng(seed).standard_normal(n_floats).astype("<f4")
    path.write_bytes(struct.pack("<7i", *header) + data.tobytes())
    return data


@needs_fixture
def test_fixture_sha256() -> None:
    assert hashlib.sha256(FIXTURE.read_bytes()).hexdigest() == STORIES260K_SHA256


@needs_fixture
def test_read_config() -> None:
    cfg = read_llama2c_config(FIXTURE)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 172, 5)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (8, 4, 512)
    assert cfg.max_position_embeddings == 512 and cfg.tie_word_embeddings
    assert cfg.rope_parameters["rope_theta"] == 10000.0


@needs_fixture
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_greedy_matches_reference(attn_implementation: str) -> None:
    model = load_llama2c(FIXTURE, attn_implementation=attn_implementation)
    assert model.config._attn_implementation == attn_implementation
    assert not model.training
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        out = model.generate(torch.tensor([[1]]), max_new_tokens=60, do_sample=False, pad_token_id=2)
    assert out[0, 0].item() == 1
    assert out[0, 1:].tolist() == CHECK_TOKENS


@needs_fixture
def test_truncated_file_raises(tmp_path: Path) -> None:
    bad = tmp_path / "truncated.bin"
    bad.write_bytes(FIXTURE.read_bytes()[:-100])
    with pytest.raises(ValueError, match="size"):
        load_llama2c(bad)
    bad.write_bytes(FIXTURE.read_bytes() + b"\0\0\0\0")
    with pytest.raises(ValueError, match="size"):
        load_llama2c(bad)


@pytest.mark.parametrize(
    ("header", "match"),
    [
        ((64, 172, 5, 7, 7, 512, 512), "divisible by n_heads"),
        ((64, 172, 5, 8, 3, 512, 512), "divisible by n_kv_heads"),
        ((0, 172, 5, 8, 4, 512, 512), "dim"),
        ((64, 172, -5, 8, 4, 512, 512), "n_layers"),
        ((1 << 20, 172, 5, 8, 4, 512, 512), "dim"),
    ],
)
def test_bad_header_raises(tmp_path: Path, header: tuple[int, ...], match: str) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(struct.pack("<7i", *header) + b"\0" * 64)
    with pytest.raises(ValueError, match=match):
        read_llama2c_config(bad)
    with pytest.raises(ValueError, match=match):
        load_llama2c(bad)


def test_short_header_raises(tmp_path: Path) -> None:
    bad = tmp_path / "short.bin"
    bad.write_bytes(b"\1\0\0\0" * 3)
    with pytest.raises(ValueError, match="header"):
        load_llama2c(bad)


def test_unshared_classifier(tmp_path: Path) -> None:
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = 8, 16, 1, 2, 1, 10, 4
    head_dim, kv_dim = dim // n_heads, n_kv * dim // n_heads
    n_floats = (vocab * dim + n_layers * (2 * dim + 2 * dim * dim + 2 * kv_dim * dim + 3 * hidden * dim)
                + dim + seq_len * head_dim + vocab * dim)
    path = tmp_path / "unshared.bin"
    data = _write_synthetic(path, (dim, hidden, n_layers, n_heads, n_kv, -vocab, seq_len), n_floats)
    assert not read_llama2c_config(path).tie_word_embeddings
    model = load_llama2c(path, dtype=torch.float64)
    assert model.lm_head.weight.dtype == torch.float64
    wcls = torch.from_numpy(data[-vocab * dim:].reshape(vocab, dim).astype(np.float64))
    emb = torch.from_numpy(data[: vocab * dim].reshape(vocab, dim).astype(np.float64))
    torch.testing.assert_close(model.lm_head.weight.detach(), wcls)
    torch.testing.assert_close(model.model.embed_tokens.weight.detach(), emb)
    # The same file read as a shared-classifier checkpoint has vocab*dim trailing floats -> size error.
    raw = bytearray(path.read_bytes())
    raw[20:24] = struct.pack("<i", vocab)
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="size"):
        load_llama2c(path)
