#!/usr/bin/env python
"""Reproduce kvprune's demo model: a small Llama trained on the synthetic long-document QA tasks.

    pip install -e .[train]          # sentencepiece (only needed here, not to load the model)
    python scripts/train_demo.py     # tokenizer -> training (resumable) -> export + model card

Phases (run all by default; each can be run alone with --phase):

``tokenizer``  generate a corpus from :mod:`kvprune.eval.tasks` and train a SentencePiece BPE
               tokenizer on it; every word of the task language becomes one token. It is converted to
               a ``tokenizers`` fast tokenizer (``tokenizer.json``), so loading needs no sentencepiece.
``train``      train ``LlamaForCausalLM`` with a length curriculum 128 -> 2048, generating documents
               on the fly (deterministic per seed and step). Checkpoints (safetensors weights,
               optimizer state, ``state.json``) go to ``--work`` (default ``.demo-train/``) every few
               minutes; re-running the same command resumes from the last one.
``export``     ``save_pretrained`` model + tokenizer into ``--out`` (default ``kvprune/demo/model``),
               measure exact match with greedy decoding (full cache) on held-out documents of 512
               and 2048 tokens, and write the model card ``README.md``.

Uses 2 CPU threads (``--threads``). The loss is the language-model loss on every context token but
the random names, values and document numbers (the repeated filler phrases are the dense in-context
copying signal) and the answers of several questions per document, as one token-level mean.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

# the machine is often shared: passive OpenMP waiting keeps 2 threads from spinning against other jobs
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kvprune.eval.tasks import (  # noqa: E402
    ALL_WORDS,
    FILLER,
    NAMES,
    NUMBERS,
    TASKS,
    VALUES,
    build_suite,
    exact_match,
    format_prompt,
    generate_doc,
)

# (sequence length, batch size, steps). Every stage uses ~4096 tokens per step.
DEFAULT_STAGES = "64x64x400,128x32x250,256x16x250,512x8x700,1024x4x400,2048x2x700"
TASK_WEIGHTS = {"needle": 1.0, "multikey": 1.0, "multidoc": 1.5, "vartrack": 1.5}
EVAL_SEED = 1_000_003  # held-out documents (training documents use string seeds "train/<seed>/<step>/<row>")
PAD, BOS, EOS = 3, 1, 2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_stages(text: str) -> list[tuple[int, int, int]]:
    out = []
    for part in text.split(","):
        L, B, S = (int(x) for x in part.lower().split("x"))
        out.append((L, B, S))
    return out


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------
def train_tokenizer(tok_dir: Path, seed: int, vocab_size: int) -> None:
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    tok_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"tokenizer/{seed}")
    lines = []
    for i in range(400):
        task = TASKS[i % len(TASKS)]
        ex = build_suite(seed=seed + 7919 * (i + 1), n_per_task=1, lengths=(rng.choice([256, 512, 1024]),), tasks=(task,))[0]
        lines.append(f"{format_prompt(ex)} {ex['answer']}")
    for _ in range(20):  # make sure every word of the language is seen often enough to become one piece
        words = list(ALL_WORDS)
        rng.shuffle(words)
        lines.append(" ".join(words))
    corpus = tok_dir / "corpus.txt"
    corpus.write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tok_dir / "sp"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=PAD,
        max_sentence_length=1_000_000, num_threads=2, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", minloglevel=2, seed_sentencepiece_size=100_000,
    )
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "sp.model"))
    not_single = [w for w in ALL_WORDS if len(sp.encode(w)) != 1]
    if not_single:
        raise SystemExit(f"tokenizer splits {len(not_single)} task words (e.g. {not_single[:5]}); raise --vocab-size")
    # SentencePiece BPE -> tokenizers BPE: the vocabulary plus merges ranked by the merged piece's id
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece, pid in vocab.items():
        if sp.is_control(pid) or sp.is_unknown(pid) or sp.is_byte(pid):
            continue
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in vocab and b in vocab:
                merges.append((pid, vocab[a], vocab[b], a, b))
    merges.sort()
    tok = LlamaTokenizer(
        vocab=vocab, merges=[(a, b) for *_, a, b in merges], legacy=False, add_prefix_space=True,
        unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        add_bos_token=True, add_eos_token=False, model_max_length=2560,
    )
    # the fast tokenizer must reproduce SentencePiece exactly on the task language
    for line in lines[:40]:
        if tok(line).input_ids != [BOS] + sp.encode(line):
            raise SystemExit("converted tokenizer disagrees with SentencePiece")
    tok.save_pretrained(str(tok_dir / "hf"))
    log(f"tokenizer: {sp.get_piece_size()} pieces, {len(merges)} merges -> {tok_dir / 'hf'}")


def load_tokenizer(tok_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir / "hf"))


def word_ids(tok) -> dict[str, int]:
    out = {}
    for w in ALL_WORDS + ("question", "answer"):
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1, (w, ids)
        out[w] = ids[0]
    return out


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
_UNPREDICTABLE = set(NAMES) | set(NUMBERS) | set(VALUES)


def make_sequence(rng: random.Random, L: int, w2i: dict[str, int]) -> tuple[list[int], list[int], list[int]]:
    """One training row of exactly L tokens: ids, LM labels (-100 = no loss), answer labels."""
    tasks = list(TASK_WEIGHTS)
    task = rng.choices(tasks, weights=[TASK_WEIGHTS[t] for t in tasks])[0]
    nq = 1 if task == "needle" else rng.randint(1, 4)
    per_qa = 24 + 1 + 1  # longest question field (multidoc), answer, </s>
    while nq > 1 and L - 1 - nq * per_qa < L // 2:
        nq -= 1
    ctx = L - 1 - nq * per_qa
    try:
        doc = generate_doc(task, rng, ctx, n_questions=nq, max_hops=2)
    except ValueError:  # too short for this task (multidoc at 128 tokens)
        doc = generate_doc("multikey", rng, ctx, n_questions=nq, max_hops=2)
    ids = [BOS] + [w2i[w] for w in doc.words]
    # LM loss on every context word but the random names / values / numbers: the repeated phrase
    # occurrences carry the in-context copying signal, first occurrences teach the word distribution
    lm = [-100] + [w2i[w] if (m or w not in _UNPREDICTABLE) else -100 for w, m in zip(doc.words, doc.mask)]
    ans = [-100] * len(ids)
    for k, (seg, a) in enumerate(doc.qas):
        ids += [w2i[w] for w in seg]
        # no loss on the first "question" (where the document ends) nor on the first mention of the
        # asked name / document number (their repeat in the answer prefix is predictable)
        seen: set[str] = set()
        for j, w in enumerate(seg):
            lm.append(-100 if (j == 0 and k == 0) or (w in _UNPREDICTABLE and w not in seen) else w2i[w])
            seen.add(w)
        ans += [-100] * len(seg)
        a_ids = [w2i[w] for w in a] + [EOS]
        ids += a_ids
        lm += [-100] * len(a_ids)
        ans += a_ids
    assert len(ids) <= L, (len(ids), L)
    pad = L - len(ids)
    return ids + [PAD] * pad, lm + [-100] * pad, ans + [-100] * pad


# copy rows use every word kind: values never get an LM target in the documents (they are random), so a
# copying circuit learned on filler words alone does not transfer to them (answers stayed at chance)
_COPY_WORDS = list(FILLER) + list(NAMES) + list(VALUES)


def make_copy_sequence(rng: random.Random, L: int, w2i: dict[str, int]) -> tuple[list[int], list[int], list[int]]:
    """Warm-up row: a random run of words (filler, names, values), then the same run again (loss on the repeat).

    Dense, long copy targets make the in-context copying (induction) circuit form within ~150 steps;
    on the task documents alone (short repeated phrases) it had not formed after 1000 steps. With the
    answer prefix "the code of <name> is" a one-token match ("is") is ambiguous: the small-pool rows
    teach the model to match several previous tokens.
    """
    n = (L - 1) // 2
    # half the rows draw from a small pool of words, so one previous token is ambiguous and the copy
    # must match two or more previous tokens -- what "the code of <name> is" needs (every fact has "is")
    pool = _COPY_WORDS if rng.random() < 0.5 else rng.sample(_COPY_WORDS, rng.choice([8, 16, 32]))
    seq = [w2i[rng.choice(pool)] for _ in range(n)]
    body = seq + seq + seq[: L - 1 - 2 * n]
    ids = [BOS] + body
    lm = [-100] * (n + 1) + body[n:]
    return ids, lm, [-100] * L


def make_batch(seed: int, step: int, L: int, B: int, w2i: dict[str, int], copy_frac: float = 0.0):
    rows = []
    for r in range(B):
        rng = random.Random(f"train/{seed}/{step}/{r}")
        if copy_frac > 0 and rng.random() < copy_frac:
            rows.append(make_copy_sequence(rng, L, w2i))
        else:
            rows.append(make_sequence(rng, L, w2i))
    ids, lm, ans = (torch.tensor([r[i] for r in rows]) for i in range(3))
    return ids, lm, ans


def heldout(n_per_task: int, length: int) -> list[dict]:
    return build_suite(seed=EVAL_SEED, n_per_task=n_per_task, lengths=(length,))


@torch.no_grad()
def quick_eval(model, tok, examples: list[dict], batch: int = 8) -> dict[str, float]:
    """Exact match of the argmax next token after the prompt (one-token answers), per task."""
    model.eval()
    hits: dict[str, list[float]] = {}
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        enc = [tok(format_prompt(e)).input_ids for e in chunk]
        assert len({len(x) for x in enc}) == 1
        logits = model(input_ids=torch.tensor(enc), logits_to_keep=1).logits[:, -1]
        pred = logits.argmax(-1).tolist()
        for e, p in zip(chunk, pred):
            hits.setdefault(e["task"], []).append(float(tok.decode([p]).strip() == e["answer"]))
    model.train()
    out = {t: sum(v) / len(v) for t, v in hits.items()}
    out["all"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return out


@torch.no_grad()
def generate_eval(model, tok, examples: list[dict], max_new_tokens: int = 6) -> dict[str, float]:
    """Exact match of greedy ``generate`` (full cache, plain DynamicCache) per task, and overall."""
    from transformers import DynamicCache

    model.eval()
    hits: dict[str, list[float]] = {}
    for e in examples:
        enc = tok(format_prompt(e), return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             past_key_values=DynamicCache(config=model.config),
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        pred = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
        hits.setdefault(e["task"], []).append(exact_match(pred, e["answer"]))
    out = {t: sum(v) / len(v) for t, v in hits.items()}
    out["all"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return out


# ------------------------------------------------------------------------------------------------
# Model, checkpoints
# ------------------------------------------------------------------------------------------------
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
        copy_frac = 1.0 if step < args.copy_steps else args.copy_mix
        if step < args.copy_steps:
            L, B = 64, 64
        ids, lm, ans = make_batch(args.seed, step, L, B, w2i, copy_frac)
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
        loss_lm = (ce * is_lm).sum() / is_lm.sum().clamp(min=1)
        loss_ans = (ce * is_ans).sum() / is_ans.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        cur = (loss_lm.item(), loss_ans.item())
        ema = cur if ema is None else tuple(0.95 * e + 0.05 * c for e, c in zip(ema, cur))
        if step % args.log_every == 0:
            log(f"step {step}/{total} L={L} B={B} lr={lr_at(step, total, args):.2e} lm={ema[0]:.3f} ans={ema[1]:.3f} "
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


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------
CARD = """---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [kvprune, synthetic, long-context, llama]
---

