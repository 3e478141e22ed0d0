"""Loaders for real long-context suites, returning the same example dicts as :mod:`kvprune.eval.tasks`.

Every loader returns a list of ``{"id", "task", "context", "question", "answer", "length"}`` dicts
(plus ``"answers"``: every accepted answer, for :func:`kvprune.eval.tasks.exact_match`, which takes a
list). ``datasets`` is used when it is installed (``load_dataset("json", data_files=...)`` for local
files, a hub name only when online); without it, local JSON / JSONL files are read directly.

Offline (``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1``, or no network), a hub name raises
:class:`DatasetUnavailableError` telling you to pass a local file instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import KVPruneError

__all__ = ["DatasetUnavailableError", "load_longbench", "load_ruler_jsonl", "read_json_records"]

_TRUE = {"1", "true", "yes", "on"}


class DatasetUnavailableError(KVPruneError, RuntimeError):
    """A dataset that cannot be loaded here (offline hub name, missing file, missing optional dependency)."""


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _datasets_module():
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        return None
    return datasets


def _read_plain(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):
        data = json.loads(text)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        return [dict(r) for r in data]
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object per line")  # noqa: TRY004 (bad data, not a bad argument)
        records.append(rec)
    return records


def read_json_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records of a local JSON-lines (or JSON list) file, through ``datasets`` when installed."""
    p = Path(path)
    if not p.is_file():
        raise DatasetUnavailableError(f"no such file: {p}")
    ds = _datasets_module()
    if ds is None:
        return _read_plain(p)
    loaded = ds.load_dataset("json", data_files=str(p), split="train")
    return [dict(r) for r in loaded]


def _as_list(x: Any) -> list[str]:
    if x is None:
        return []
    if isinstance(x, str):
        return [x]
    if isinstance(x, Iterable):
        return [str(a) for a in x]
    return [str(x)]


def _word_length(*texts: str) -> int:
    return sum(len(t.split()) for t in texts)


def _normalise(rec: Mapping[str, Any], i: int, task: str, *, context_key: str, question_key: str,
               answers_key: str, id_key: str) -> dict[str, Any]:
    # records already in kvprune's own format pass through unchanged (plus "answers")
    if {"context", "question", "answer"} <= set(rec):
        answers = _as_list(rec.get("answers")) or _as_list(rec["answer"])
        return {
            "id": str(rec.get("id", f"{task}-{i}")),
            "task": str(rec.get("task", task)),
            "context": str(rec["context"]),
            "question": str(rec["question"]),
            "answer": str(rec["answer"]),
            "answers": answers,
            "length": int(rec.get("length") or _word_length(str(rec["context"]), str(rec["question"]))),
        }
    answers = _as_list(rec.get(answers_key))
    if not answers:
        raise ValueError(f"record {i} of {task!r} has no answers (field {answers_key!r})")
    context = str(rec.get(context_key) or "")
    question = str(rec.get(question_key) or "")
    length = rec.get("length")
    return {
        "id": str(rec.get(id_key, rec.get("id", f"{task}-{i}"))),
        "task": str(rec.get("dataset") or rec.get("task") or task),
        "context": context,
        "question": question,
        "answer": answers[0],
        "answers": answers,
        "length": int(length) if length is not None else _word_length(context, question),
    }


def load_longbench(path_or_name: str | os.PathLike[str], subset: str | None = None, split: str = "test") -> list[dict[str, Any]]:
    """LongBench examples (fields ``context``, ``input`` = question, ``answers``, ``length``, ``_id``).

    ``path_or_name`` is a local ``.jsonl`` file, a folder holding ``<subset>.jsonl`` (LongBench's
    ``data/`` layout), or a hub dataset name such as ``"THUDM/LongBench"`` (needs ``datasets`` and a
    network; ``subset`` is then the configuration, e.g. ``"hotpotqa"``). ``length`` is LongBench's own
    (words for English), not tokens.
    """
    p = Path(path_or_name)
    if p.is_dir():
        if subset is None:
            files = sorted(p.glob("*.jsonl"))
            if len(files) != 1:
                raise DatasetUnavailableError(f"{p} holds {len(files)} .jsonl files; pass subset= to choose one")
            p = files[0]
        else:
            p = p / f"{subset}.jsonl"
            if not p.is_file():
                raise DatasetUnavailableError(f"no {subset}.jsonl in {p.parent}")
    if p.is_file():
        records = read_json_records(p)
        task = subset or p.stem
    else:
        name = str(path_or_name)
        if os.sep in name.strip("/").replace("/", "", 1) or name.endswith((".json", ".jsonl")):
            raise DatasetUnavailableError(f"no such file: {name}")
        records = _from_hub(name, subset, split)
        task = subset or name
    return [
        _normalise(r, i, task, context_key="context", question_key="input", answers_key="answers", id_key="_id")
        for i, r in enumerate(records)
    ]


def _from_hub(name: str, subset: str | None, split: str) -> list[dict[str, Any]]:
    hint = (f"download the data once and pass the local file instead, e.g. "
            f"load_longbench('path/to/{subset or '<subset>'}.jsonl')")
    if _offline():
        raise DatasetUnavailableError(f"{name!r} is a hub dataset but the hub is offline (HF_HUB_OFFLINE / "
                                      f"HF_DATASETS_OFFLINE); {hint}")
    ds = _datasets_module()
    if ds is None:
        raise DatasetUnavailableError(f"{name!r} is not a local file and loading it from the hub needs the "
                                      f"`datasets` package (pip install datasets); or {hint}")
    try:
        loaded = ds.load_dataset(name, subset, split=split)
    except (ConnectionError, TimeoutError, OSError) as e:
        raise DatasetUnavailableError(f"could not load {name!r} from the hub ({type(e).__name__}: {e}); {hint}") from e
    return [dict(r) for r in loaded]


def load_ruler_jsonl(path: str | os.PathLike[str], task: str | None = None) -> list[dict[str, Any]]:
    """RULER-style JSONL (``index``, ``input``, ``outputs``, ``length``; optional ``query`` / ``context``).

    RULER's prepared files hold the whole prompt in ``input``; when a record has no separate question
    it becomes the context and ``question`` is empty. Records in kvprune's own format (``context``,
    ``question``, ``answer``) are accepted as they are. ``task`` defaults to the file name's stem.
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetUnavailableError(f"no such file: {p} (RULER data is read from local JSONL files only)")
    records = read_json_records(p)
    task = task or p.stem
    out = []
    for i, rec in enumerate(records):
        if "context" in rec and "question" in rec and "answer" in rec:
            out.append(_normalise(rec, i, task, context_key="context", question_key="question",
                                  answers_key="answers", id_key="id"))
            continue
        r = dict(rec)
        if "context" not in r:
            r["context"] = r.get("input", "")
            r.setdefault("query", "")
        r.setdefault("id", r.get("index", i))
        out.append(_normalise(r, i, task, context_key="context", question_key="query", answers_key="outputs",
                              id_key="id"))
    return out
