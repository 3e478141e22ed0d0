"""Training rows (task documents with questions, copy, phrase and fact rows) and whole batches."""

from __future__ import annotations

import random

import torch

from kvprune.eval.tasks import FILLER, NAMES, NUMBERS, RELATIONS, VALUES, generate_doc

from .common import BOS, EOS, PAD, TASK_WEIGHTS
from .supervision import lookup_targets

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