# kvprune demo model

A {params:.2f}M-parameter Llama-architecture model (`LlamaForCausalLM`, {layers} layers, hidden {hidden},
{heads} query heads × 32, {kv} KV heads, RoPE θ = 50000, max positions 2560, tied embeddings) with a
{vocab}-piece SentencePiece BPE tokenizer (exported as a `tokenizers` fast tokenizer: loading needs neither
sentencepiece nor `trust_remote_code`). It was trained by the kvprune project, from scratch, only on the
synthetic long-document QA language of `kvprune.eval.tasks`, so that KV-cache policies can be compared on
a model that really answers long-document questions. It knows nothing else.

```python
from kvprune.demo import load_demo_model
from kvprune.eval.tasks import build_suite, format_prompt
model, tok = load_demo_model()
ex = build_suite(seed=1, n_per_task=1, lengths=(512,))[0]
ids = tok(format_prompt(ex), return_tensors="pt")
out = model.generate(**ids, max_new_tokens=4, do_sample=False)
print(tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True), "| expected:", ex["answer"])
```

## Data

Generated on the fly by `kvprune.eval.tasks.generate_doc` (deterministic per seed and step; no external
data). Four task kinds, sampled with weights {weights}: single needle, multi-key retrieval (up to one fact
per ~96 tokens, 4 relations), multi-document QA (sections `document <k> :` with the asked name also in
distractor documents), variable tracking (chains `var a = <value>`, `var b = a`, up to 2 hops, with distractor
chains). Filler is made of random 4–8-word phrases invented per document, each repeated 2–4 times. Each
training document is followed by 1–4 questions with a RULER-style answer prefix
(`question : what is the code of <name> ? answer : the code of <name> is <value> </s>`).

