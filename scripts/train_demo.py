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
copying signal) and the answers of several questions per document, as one token-level mean, plus
an attention-supervision loss (see :class:`AttentionSupervision`): layer 0 gets a previous-token head,
a two-back head and a latest-document-number head, and head 0 of layer 1 is told where the query
``... of <name> is`` (or ``<name> =``) should look (the value of that fact in the right document; the
variable-tracking answers trace a chain one hop per generated token, so one lookup layer serves them).
Without it name-keyed lookup never formed in 2700 steps (multi-fact tasks stayed at chance); the
exported model is a plain ``LlamaForCausalLM`` either way.

``--init-from DIR`` starts from an exported model instead of random weights (its tokenizer too); with
``--layers`` above its depth the extra layers are appended as identities (zero output projections),
which is how the published 6-layer model was grown from the 4-layer one (see its model card).
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

import torch
import torch.nn.functional as F

from kvprune.eval.tasks import (
    ALL_WORDS,
    FILLER,
    NAMES,
    NUMBERS,
    RELATIONS,
    TASKS,
    VALUES,
    build_suite,
    exact_match,
    format_prompt,
    generate_doc,
)
from kvprune.integrations.compat import with_cache

# (sequence length, batch size, steps). Every stage uses ~4096 tokens per step.
DEFAULT_STAGES = "64x64x150,128x32x300,256x16x400,512x8x650,1024x4x300,2048x2x350"
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
    nq = 1 if task == "needle" else rng.randint(1, 6)
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


