"""A RULER-style long-document suite on real English prose, for instruction-tuned models.

The haystack is prose nobody in this project wrote and every machine has offline: the docstrings of a
pinned list of Python standard-library modules, read at run time (paragraphs of prose only: no code,
no doctests). The Python version and a hash of the haystack go with every result
(:func:`haystack_info`), since another Python can change the text.

Tasks (after RULER, arXiv 2404.06654; scored as RULER does: the expected strings contained in the answer):

``niah_single``   one "special magic number" sentence at a random depth; ask for it.
``niah_multikey`` four such sentences with different keys; ask for one of them.
``niah_multivalue`` four numbers for one key; the answer must contain all four.
``vartrack``      a chain ``VAR A = 41873``, ``VAR B = VAR A``, ... spread through the prose; name
                  every variable that holds the value (all must be in the answer).
``common_words``  a numbered list of words, three of which occur far more often; name those three.
``qa_distractor`` several documents, each stating where one person keeps one object; the question
                  asks about one person, the others are distractors with the same sentence shape.

An example is a dict ``{"id", "task", "context", "question", "answer", "answers", "match", "length",
"max_new_tokens"}``; :func:`chat_prompt` renders it through the tokenizer's chat template with the
context first, so the query-agnostic protocol can compress the context before the question is read.
Deterministic per ``(seed, task, length, index)``.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import random
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from ..errors import InvalidParameterError

__all__ = [
    "HAYSTACK_MODULES",
    "REAL_TASKS",
    "build_real_suite",
    "chat_prompt",
    "haystack_info",
    "haystack_paragraphs",
    "real_example",
]

REAL_TASKS: tuple[str, ...] = (
    "niah_single", "niah_multikey", "niah_multivalue", "vartrack", "common_words", "qa_distractor",
)

#: the pinned module list; a module missing on this Python is skipped (and the hash says so)
HAYSTACK_MODULES: tuple[str, ...] = (
    "argparse", "asyncio", "collections", "csv", "datetime", "decimal", "difflib", "email.message", "enum",
    "fractions", "functools", "heapq", "http.client", "inspect", "itertools", "json", "logging", "os", "pathlib",
    "pickle", "random", "re", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile",
    "textwrap", "threading", "typing", "unittest", "urllib.request", "uuid", "zipfile", "calendar", "codecs",
    "configparser", "contextlib", "copy", "dataclasses", "ftplib", "gettext", "glob", "gzip", "hashlib",
    "imaplib", "io", "ipaddress", "locale", "mailbox", "numbers", "optparse", "pdb", "platform", "pprint",
    "queue", "sched", "secrets", "selectors", "shelve", "smtplib", "tempfile", "timeit", "tokenize", "traceback",
    "weakref", "wave", "xml.dom.minidom", "zoneinfo", "bisect", "abc", "base64", "binascii", "bz2", "cmd",
    "colorsys", "concurrent.futures", "doctest", "fnmatch", "getopt", "html.parser", "keyword", "lzma",
    "mimetypes", "netrc", "operator", "poplib", "quopri", "reprlib", "runpy", "signal", "stat", "struct",
    "symtable", "tabnanny", "trace", "types", "unicodedata", "warnings", "webbrowser", "xmlrpc.client",
    "zipimport",
)

_KEY_ADJ = ("amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
            "lucky", "misty", "noble", "olive", "proud", "quiet", "rusty", "silver", "tidy", "upper", "vivid",
            "wild", "young", "zesty", "bold", "crisp", "dark", "early", "fancy")
_KEY_NOUN = ("harbor", "lantern", "meadow", "orchard", "pebble", "quarry", "river", "saddle", "thicket",
             "valley", "willow", "anchor", "beacon", "canyon", "dune", "ember", "falcon", "garden", "hammer",
             "island", "jacket", "kettle", "ladder", "mirror", "needle", "otter", "parrot", "rocket", "tunnel",
             "violin")
_PEOPLE = ("Alice", "Bruno", "Carmen", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ingrid", "Jonas", "Keiko",
           "Liam", "Marta", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Samir", "Tilda", "Umar", "Vera",
           "Wendell", "Ximena", "Yusuf", "Zora")
_OBJECTS = ("the spare key", "the old violin", "the blue notebook", "the family photos", "the winter coat",
            "the brass compass", "the tax papers", "the silver watch")
_PLACES = ("the kitchen drawer", "the garden shed", "the attic trunk", "the piano bench", "the garage cabinet",
           "the bedroom closet", "the cellar shelf", "the hallway cupboard", "the office safe", "the laundry basket",
           "the bookcase", "the car trunk")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_SYSTEM = None  # keep the template's own system prompt


@lru_cache(maxsize=1)
def haystack_paragraphs() -> tuple[str, ...]:
    """Prose paragraphs of the pinned modules' docstrings (module, public classes, functions, methods), in order."""
    out: list[str] = []
    seen: set[str] = set()
    for name in HAYSTACK_MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - absent on this Python/platform: skipped, visible in the hash
            continue
        docs = [mod.__doc__ or ""]
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                docs.append(inspect.getdoc(obj) or "")
                if inspect.isclass(obj):
                    docs += [inspect.getdoc(m) or "" for a, m in sorted(vars(obj).items())
                             if not a.startswith("_") and inspect.isfunction(m)]
        for doc in docs:
            for para in re.split(r"\n\s*\n", doc):
                text = " ".join(para.split())
                if len(text.split()) < 10 or ">>>" in text or "::" in text or not text.endswith("."):
                    continue
                if sum(c.isalpha() or c == " " for c in text) / len(text) < 0.9:
                    continue
                if text not in seen:
                    seen.add(text)
                    out.append(text)
    if not out:
        raise RuntimeError("no standard-library docstrings found (running with python -OO strips them)")
    return tuple(out)


