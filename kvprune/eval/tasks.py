"""Synthetic long-document QA tasks, generated offline and deterministically from a seed.

Four task kinds, in the spirit of RULER / LongBench but in a small made-up language that a tiny model
can learn (the project's demo model in :mod:`kvprune.demo` was trained on exactly this distribution):

``needle``
    One fact ``the code of <name> is <value> .`` hidden at a random depth in filler.
``multikey``
    Many facts ``the <relation> of <name> is <value> .``; the question asks for one of them.
``multidoc``
    Several sections ``document <k> : ...``; the asked name also appears in other (distractor)
    documents with other values, so the question must be answered from the named document.
``vartrack``
    Chains of assignments ``var <a> = <value> .`` ... ``var <b> = <a> .`` ... (variable tracking);
    the question asks for the value of the last variable of a chain and the answer traces the chain
    hop by hop (``answer : <c> = <b> = <a> = <value>``, as RULER's variable tracking answers with the
    chain's variables): every link must still be in the context, and each hop is one lookup.

Filler is made of short random phrases (4-8 words) invented per document, each repeated a few
times: the repeats are predictable only by looking back in the context, which is the dense
in-context-copying signal a small model needs to learn long-range retrieval.

Every word of the language (made-up words, digits 1-64 and the task punctuation) is a single token
of the demo tokenizer, so the number of words of a prompt is its number of tokens (plus one BOS).
An example is a plain dict ``{"id", "task", "context", "question", "answer", "length"}`` where
``question`` is the prompt's tail with a RULER-style answer prefix (``question : what is the code of
<name> ? answer : the code of <name> is``), ``length``
the target prompt length in tokens, BOS included; the prompt a model reads is
``f"{context} {question}"`` (:func:`format_prompt`), after which it should generate the answer (one
word; for ``vartrack`` the rest of the chain) and then end of sequence.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidParameterError

__all__ = [
    "ALL_WORDS",
    "TASKS",
    "Doc",
    "build_suite",
    "exact_match",
    "format_prompt",
    "generate_doc",
    "generate_example",
    "normalize_answer",
    "score_answer",
    "question_text",
]

TASKS: tuple[str, ...] = ("needle", "multikey", "multidoc", "vartrack")

# ---------------------------------------------------------------------------------------------
# The made-up language. Fixed (independent of any example seed) so that one tokenizer covers it.
# ---------------------------------------------------------------------------------------------
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _inventories() -> tuple[list[str], list[str], list[str]]:
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]  # 70
    words = sorted({a + b for a in syllables for b in syllables})  # 4900 CVCV words
    rng = random.Random(20240601)
    rng.shuffle(words)
    return sorted(words[:160]), sorted(words[160:320]), sorted(words[320:576])


NAMES, VALUES, FILLER = _inventories()
RELATIONS: tuple[str, ...] = ("code", "key", "tag", "mark")
MAX_DOC_NUMBER = 64
TEMPLATE_WORDS: tuple[str, ...] = (
    "the", "of", "is", "what", "in", "var", "value", "document", "question", "answer",
    ".", ",", ":", "?", "=",
) + RELATIONS
NUMBERS: tuple[str, ...] = tuple(str(i) for i in range(1, MAX_DOC_NUMBER + 1))
#: every word the generators can emit (each is one token of the demo tokenizer)
ALL_WORDS: tuple[str, ...] = tuple(TEMPLATE_WORDS) + NUMBERS + tuple(NAMES) + tuple(VALUES) + tuple(FILLER)

_MIN_LENGTH = 64


@dataclass
class Doc:
    """A generated document as words, with a loss mask and the questions it can answer.

    ``mask[i]`` is True where word ``i`` is predictable from the context (template words, repeated
    phrase occurrences after their first word); random names/values and first occurrences are False.
    ``qas`` lists ``(question_words, answer_words)``; the question words are the whole prompt tail
    (``question : ... ? answer : <answer prefix>``); the first pair is the example's question.
    """

    task: str
    words: list[str]
    mask: list[bool]
    qas: list[tuple[list[str], list[str]]] = field(default_factory=list)


class _Builder:
    def __init__(self) -> None:
        self.words: list[str] = []
        self.mask: list[bool] = []

    def add(self, words: Iterable[str], predictable: bool | Sequence[bool]) -> None:
        words = list(words)
        flags = [predictable] * len(words) if isinstance(predictable, bool) else list(predictable)
        self.words += words
        self.mask += flags


def _filler_sentences(rng: random.Random, n_words: int, reps: tuple[int, int] = (2, 4)) -> list[tuple[list[str], list[bool]]]:
    """Filler of exactly ``n_words`` words: sentences ``<phrase> .`` from phrases made up for this document."""
    out: list[tuple[list[str], list[bool]]] = []
    if n_words <= 0:
        return out
    avg = 6 + 1  # phrase words + "."
    n_phrases = max(1, round(n_words / (avg * (reps[0] + reps[1]) / 2)))
    phrases = [rng.sample(FILLER, rng.randint(4, 8)) for _ in range(n_phrases)]
    order: list[int] = []
    for i in range(n_phrases):
        order += [i] * rng.randint(*reps)
    rng.shuffle(order)
    seen: set[int] = set()
    total = 0
    k = 0
    while total < n_words:
        if k >= len(order):  # ran out: keep repeating the phrases in a fresh random order
            extra = list(range(n_phrases))
            rng.shuffle(extra)
            order += extra
        i = order[k]
        k += 1
        words = phrases[i] + ["."]
        flags = [False] + [i in seen] * (len(words) - 2) + [True]
        seen.add(i)
        take = min(len(words), n_words - total)
        if take < len(words):  # the last sentence is cut short but still ends with "."
            words, flags = words[: take - 1] + ["."], flags[: take - 1] + [True]
            if take == 1:
                words, flags = ["."], [False]
        out.append((words, flags))
        total += take
    return out


def _assemble(rng: random.Random, b: _Builder, n_filler: int, facts: list[tuple[list[str], list[bool]]],
              ordered: bool = False, depths: Sequence[float] | None = None) -> None:
    """Filler of ``n_filler`` words with ``facts`` inserted between sentences (random or given depths)."""
    sents = _filler_sentences(rng, n_filler)
    n = len(sents)
    if depths is None:
        slots = sorted(rng.randint(0, n) for _ in facts) if ordered else [rng.randint(0, n) for _ in facts]
    else:
        slots = [min(n, max(0, round(d * n))) for d in depths]
    if ordered:
        slots = sorted(slots)
    # stable: facts at the same slot keep their order
    inserts: dict[int, list[tuple[list[str], list[bool]]]] = {}
    for s, f in zip(slots, facts):
        inserts.setdefault(s, []).append(f)
    for i in range(n + 1):
        for w, m in inserts.get(i, []):
            b.add(w, m)
        if i < n:
            b.add(*sents[i])


def _fact(rel: str, name: str, value: str) -> tuple[list[str], list[bool]]:
    return ["the", rel, "of", name, "is", value, "."], [False, False, True, False, True, False, True]


def _qa(question: list[str], answer_prefix: list[str], value: str) -> tuple[list[str], list[str]]:
    """``question : <question> answer : <answer prefix>`` and the answer (RULER-style answer prefix)."""
    return ["question", ":", *question, "answer", ":", *answer_prefix], value.split()


def _qa_fact(rel: str, name: str, value: str, doc: str | None = None) -> tuple[list[str], list[str]]:
    where = ["in", "document", doc, ","] if doc is not None else []
    return _qa(where + ["what", "is", "the", rel, "of", name, "?"], where + ["the", rel, "of", name, "is"], value)


def generate_doc(task: str, rng: random.Random, context_words: int, *, n_questions: int = 1,
                 max_hops: int = 2) -> Doc:
    """A document of exactly ``context_words`` words for ``task``, with up to ``n_questions`` QAs.

    The first QA is the example's question. Used by :func:`generate_example` and by the demo
    model's training script (which asks several questions per document for a denser signal).
    """
    if task not in TASKS:
        raise InvalidParameterError(f"unknown task {task!r}; expected one of {TASKS}")
    b = _Builder()
    qas: list[tuple[list[str], list[str]]] = []
    if task == "needle":
        name, value = rng.choice(NAMES), rng.choice(VALUES)
        fact = _fact("code", name, value)
        _assemble(rng, b, context_words - len(fact[0]), [fact], depths=[rng.random()])
        qas.append(_qa_fact("code", name, value))
    elif task == "multikey":
        n_keys = max(2, context_words // 96)
        names = rng.sample(NAMES, n_keys)
        values = [rng.choice(VALUES) for _ in range(n_keys)]
        rels = [rng.choice(RELATIONS) for _ in range(n_keys)]
        facts = [_fact(r, n, v) for r, n, v in zip(rels, names, values)]
        _assemble(rng, b, context_words - sum(len(f[0]) for f in facts), facts)
        for i in rng.sample(range(n_keys), min(n_questions, n_keys)):
            qas.append(_qa_fact(rels[i], names[i], values[i]))
    elif task == "multidoc":
        n_docs = max(3, min(MAX_DOC_NUMBER, context_words // 112))
        numbers = rng.sample(NUMBERS, n_docs)
        # each document holds 1-2 facts; shared names make the other documents distractors
        n_names = max(1, n_docs // 2)
        names = rng.sample(NAMES, n_names)
        doc_facts: list[list[tuple[str, str]]] = []
        for d in range(n_docs):
            k = rng.randint(1, 2)
            doc_facts.append([(nm, rng.choice(VALUES)) for nm in rng.sample(names, min(k, n_names))])
        # the asked name must be in >= 2 documents (one target, >= 1 distractor) when possible
        fact_words = sum(7 * len(f) for f in doc_facts)
        header_words = 3 * n_docs
        budget = context_words - fact_words - header_words
        if budget < 4 * n_docs:
            raise InvalidParameterError(f"context of {context_words} words is too short for multidoc")
        sizes = [budget // n_docs] * n_docs
        for i in range(budget - sum(sizes)):
            sizes[i % n_docs] += 1
        for d in range(n_docs):
            b.add(["document", numbers[d], ":"], [False, False, True])
            facts = [_fact("code", nm, v) for nm, v in doc_facts[d]]
            _assemble(rng, b, sizes[d], facts)
        # candidate questions: (doc, name) pairs whose name occurs in another document too
        where: dict[str, list[int]] = {}
        for d, fs in enumerate(doc_facts):
            for nm, _ in fs:
                where.setdefault(nm, []).append(d)
        pairs = [(d, nm, v) for d, fs in enumerate(doc_facts) for nm, v in fs]
        shared = [p for p in pairs if len(where[p[1]]) > 1]
        pool = shared or pairs
        for d, nm, v in rng.sample(pool, min(n_questions, len(pool))):
            qas.append(_qa_fact("code", nm, v, doc=numbers[d]))
    else:  # vartrack
        n_chains = max(2, context_words // 192)
        names = rng.sample(NAMES, n_chains * (max_hops + 1))
        facts: list[tuple[list[str], list[bool]]] = []
        chains: list[tuple[list[str], str]] = []
        for c in range(n_chains):
            hops = rng.randint(1, max_hops)
            vars_ = names[c * (max_hops + 1): c * (max_hops + 1) + hops + 1]
            value = rng.choice(VALUES)
            chains.append((vars_, value))
        # place each chain's assignments in order at increasing random depths, interleaving chains
        assigns: list[tuple[float, list[str], list[bool]]] = []
        for vars_, value in chains:
            ds = sorted(rng.random() for _ in vars_)
            rhs = [value] + vars_[:-1]
            for d, lhs, r in zip(ds, vars_, rhs):
                assigns.append((d, ["var", lhs, "=", r, "."], [False, False, True, False, True]))
        assigns.sort(key=lambda t: t[0])
        facts = [(w, m) for _, w, m in assigns]
        _assemble(rng, b, context_words - sum(len(f[0]) for f in facts), facts,
                  ordered=True, depths=[d for d, _, _ in assigns])
        for c in rng.sample(range(n_chains), min(n_questions, n_chains)):
            vars_, value = chains[c]
            qas.append(_qa(["what", "is", "the", "value", "of", vars_[-1], "?"], [vars_[-1], "="],
                           " = ".join([*vars_[-2::-1], value])))
    assert len(b.words) == context_words, (task, len(b.words), context_words)
    return Doc(task=task, words=b.words, mask=b.mask, qas=qas)


def question_text(question_words: Sequence[str]) -> str:
    """The ``question`` field of an example from its words (markers and answer prefix included)."""
    return " ".join(question_words)


def format_prompt(example: dict[str, Any]) -> str:
    """The text a model reads, ``<context> <question>``; the answer follows it.

    For the synthetic tasks the ``question`` field already holds the markers the demo model was
    trained on and a RULER-style answer prefix (``question : what is the code of <name> ? answer :
    the code of <name> is``), so this is the same layout as ``f"{context} {question}"`` for real suites.
    """
    return f"{example['context']} {example['question']}"


_Q_WORDS = {"needle": 16, "multikey": 16, "multidoc": 24, "vartrack": 13}  # question field, in words


def _count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def generate_example(task: str, length: int, seed: int, *, max_hops: int = 2, index: int = 0,
                     tokenizer: Any = None) -> dict[str, Any]:
    """One example of ``task`` whose prompt is ``length`` tokens (BOS included), deterministic per ``(seed, index)``.

    Without ``tokenizer`` the length is counted in words plus one (exact for the demo tokenizer,
    where every word is one token). With a tokenizer the context is resized until the tokenized
    prompt is as close to ``length`` as possible without exceeding it (usually exact).
    """
    if task not in TASKS:
        raise InvalidParameterError(f"unknown task {task!r}; expected one of {TASKS}")
    if isinstance(length, bool) or not isinstance(length, int) or length < _MIN_LENGTH:
        raise InvalidParameterError(f"length must be an integer >= {_MIN_LENGTH}; got {length!r}")
    key = f"kvprune-tasks/{task}/{length}/{seed}/{index}"

    def make(context_words: int) -> dict[str, Any]:
        doc = generate_doc(task, random.Random(key), context_words, n_questions=1, max_hops=max_hops)
        q, a = doc.qas[0]
        return {
            "id": f"{task}-{length}-{seed}-{index}",
            "task": task,
            "context": " ".join(doc.words),
            "question": question_text(q),
            "answer": " ".join(a),
            "length": length,
        }

    n_words = length - 1 - _Q_WORDS[task]  # BOS, question field
    example = make(n_words)
    if tokenizer is None:
        return example
    best = None  # (tokens, words, example) closest to length from below
    tried: set[int] = set()
    for _ in range(12):
        n_tok = _count_tokens(tokenizer, format_prompt(example))
        tried.add(n_words)
        if n_tok <= length and (best is None or n_tok > best[0]):
            best = (n_tok, n_words, example)
        if n_tok == length:
            break
        words_per_token = len(format_prompt(example).split()) / max(1, n_tok)
        step = round((length - n_tok) * words_per_token) or (1 if n_tok < length else -1)
        n_words = max(_MIN_LENGTH // 2, n_words + step)
        while n_words in tried:
            n_words += 1 if n_tok < length else -1
        try:
            example = make(n_words)
        except InvalidParameterError:
            break
    if best is None:
        raise InvalidParameterError(f"cannot fit a {task} prompt into {length} tokens of this tokenizer")
    return best[2]


def build_suite(seed: int = 0, n_per_task: int = 10, lengths: Sequence[int] = (512, 1024, 2048),
                tasks: Sequence[str] = TASKS, *, max_hops: int = 2, tokenizer: Any = None) -> list[dict[str, Any]]:
    """``n_per_task`` examples of every task at every length, deterministic per seed (see :func:`generate_example`)."""
    if isinstance(n_per_task, bool) or not isinstance(n_per_task, int) or n_per_task < 1:
        raise InvalidParameterError(f"n_per_task must be an integer >= 1; got {n_per_task!r}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise InvalidParameterError(f"unknown tasks {unknown}; expected some of {TASKS}")
    return [
        generate_example(t, int(L), seed, max_hops=max_hops, index=i, tokenizer=tokenizer)
        for L in lengths
        for t in tasks
        for i in range(n_per_task)
    ]


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------
_EDGE_PUNCT = string.punctuation + "\u2019\u2018\u201c\u201d"


def normalize_answer(text: str) -> str:
    """Lower-case, collapse whitespace, strip punctuation (and whitespace) at both ends."""
    text = re.sub(r"\s+", " ", str(text).lower()).strip()
    return text.strip(_EDGE_PUNCT + " ").strip()


def exact_match(prediction: str, answer: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals the (or any of the) normalised answer(s), else 0.0."""
    answers = [answer] if isinstance(answer, str) else list(answer)
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(a) for a in answers))


def score_answer(prediction: str, example: dict[str, Any]) -> float:
    """1.0 or 0.0 by the example's ``match`` rule: ``"exact"`` (default; :func:`exact_match` against
    ``answers`` or ``answer``), ``"contains"`` (any expected string inside the prediction, RULER's
    ``string_match_part`` made binary) or ``"all"`` (every expected string inside, RULER's ``string_match_all``)."""
    answers = example.get("answers") or [example["answer"]]
    answers = [answers] if isinstance(answers, str) else list(answers)
    rule = example.get("match", "exact")
    if rule == "exact":
        return exact_match(prediction, answers)
    text = " ".join(str(prediction).lower().split())
    hits = [normalize_answer(a) in text for a in answers]
    if rule == "contains":
        return float(any(hits))
    if rule == "all":
        return float(all(hits))
    raise InvalidParameterError(f"unknown match rule {rule!r}; expected 'exact', 'contains' or 'all'")
