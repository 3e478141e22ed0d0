"""The length curriculum, the learning-rate schedule and the resumable training loop."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import PAD, log
from .data import make_batch
from .evaluation import heldout, quick_eval
from .model import grow_from, make_config, save_ckpt
from .supervision import AttentionSupervision, parse_offsets
from .tokenizer import load_tokenizer, word_ids


def parse_stages(text: str) -> list[tuple[int, int, int]]:
    out = []
    for part in text.split(","):
        L, B, S = (int(x) for x in part.lower().split("x"))
        out.append((L, B, S))
    return out


def lr_at(step: int, total: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    p = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def train(args) -> None:
    from safetensors.torch import load_model
    from transformers import LlamaForCausalLM

    work = Path(args.work)
    tok = load_tokenizer(work / "tokenizer")
    w2i = word_ids(tok)
    stages = parse_stages(args.stages)
    total = sum(s for *_, s in stages)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(make_config(args, len(tok)))
    if args.init_from and not (work / "ckpt" / "state.json").exists():
        grow_from(model, Path(args.init_from))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    ckpt = work / "ckpt"
    state = {"step": 0, "elapsed_s": 0.0, "history": [], "best": None, "seed": args.seed, "stages": args.stages,
             "args": {k: v for k, v in vars(args).items() if k not in ("phase",)}}
    if (ckpt / "state.json").exists():
        load_model(model, str(ckpt / "model.safetensors"))
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        state = json.loads((ckpt / "state.json").read_text())
        log(f"resumed at step {state['step']} ({state['elapsed_s'] / 60:.1f} min trained)")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters; {total} steps in stages {stages}")
    eval512, eval2048 = heldout(args.eval_n, 512), heldout(max(2, args.eval_n // 2), 2048)
    sup = AttentionSupervision(model, parse_offsets(args.offset_heads)) if args.attn_weight > 0 else None
    model.train()
    t0 = time.time() - state["elapsed_s"]
    session_start = time.time()
    last_ckpt = time.time()
    ema = None
    bounds = []
    acc = 0
    for L, B, S in stages:
        bounds.append((acc, acc + S, L, B))
        acc += S
    step = state["step"]
    while step < total:
        si = next(i for i, (a, b, _, _) in enumerate(bounds) if a <= step < b)
        _, _, L, B = bounds[si]
        mix = random.Random(f"mix/{args.seed}/{step}")
        if si > 0 and mix.random() < args.mix_short:  # keep earlier lengths in the mix
            _, _, L, B = bounds[mix.randrange(si)]
        mixes = (1.0, 0.0, 0.0) if step < args.copy_steps else (args.copy_mix, args.phrase_mix, args.fact_mix)
        if step < args.copy_steps:
            L, B = 64, 64
        ids, lm, ans, lookups, numbers = make_batch(args.seed, step, L, B, w2i, *mixes, max_layer=args.lookup_layers)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, args)
        logits = model(input_ids=ids, attention_mask=(ids != PAD).long()).logits[:, :-1].float()
        lm_t, ans_t = lm[:, 1:], ans[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.where(ans_t >= 0, ans_t, lm_t).reshape(-1),
                             ignore_index=-100, reduction="none").view(lm_t.shape)
        is_lm, is_ans = (lm_t >= 0).float(), (ans_t >= 0).float()
        # one token-level mean: answers are ordinary tokens with weight --answer-weight. (A separate
        # mean over the few answer tokens swamps the LM gradient and the copying circuit never forms.)
        weights = is_lm + args.answer_weight * is_ans
        loss = (ce * weights).sum() / weights.sum()
        aux = sup.loss(ids != PAD, numbers, lookups) if sup is not None else torch.zeros(())
        loss = loss + args.attn_weight * aux
        loss_lm = (ce * is_lm).sum() / is_lm.sum().clamp(min=1)
        loss_ans = (ce * is_ans).sum() / is_ans.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        cur = (loss_lm.item(), loss_ans.item(), aux.item())
        ema = cur if ema is None else tuple(0.95 * e + 0.05 * c for e, c in zip(ema, cur))
        if step % args.log_every == 0:
            log(f"step {step}/{total} L={L} B={B} lr={lr_at(step, total, args):.2e} lm={ema[0]:.3f} ans={ema[1]:.3f} aux={ema[2]:.3f} "
                f"t={(time.time() - t0) / 60:.1f}min")
        is_end = step == total or any(step == b for _, b, _, _ in bounds)
        if step % args.eval_every == 0 or is_end:
            rec = {"step": step, "minutes": round((time.time() - t0) / 60, 2), "lm": round(ema[0], 4),
                   "ans": round(ema[1], 4), "em512": quick_eval(model, tok, eval512)}
            if L >= 1024 or bounds[si][2] >= 1024:
                rec["em2048"] = quick_eval(model, tok, eval2048, batch=4)
            state["history"].append(rec)
            log("eval " + json.dumps({k: v for k, v in rec.items() if k.startswith("em")}))
            score = rec["em512"]["all"] + rec.get("em2048", {"all": 0.0})["all"]
            if state["best"] is None or score >= state["best"]["score"]:
                state["best"] = {"step": step, "score": score}
                state["step"], state["elapsed_s"] = step, time.time() - t0
                save_ckpt(work / "best", model, opt, state)
        if is_end or time.time() - last_ckpt > args.ckpt_minutes * 60:
            state["step"], state["elapsed_s"] = step, time.time() - t0
            save_ckpt(ckpt, model, opt, state)
            last_ckpt = time.time()
        if args.max_minutes and time.time() - session_start > args.max_minutes * 60:
            state["step"], state["elapsed_s"] = step, time.time() - t0
            save_ckpt(ckpt, model, opt, state)
            log(f"stopping after --max-minutes {args.max_minutes}; re-run to resume")
            return
    log(f"training done: {step} steps in {(time.time() - t0) / 60:.1f} min")