def haystack_info() -> dict[str, Any]:
    """Python version, paragraph and word counts, and the sha256 (first 16 hex) of the haystack text."""
    paras = haystack_paragraphs()
    text = "\n".join(paras)
    return {"python": sys.version.split()[0], "paragraphs": len(paras), "words": len(text.split()),
            "sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}


def _sentences(rng: random.Random, n_tokens: int, count: Callable[[str], int]) -> list[str]:
    """Consecutive paragraphs from a random start, split into sentences, about ``n_tokens`` tokens in all."""
    paras = haystack_paragraphs()
    start = rng.randrange(len(paras))
    out: list[str] = []
    total = 0
    i = start
    while total < n_tokens:
        for s in re.split(r"(?<=[.!?])\s+", paras[i % len(paras)]):
            out.append(s)
            total += count(s) + 1
            if total >= n_tokens:
                break
        i += 1
    return out


def _insert(sentences: list[str], inserts: Sequence[str], rng: random.Random, spread: bool = True) -> list[str]:
    """``sentences`` with each insert placed at a random depth (in order when ``spread``: one per equal slice)."""
    out = list(sentences)
    n = len(inserts)
    slots = sorted(rng.randrange(len(out) * k // n, max(len(out) * k // n + 1, len(out) * (k + 1) // n))
                   for k in range(n)) if spread else sorted(rng.randrange(len(out) + 1) for _ in range(n))
    for k, (pos, text) in enumerate(zip(slots, inserts)):
        out.insert(pos + k, text)
    return out


def _key(rng: random.Random, taken: set[str]) -> str:
    while True:
        key = f"{rng.choice(_KEY_ADJ)}-{rng.choice(_KEY_NOUN)}"
        if key not in taken:
            taken.add(key)
            return key


def _number(rng: random.Random, taken: set[str]) -> str:
    while True:
        num = str(rng.randrange(1_000_000, 10_000_000))
        if num not in taken:
            taken.add(num)
            return num


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _build(task: str, rng: random.Random, n_tokens: int, count: Callable[[str], int]) -> dict[str, Any]:
    keys: set[str] = set()
    nums: set[str] = set()
    if task in ("niah_single", "niah_multikey", "niah_multivalue"):
        if task == "niah_single":
            key = _key(rng, keys)
            facts, answers = [(key, _number(rng, nums))], None
        elif task == "niah_multikey":
            facts = [(_key(rng, keys), _number(rng, nums)) for _ in range(4)]
            key = rng.choice(facts)[0]
        else:
            key = _key(rng, keys)
            facts = [(key, _number(rng, nums)) for _ in range(2)]
        needles = [_needle(k, v) for k, v in facts]
        hay = _sentences(rng, n_tokens - sum(count(s) for s in needles), count)
        rng.shuffle(needles)
        context = " ".join(_insert(hay, needles, rng, spread=task != "niah_single"))
        answers = [v for k, v in facts if k == key]
        if task == "niah_multivalue":
            question = (f"What are all the special magic numbers for {key} mentioned in the provided text? "
                        "List every one of them.")
            prefix = f"The special magic numbers for {key} mentioned in the provided text are"
        else:
            question = f"What is the special magic number for {key} mentioned in the provided text?"
            prefix = f"The special magic number for {key} mentioned in the provided text is"
        match = "all" if len(answers) > 1 else "contains"
        return dict(context=context, question=question, prefix=prefix, answers=answers, match=match,
                    max_new_tokens=12 * len(answers) + 4)
    if task == "vartrack":
        names = rng.sample([a + b + c + d + e for a, b, c, d, e in
                            (rng.sample(_LETTERS, 5) for _ in range(12))], 2)
        value = str(rng.randrange(10_000, 100_000))
        lines = [f"VAR {names[0]} = {value}."] + [f"VAR {names[k]} = VAR {names[k - 1]}." for k in range(1, len(names))]
        hay = _sentences(rng, n_tokens - sum(count(s) for s in lines), count)
        context = " ".join(_insert(hay, lines, rng))
        question = f"What is the numeric value of VAR {names[-1]}? Follow the chain of assignments in the text above."
        prefix = f"VAR {names[-1]} ="
        return dict(context=context, question=question, prefix=prefix, answers=[value], match="contains",
                    max_new_tokens=24)
    if task == "common_words":
        vocab = sorted({w.lower() for p in haystack_paragraphs()[:400] for w in re.findall(r"[A-Za-z]{5,9}", p)})
        words = rng.sample(vocab, 200)
        common, rare = words[:3], words[3:]
        per_item = count(" 999. word")
        n_items = max(30, n_tokens // per_item)
        n_common = max(6, n_items // 8)  # each common word: an eighth of the list
        items = [w for w in common for _ in range(n_common)]
        items += [rare[i % len(rare)] for i in range(max(0, n_items - len(items)))]
        rng.shuffle(items)
        context = "Here is a numbered list of words. " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        question = "What are the 3 most common words in the above list?"
        prefix = "Answer: The top 3 words that appear most often in the list are:"
        return dict(context=context, question=question, prefix=prefix, answers=common, match="all", max_new_tokens=20)
    if task == "qa_distractor":
        people = rng.sample(_PEOPLE, 3)
        objects = rng.choice(_OBJECTS)
        places = rng.sample(_PLACES, 3)
        per_doc = max(40, (n_tokens - 20) // len(people))
        docs = []
        for k, (person, place) in enumerate(zip(people, places)):
            fact = f"{person} keeps {objects} in {place}."
            hay = _sentences(rng, per_doc - count(fact) - 4, count)
            docs.append(f"Document {k + 1}: " + " ".join(_insert(hay, [fact], rng)))
        target = rng.randrange(len(people))
        context = "\n\n".join(docs)
        question = f"Answer the question based on the documents above. Where does {people[target]} keep {objects}?"
        prefix = f"{people[target]} keeps {objects} in"
        answers = [places[target].removeprefix("the ")]
        return dict(context=context, question=question, prefix=prefix, answers=answers, match="contains",
                    max_new_tokens=10)
    raise InvalidParameterError(f"unknown real-text task {task!r}; expected one of {REAL_TASKS}")


def real_example(task: str, length: int, seed: int, tokenizer: Any, index: int = 0) -> dict[str, Any]:
    """One example of ``task`` whose rendered chat prompt is about ``length`` tokens (within a few %)."""
    if task not in REAL_TASKS:
        raise InvalidParameterError(f"unknown real-text task {task!r}; expected one of {REAL_TASKS}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 256:
        raise InvalidParameterError(f"length must be an integer number of tokens >= 256; got {length!r}")

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    digest = hashlib.sha256(f"{seed}:{task}:{length}:{index}".encode()).digest()
    overhead = 0
    ex: dict[str, Any] = {}
    for _ in range(3):  # aim the context so the whole prompt lands near `length`
        rng = random.Random(int.from_bytes(digest[:8], "little"))
        ex = _build(task, rng, max(64, length - overhead), count)
        ex.update(id=f"{task}-{length}-{seed}-{index}", task=task, answer=ex["answers"][0])
        total = count(chat_prompt(tokenizer)(ex))
        ex["length"] = total
        if abs(total - length) <= max(8, length // 50):
            break
        overhead += total - length
    return ex


def build_real_suite(tokenizer: Any, seed: int = 0, n_per_task: int = 10, lengths: Sequence[int] = (1024,),
                     tasks: Sequence[str] = REAL_TASKS) -> list[dict[str, Any]]:
    """``n_per_task`` examples of every task at every length (tokens of the chat prompt), deterministic per seed."""
    if isinstance(n_per_task, bool) or not isinstance(n_per_task, int) or n_per_task < 1:
        raise InvalidParameterError(f"n_per_task must be an integer >= 1; got {n_per_task!r}")
    unknown = [t for t in tasks if t not in REAL_TASKS]
    if unknown:
        raise InvalidParameterError(f"unknown real-text tasks {unknown}; expected some of {REAL_TASKS}")
    return [real_example(t, int(n), seed, tokenizer, i) for n in lengths for t in tasks for i in range(n_per_task)]


def chat_prompt(tokenizer: Any) -> Callable[[dict[str, Any]], str]:
    """Prompt renderer: the user turn holds context then question; the assistant turn starts with the
    task's answer prefix (as RULER's templates do). The context is a prefix of the rendered text up to
    its own end, so it can be split off for the query-agnostic protocol."""

    def render(example: dict[str, Any]) -> str:
        messages = [{"role": "user", "content": f"{example['context']}\n\n{example['question']}"}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prefix = example.get("prefix")
        return text + (f"{prefix} " if prefix else "")

    return render