Loss: one token-level mean cross-entropy over every context token except the random names, values and
document numbers (repeated phrase occurrences are predictable only by looking back: the dense in-context
copying signal) and over the answers and their `</s>` (answer tokens weighted {answer_weight}×).

## Training

- Curriculum (length × batch × steps): {stages}; with probability {mix_short} a step uses an earlier stage's
  length (same tokens per step).
- Copy warm-up: the first {copy_steps} steps train on rows made of a random run of words (filler, names and
  values: values never get an LM target in documents, and a copy circuit learned on filler alone left the
  answers at chance) followed by the same run (the in-context copying circuit forms in ~150 steps this way, and had not formed after 1000
  steps of task documents alone); half of these rows draw the run from a small pool of 8–32 words, so that
  copying must match several previous tokens. Afterwards a fraction {copy_mix} of the rows are copy rows.
- {steps} steps, AdamW (β = 0.9, 0.95, weight decay {wd}), peak LR {lr}, {warmup} warm-up steps, cosine to 10 %,
  gradient clipping 1.0, seed {seed}.
- Final training loss (EMA): language-model {lm:.3f}, answers {ans:.3f}.
- Wall time: {minutes:.0f} minutes on 2 CPU cores (`torch.set_num_threads(2)`, shared machine), exported from
  the checkpoint of step {export_step}.
