"""Export: ``save_pretrained`` the model and tokenizer, measure exact match, write the model card."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from kvprune.eval.tasks import TASKS

from .card import CARD
from .common import BOS, EOS, EVAL_SEED, PAD, TASK_WEIGHTS, log
from .evaluation import generate_eval, heldout
from .model import make_config
from .tokenizer import load_tokenizer


def export(args) -> None:
    from safetensors.torch import load_model
    from transformers import LlamaForCausalLM

    work, out = Path(args.work), Path(args.out)
    tok = load_tokenizer(work / "tokenizer")
    src = work / args.export_from
    state = json.loads((src / "state.json").read_text())
    final_state = json.loads((work / "ckpt" / "state.json").read_text())
    model = LlamaForCausalLM(make_config(args, len(tok)))
    load_model(model, str(src / "model.safetensors"))
    model.eval()
    init_layers = None
    if args.init_from:
        init_layers = json.loads((Path(args.init_from) / "config.json").read_text())["num_hidden_layers"]
    model.generation_config.bos_token_id = BOS
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 6
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    for extra in ("tokenizer.model",):  # the fast tokenizer is all that is needed
        (out / extra).unlink(missing_ok=True)
    torch.manual_seed(0)
    results = {}
    for L, n in ((512, args.final_n), (2048, max(1, args.final_n // 2))):
        t = time.time()
        results[L] = generate_eval(model, tok, heldout(n, L))
        log(f"exact match at {L} ({n}/task, {time.time() - t:.0f}s): {json.dumps(results[L])}")
    (out / "eval_results.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
    rows = []
    for L, n in ((512, args.final_n), (2048, max(1, args.final_n // 2))):
        r = results[L]
        rows.append(f"| {L} | {4 * n} | {r['all']:.3f} | " + " | ".join(f"{r[t]:.3f}" for t in TASKS) + " |")
    hist = final_state["history"][-1] if final_state["history"] else {"lm": float("nan"), "ans": float("nan")}
    cmd = training_command(args)
    card = CARD.format(
        params=sum(p.numel() for p in model.parameters()) / 1e6, layers=args.layers, hidden=args.hidden,
        heads=args.hidden // 32, kv=args.kv_heads, vocab=len(tok), weights=TASK_WEIGHTS, answer_weight=args.answer_weight, attn_weight=args.attn_weight,
        stages=args.stages.replace(",", ", "), mix_short=args.mix_short, copy_steps=args.copy_steps, copy_mix=args.copy_mix, phrase_mix=args.phrase_mix, fact_mix=args.fact_mix, steps=final_state["step"], wd=args.weight_decay,
        lr=args.lr, warmup=args.warmup, seed=args.seed, lm=hist["lm"], ans=hist["ans"],
        minutes=final_state["elapsed_s"] / 60, export_step=state["step"], command=cmd, eval_seed=EVAL_SEED,
        rows="\n".join(rows), note=f"- Note: {args.card_note}\n" if args.card_note else "",
        hops=("" if args.lookup_layers <= 1 else
              f", and head 0 of layers 2-{args.lookup_layers} the next hops of a variable chain (`var b = a` -> where `a` is assigned)"),
        init=(f"- Initialised from `{args.init_from}` ({init_layers}-layer model); the layers beyond its depth were "
              "appended with zero attention-output and MLP-down projections, so the run started from exactly the "
              "source model's function.\n- " if args.init_from else "- "),
        warmup_text=("" if not args.copy_steps else
                     f"Copy warm-up: the first {args.copy_steps} steps train on rows made of a random run of words (filler, names "
                     "and values: values never get an LM target in documents, and a copy circuit learned on filler alone left "
                     "the answers at chance) followed by the same run; the loss on the repeat falls to ~0 within ~150 steps "
                     "(on task documents alone, copying had not appeared after 1000 steps). Afterwards: "),
        status=("meets the targets." if results[512]["all"] >= 0.98 and results[2048]["all"] >= 0.95 else
                f"below target (exact match {results[512]['all']:.2f} at 512 and {results[2048]['all']:.2f} at 2048 tokens)."),
    )
    (out / "README.md").write_text(card)
    size = sum(f.stat().st_size for f in out.iterdir())
    log(f"exported to {out} ({size / 1e6:.2f} MB)")


_NOT_TRAINING = ("phase", "out", "card_note", "export_from", "threads", "final_n", "defaults")


def training_command(args) -> str:
    """The command line that trains this model: the script with every training option that is not the default."""
    import shlex

    opts = [f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in vars(args).items()
            if k not in _NOT_TRAINING and v != args.defaults.get(k)]
    return " ".join(["python scripts/train_demo.py", *opts])
