"""The demo model's configuration, checkpoints, and growing it from an exported (shallower) model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .common import BOS, EOS, PAD, log


def make_config(args, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32, num_key_value_heads=args.kv_heads,
        head_dim=32, max_position_embeddings=2560, rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        rms_norm_eps=1e-5, initializer_range=0.02, tie_word_embeddings=True,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, attn_implementation="sdpa",
    )


def save_ckpt(path: Path, model, opt, state: dict) -> None:
    from safetensors.torch import save_model

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def grow_from(model, src: Path) -> None:
    """Start from an exported model; layers beyond its depth are appended as identities.

    A new layer's attention output and MLP down projections are zero, so each starts as the identity
    on the residual stream and the grown model computes exactly what the source model did.
    """
    from safetensors.torch import load_file

    weights = load_file(str(src / "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if unexpected or any(".layers." not in k for k in missing):
        raise SystemExit(f"{src} does not fit this model: unexpected {unexpected[:3]}, missing {missing[:3]}")
    new = sorted({int(k.split(".layers.")[1].split(".")[0]) for k in missing})
    with torch.no_grad():
        for i in new:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    log(f"initialised from {src}" + (f"; layers {new} appended as identities" if new else ""))