- Reproduce: `{command}` (resumable: re-run the same command after an interruption).

## Evaluation (full cache)

Exact match of greedy decoding (`generate`, plain `DynamicCache`, `max_new_tokens=6`) on held-out documents
(`build_suite(seed={eval_seed}, ...)`, never seen in training):

| length | examples | all | needle | multikey | multidoc | vartrack |
|---|---|---|---|---|---|---|
{rows}

## Limitations

The model only understands the synthetic task language; it was trained up to 2048 tokens and is not
expected to work beyond 2560 positions. It is a test fixture for KV-cache policies, not a language model.
"""


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
    cmd = "python scripts/train_demo.py" + ("" if args.stages == DEFAULT_STAGES else f' --stages "{args.stages}"')
    card = CARD.format(
        params=sum(p.numel() for p in model.parameters()) / 1e6, layers=args.layers, hidden=args.hidden,
        heads=args.hidden // 32, kv=args.kv_heads, vocab=len(tok), weights=TASK_WEIGHTS, answer_weight=args.answer_weight,
        stages=args.stages.replace(",", ", "), mix_short=args.mix_short, copy_steps=args.copy_steps, copy_mix=args.copy_mix, steps=final_state["step"], wd=args.weight_decay,
        lr=args.lr, warmup=args.warmup, seed=args.seed, lm=hist["lm"], ans=hist["ans"],
        minutes=final_state["elapsed_s"] / 60, export_step=state["step"], command=cmd, eval_seed=EVAL_SEED,
        rows="\n".join(rows),
    )
    (out / "README.md").write_text(card)
    size = sum(f.stat().st_size for f in out.iterdir())
    log(f"exported to {out} ({size / 1e6:.2f} MB)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=("all", "tokenizer", "train", "export"), default="all")
    p.add_argument("--work", default=str(ROOT / ".demo-train"), help="checkpoints and tokenizer (resumable)")
    p.add_argument("--out", default=str(ROOT / "kvprune" / "demo" / "model"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=1280)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--stages", default=DEFAULT_STAGES, help="LxBxSTEPS,... curriculum")
    p.add_argument("--mix-short", type=float, default=0.25)
    p.add_argument("--copy-steps", type=int, default=200, help="warm-up steps on pure copy rows (64 tokens)")
    p.add_argument("--copy-mix", type=float, default=0.2, help="fraction of copy rows after the warm-up")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--answer-weight", type=float, default=2.0, help="per-token weight of answer tokens")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-n", type=int, default=16, help="held-out examples per task for the quick evals")
    p.add_argument("--final-n", type=int, default=50, help="held-out examples per task at 512 (half at 2048)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop (with a checkpoint) after this long")
    p.add_argument("--export-from", choices=("ckpt", "best"), default="ckpt")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / ".gitignore").write_text("*\n")  # checkpoints never go into git
    if args.phase in ("all", "tokenizer") and not (work / "tokenizer" / "hf" / "tokenizer.json").exists():
        train_tokenizer(work / "tokenizer", args.seed, args.vocab_size)
    if args.phase in ("all", "train"):
        train(args)
    if args.phase in ("all", "export"):
        export(args)


if __name__ == "__main__":
    main()