def make_phrase_sequence(rng: random.Random, L: int, w2i: dict[str, int]) -> tuple[list[int], list[int], list[int]]:
    """Row of short phrases over a small pool of words, each phrase repeated at random places.

    Unlike the copy rows (where the repeat sits at a fixed offset, which a position trick solves),
    continuing a repeated phrase here needs content matching on two or more previous tokens, since
    every word occurs in several phrases: the skill behind "the code of <name> is" -> value.
    """
    pool = rng.sample(_COPY_WORDS, rng.choice([6, 10, 16, 24]))
    n_phrases = max(2, (L - 1) // 15)
    phrases = [[w2i[rng.choice(pool)] for _ in range(rng.randint(3, 7))] + [w2i["."]] for _ in range(n_phrases)]
    ids, lm, seen = [BOS], [-100], set()
    while len(ids) < L:
        i = rng.randrange(n_phrases)
        for j, t in enumerate(phrases[i]):
            ids.append(t)
            lm.append(t if (i in seen and j > 0) else -100)
        seen.add(i)
    return ids[:L], lm[:L], [-100] * L


def make_fact_sequence(rng: random.Random, L: int, w2i: dict[str, int]) -> tuple[list[int], list[int], list[int]]:
    """Row of facts, then the same facts restated in another order, with the loss on the restated values.

    Every restated value is predictable only by matching the name (and, in the multi-document variant,
    the document number) -- the retrieval behind the questions, with one target per fact instead of
    one per question. Half of the rows are multi-document: names recur across documents.
    """
    words: list[str] = []
    flags: list[bool] = []

    def add(ws: list[str], fl: list[bool]) -> None:
        words.extend(ws)
        flags.extend(fl)

    kind = rng.random()
    if kind < 1 / 3:
        n = max(2, (L - 1) // 14)
        facts = [(rng.choice(RELATIONS), nm, rng.choice(VALUES)) for nm in rng.sample(NAMES, n)]
        for rel, nm, v in facts:
            add(["the", rel, "of", nm, "is", v, "."], [False, False, True, False, True, False, True])
        for rel, nm, v in rng.sample(facts, n):
            add(["the", rel, "of", nm, "is", v, "."], [False, False, True, False, True, True, True])
    elif kind < 2 / 3:
        # variable chains (var a = <value> . var b = a . ...), 1-3 variables each, interleaved in order,
        # then every variable's value restated as the vartrack answer would be
        n_chains = max(1, (L - 1) // 45)
        names = rng.sample(NAMES, min(len(NAMES), 3 * n_chains))
        chains, assigns = [], []
        for c in range(n_chains):
            vars_ = names[3 * c: 3 * c + rng.randint(1, 3)]
            value = rng.choice(VALUES)
            chains.append((vars_, value))
            ds = sorted(rng.random() for _ in vars_)
            for d, lhs, r in zip(ds, vars_, [value] + vars_[:-1]):
                assigns.append((d, lhs, r))
        assigns.sort()
        for _, lhs, r in assigns:
            add(["var", lhs, "=", r, "."], [False, False, True, False, True])
        # restated hop by hop, as the vartrack answers are: "<c> = <b> = <a> = <value> ."
        restate = [(vars_[: i + 1], value) for vars_, value in chains for i in range(len(vars_))]
        for head, value in rng.sample(restate, len(restate)):
            hops = [*head[::-1], value]
            ws = " = ".join(hops).split() + ["."]
            add(ws, [False] + [True] * (len(ws) - 1))
    else:
        n_docs = max(2, min(len(NUMBERS), (L - 1) // 40))
        numbers = rng.sample(NUMBERS, n_docs)
        names = rng.sample(NAMES, max(2, n_docs // 2))
        facts = []
        for k in numbers:
            add(["document", k, ":"], [False, False, True])
            for nm in rng.sample(names, 2):
                v = rng.choice(VALUES)
                facts.append((k, nm, v))
                add(["the", "code", "of", nm, "is", v, "."], [False, True, True, False, True, False, True])
        for k, nm, v in rng.sample(facts, len(facts)):
            add(["in", "document", k, ",", "the", "code", "of", nm, "is", v, "."],
                [False, True, False, True, True, True, True, False, True, True, True])
    words, flags = words[: L - 1], flags[: L - 1]
    ids = [BOS] + [w2i[w] for w in words]
    lm = [-100] + [w2i[w] if f else -100 for w, f in zip(words, flags)]
    pad = L - len(ids)
    return ids + [PAD] * pad, lm + [-100] * pad, [-100] * L


def make_batch(seed: int, step: int, L: int, B: int, w2i: dict[str, int], copy_frac: float = 0.0,
               phrase_frac: float = 0.0, fact_frac: float = 0.0, max_layer: int = 1):
    rows = []
    for r in range(B):
        rng = random.Random(f"train/{seed}/{step}/{r}")
        u = rng.random()
        if u < copy_frac:
            rows.append(make_copy_sequence(rng, L, w2i))
        elif u < copy_frac + phrase_frac:
            rows.append(make_phrase_sequence(rng, L, w2i))
        elif u < copy_frac + phrase_frac + fact_frac:
            rows.append(make_fact_sequence(rng, L, w2i))
        else:
            rows.append(make_sequence(rng, L, w2i))
    ids, lm, ans = (torch.tensor([r[i] for r in rows]) for i in range(3))
    i2w = {v: k for k, v in w2i.items()}
    lookups, numbers = [], []
    for b, r in enumerate(rows):
        words = ["<s>"] + [i2w.get(t, "<pad>") for t in r[0][1:]]
        found, number = lookup_targets(words, max_layer)
        lookups += [(b, *x) for x in found]
        numbers.append(number)
    return ids, lm, ans, lookups, torch.tensor(numbers)


def heldout(n_per_task: int, length: int) -> list[dict]:
    return build_suite(seed=EVAL_SEED, n_per_task=n_per_task, lengths=(length,))


@torch.no_grad()
def quick_eval(model, tok, examples: list[dict], batch: int = 8) -> dict[str, float]:
    """Exact match of greedy decoding, per task, computed teacher-forced in one forward per batch.

    Greedy decoding produces the answer and ``</s>`` exactly when each of those tokens is the argmax
    after the prompt and the answer's preceding tokens, so one forward over ``prompt answer </s>``
    (right-padded) decides it.
    """
    model.eval()
    hits: dict[str, list[float]] = {}
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        prompts = [tok(format_prompt(e)).input_ids for e in chunk]
        answers = [tok(e["answer"], add_special_tokens=False).input_ids + [EOS] for e in chunk]
        rows = [p + a for p, a in zip(prompts, answers)]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
        pred = model(input_ids=ids, attention_mask=(ids != PAD).long()).logits.argmax(-1)
        for b, (e, p, a) in enumerate(zip(chunk, prompts, answers)):
            got = pred[b, len(p) - 1: len(p) - 1 + len(a)].tolist()
            hits.setdefault(e["task"], []).append(float(got == a))
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
                             **with_cache(DynamicCache(config=model.config)),
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


def parse_offsets(text: str) -> dict[int, int]:
    return {int(h): int(o) for h, o in (part.split(":") for part in text.split(",") if part)}


_IS = ("is", "=")


def lookup_targets(words: list[str], max_layer: int = 1) -> tuple[list[tuple[int, int, int]], list[int]]:
    """Attention targets of one row (``words[0]`` is BOS): retrieval hops and the latest document number.

    Retrieval: wherever ``<key> is`` (or ``<key> =``) repeats a key that occurs earlier as ``<key> is
    <value>`` / ``<key> = <x>`` (for document rows: in the same document, i.e. with the same latest
    number), the ``is`` position should attend to that ``<value>`` -- layer 1; if the retrieved word is
    itself a variable (``var b = a``), layer 2 should attend to where ``a`` is assigned, and so on
    (layers 1 to ``max_layer``). Since the vartrack answers trace the chain hop by hop, one lookup
    per generated token, the default supervises layer 1 only. Returns ``(layer, query position, key position)`` triples and, per
    position, the position of the latest number token at or before it (-1 if none).
    """
    number = [-1] * len(words)
    last = -1
    for t, w in enumerate(words):
        if w in _NUMBER_SET:
            last = t
        number[t] = last
    def section(i: int) -> str | None:
        return words[number[i]] if number[i] >= 0 else None

    defs: dict[str, list[int]] = {}  # key -> positions of the word following "<key> is" / "<key> ="
    out = []
    for t in range(2, len(words)):
        if words[t] in _IS:
            key = words[t - 1]
            cands = [i for i in defs.get(key, ()) if section(i) == section(t)]
            if len(cands) == 1:
                i, layer = cands[0], 1
                while True:
                    out.append((layer, t, i))
                    nxt = words[i]
                    if layer >= max_layer or nxt not in _NAME_SET:
                        break
                    hop = [j for j in defs.get(nxt, ()) if words[j - 1] == "=" and j < i]
                    if len(hop) != 1:
                        break
                    i, layer = hop[0], layer + 1
        if t >= 2 and words[t - 1] in _IS and words[t - 2] in _NAME_SET:
            defs.setdefault(words[t - 2], []).append(t)
    return out, number


_NAME_SET, _NUMBER_SET = set(NAMES), set(NUMBERS)


class AttentionSupervision:
    """Auxiliary losses on a few attention patterns: -log of the attention weight on the target position.

    * layer 0, head 0 attends 1 token back and head 2 attends 2 tokens back (``--offset-heads``): the
      name two tokens before a value becomes part of the value's key;
    * layer 0, head 1 attends the latest document number (the section a fact is in, and the number the
      question names);
    * head 0 of layers 1-3 attends the value (or the next variable of a chain) that the query
      ``... of <name> is`` retrieves (see :func:`lookup_targets`).

    Gradient descent on the language-model loss alone stayed for thousands of steps on a plateau where
    the model copies *a* value after "is" (exact match at chance on multi-fact tasks); supervising where
    the heads look lets name-keyed retrieval form in a few hundred steps. Only the attention pattern
    is supervised (what the heads copy is learned from the LM loss), and the exported model is a plain
    Llama: these losses only shape training.
    """

    def __init__(self, model, offsets: dict[int, int], number_head: int = 1, lookup_head: int = 0):
        self.layers = [layer.self_attn for layer in model.model.layers]
        self.offsets, self.number_head, self.lookup_head = offsets, number_head, lookup_head
        self.inputs: dict[int, tuple] = {}
        for idx, attn in enumerate(self.layers):
            attn.register_forward_pre_hook(self._hook(idx), with_kwargs=True)

    def _hook(self, idx: int):
        def hook(module, args, kwargs):
            hs = args[0] if args else kwargs["hidden_states"]
            pe = args[1] if len(args) > 1 else kwargs["position_embeddings"]
            self.inputs[idx] = (hs, pe)
        return hook

    def _qk(self, idx: int):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        hs, (cos, sin) = self.inputs[idx]
        B, T, _ = hs.shape
        a = self.layers[idx]
        q = a.q_proj(hs).view(B, T, -1, a.head_dim).transpose(1, 2)
        k = a.k_proj(hs).view(B, T, -1, a.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q.float(), k.float(), q.shape[1] // k.shape[1], a.scaling

    def loss(self, valid: torch.Tensor, number: torch.Tensor, lookups: list[tuple[int, int, int, int]]) -> torch.Tensor:
        q, k, rep, scale = self._qk(0)
        T = q.shape[2]
        future = torch.ones(T, T, dtype=torch.bool).triu(1)
        terms = []

        def full(h: int) -> torch.Tensor:
            s = (q[:, h] @ k[:, h // rep].transpose(-1, -2)) * scale
            return s.masked_fill(future, float("-inf")).log_softmax(-1)

        for h, off in self.offsets.items():
            lp, t = full(h), torch.arange(off, T)
            m = valid[:, off:].float()
            terms.append(-(lp[:, t, t - off] * m).sum() / m.sum().clamp(min=1))
        m = (number >= 0) & valid
        if m.any():
            lp = full(self.number_head).gather(-1, number.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            terms.append(-(lp * m).sum() / m.sum())
        if lookups:
            tl = torch.tensor(lookups)
            for layer in sorted(set(tl[:, 1].tolist())):
                sel = tl[tl[:, 1] == layer]
                b, qp, kp = sel[:, 0], sel[:, 2], sel[:, 3]
                ql, kl, rep_l, sc = self._qk(layer)
                h = self.lookup_head
                s = torch.einsum("nd,ntd->nt", ql[b, h, qp], kl[b, h // rep_l]) * sc
                s = s.masked_fill(torch.arange(T)[None, :] > qp[:, None], float("-inf"))
                terms.append(-s.log_softmax(-1).gather(-1, kp[:, None]).mean())
        return sum(terms) / max(1, len(terms))


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
a model that answers long-document questions. It knows nothing else.

**Status: {status}** The project's targets are full-cache exact match ≥ 0.98 at 512 tokens and ≥ 0.95 at
2048 tokens on every task (see the table below for what this checkpoint reaches).

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
distractor documents), variable tracking (chains `var a = <value>`, `var b = a`, 1–2 hops, with distractor
chains; the answer traces the chain hop by hop, `answer : <c> = <b> = <a> = <value>`). Filler is made of random 4–8-word phrases invented per document, each repeated 2–4 times. Each
training document is followed by 1–6 questions with a RULER-style answer prefix
(`question : what is the code of <name> ? answer : the code of <name> is <value> </s>`).

Loss: one token-level mean cross-entropy over every context token except the random names, values and
document numbers (repeated phrase occurrences are predictable only by looking back: the dense in-context
copying signal) and over the answers and their `</s>` (answer tokens weighted {answer_weight}×), plus
{attn_weight} × an attention-supervision loss (mean of -log attention weight on a target position), for
training only: in layer 0, head 0 attends the previous token, head 2 the token two back and head 1 the
latest document number; head 0 of layer 1 attends, from each `is` (or `=`) that repeats a name already
stated as `<name> is <value>` (or `<name> = <x>`, in the same document for sectioned text), the position of
that value{hops}. Only where heads look is supervised; what they copy is learned from the language-model loss.
Without this loss the model stayed for thousands of steps on a plateau where it answers with *a* value
of the document (multi-fact tasks at chance). The exported model is a plain Llama.

## Training

- Curriculum (length × batch × steps): {stages}; with probability {mix_short} a step uses an earlier stage's
  length (same tokens per step).
{init}{warmup_text}A fraction {copy_mix} of the rows are copy rows (a random run of words, then the same run) and {phrase_mix}
  are phrase rows: short phrases over a small pool of 6–24 words, each repeated at random places, so that
  continuing a phrase needs matching two or more previous tokens (as `the code of <name> is` does; the
  fixed-offset copy rows alone taught a position trick, and the model then answered with a value of the
  wrong fact), and {fact_mix} are fact rows: facts (a third each: `the <relation> of <name> is <value> .`;
  variable chains `var a = <value> .`, `var b = a .` of 1-3 variables; per-document facts with names
  recurring across documents) restated afterwards in another order (`<c> = <b> = <a> = <value> .`,
  `in document <k> , the code of <name> is <value> .`), with the loss on the restated values -- one
  retrieval target per fact. The remaining rows are task documents.
- {steps} steps, AdamW (β = 0.9, 0.95, weight decay {wd}), peak LR {lr}, {warmup} warm-up steps, cosine to 10 %,
  gradient clipping 1.0, seed {seed}.
- Final training loss (EMA): language-model {lm:.3f}, answers {ans:.3f}.
- Wall time: {minutes:.0f} minutes on 2 CPU cores (`torch.set_num_threads(2)`, shared machine), exported from
  the checkpoint of step {export_step}.
- Reproduce: `{command}` (resumable: re-run the same command after an interruption).
{note}
## Evaluation (full cache)

Exact match of greedy decoding (`generate`, plain `DynamicCache`, `max_new_tokens=6`) on held-out documents
(`build_suite(seed={eval_seed}, ...)`, never seen in training):

| length | examples | all | needle | multikey | multidoc | vartrack |
|---|---|---|---|---|---|---|
{rows}

## Limitations

The model only understands the synthetic task language; it was trained up to 2048 tokens and is not
expected to work beyond 2560 positions. It is a test fixture for KV-cache policies, not a language model.
Its retrieval happens in layer 1 (the supervised lookup head), so KV policies that lose the fact a
question needs fail it outright: a wrong value, or for variable tracking a chain that breaks at the hop
whose assignment was evicted. Where a task is below target, only the tasks near 1.0 separate policies by
retrieval rather than by chance.
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
    p.add_argument("--copy-steps", type=int, default=150, help="warm-up steps on pure copy rows (64 tokens)")
    p.add_argument("--copy-mix", type=float, default=0.05, help="fraction of copy rows after the warm-up")
    p.add_argument("--phrase-mix", type=float, default=0.1, help="fraction of small-pool phrase rows after the warm-up")
    p.add_argument("--fact-mix", type=float, default=0.4, help="fraction of restated-fact rows after the warm-up")
    p.add_argument("--offset-heads", default="0:1,2:2", help="layer-0 heads supervised to attend a fixed offset back (head:offset,...)")
    p.add_argument("--attn-weight", type=float, default=1.0, help="weight of the attention-supervision loss (0 = off)")
    p.add_argument("--lookup-layers", type=int, default=1, help="chain hops supervised, one per layer from layer 1")
    p.add_argument("--init-from", default="", help="start from an exported model folder (weights and tokenizer)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--answer-weight", type=float, default=2.0, help="per-token weight of answer tokens")
    p.add_argument("--eval-every", type=int, default=150)
    p.add_argument("--eval-n", type=int, default=16, help="held-out examples per task for the quick evals")
    p.add_argument("--final-n", type=int, default=50, help="held-out examples per task at 512 (half at 2048)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop (with a checkpoint) after this long")
    p.add_argument("--card-note", default="", help="extra sentence for the model card's training section")
    p.add_argument("--export-from", choices=("ckpt", "best"), default="ckpt")
    args = p.parse_args(argv)
    args.defaults = vars(p.parse_args([]))
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / ".gitignore").write_text("*\n")  # checkpoints never go into git
    if args.init_from and not (work / "tokenizer" / "hf" / "tokenizer.json").exists():
        # continue from an exported model: its tokenizer is the tokenizer
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(args.init_from).save_pretrained(str(work / "tokenizer" / "hf"))
    if args.phase in ("all", "tokenizer") and not (work / "tokenizer" / "hf" / "tokenizer.json").exists():
        train_tokenizer(work / "tokenizer", args.seed, args.vocab_size)
    if args.phase in ("all", "train"):
        train(args)
    if args.phase in ("all", "export"):
        export(args)


if __name__ == "__main__":
    main()
