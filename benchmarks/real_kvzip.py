"""KVzip on SmolLM2-135M-Instruct and the real-text suite at 2K tokens, beside kvpress's KVzipPress.

    python benchmarks/real_kvzip.py --run        # all stages, resumable (per-example JSONL lines)
    python benchmarks/real_kvzip.py --summarise  # the tables of BENCHMARKS.md, from the JSONL files
    python benchmarks/real_kvzip.py --run --n 72 --stages kvprune --configs full,kvzip@0.5,kvzip@0.25  # more examples

Stages (one process, one thread each side, in this order): kvprune's answers for each configuration of
``CONFIGS`` (query-agnostic: the context is one forward -- for kvzip, the forward plus its replay and
eviction -- then the question, then greedy decoding; ``run_qa`` per example); kvpress 0.5.5's ``KVzipPress``
on the same token ids in its own virtual environment (``_kvzip_kvpress.py``); then the scoring cost: a plain
prefill of the context and a kvzip forward (prefill + replay + eviction) of the same context, interleaved.
``--configs`` picks configurations by name (``config_name``). The summary pairs every configuration with the full
cache on the same examples (who gets which answer right, the difference and its 95 % interval).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import time
from collections import Counter
from pathlib import Path

import torch
from real_model_suite import wilson

from kvprune import make_cache
from kvprune.eval.qa import run_qa, split_prompt
from kvprune.eval.realtext import build_real_suite, chat_prompt, haystack_info
from kvprune.eval.tasks import score_answer
from kvprune.integrations.compat import with_cache
from kvprune.models import load_smollm2, smollm2_dir

RESULTS = Path("benchmarks/results/real")
ANSWERS, KVPRESS, COST = RESULTS / "kvzip_2k.jsonl", RESULTS / "kvzip_2k_kvpress.jsonl", RESULTS / "kvzip_cost.jsonl"
#: (protocol, policy, budget, params): the full cache, kvzip per head, kvzip global (the default, as kvpress's)
CONFIGS: tuple[tuple[str, str, float | None, dict], ...] = (
    ("query_agnostic", "full", None, {}),
    ("query_agnostic", "kvzip", 0.5, {"scope": "head"}),
    ("query_agnostic", "kvzip", 0.25, {"scope": "head"}),
    ("query_agnostic", "kvzip", 0.5, {}),  # the default: scope="global", the budget held while the answer decodes
    ("query_agnostic", "kvzip", 0.25, {}),
)
LATE_CONFIGS: tuple[tuple[str, str, float | None, dict], ...] = (
    ("query_agnostic", "kvzip", 0.5, {"prefill_only": True, "scope": "global"}),  # kvpress's schedule
    ("query_agnostic", "kvzip", 0.25, {"prefill_only": True, "scope": "global"}),
    ("query_aware", "full", None, {}),
    ("query_aware", "kvzip", 0.5, {}),
    ("query_aware", "kvzip", 0.25, {}),
)
RATIOS = (0.5, 0.75)  # kvpress compression ratios: kvprune budgets 0.5 and 0.25


def config_name(config: tuple) -> str:
    """``--configs`` name of a configuration: ``[aware:]policy[@budget][/key=value...]``, e.g. ``kvzip@0.5``,
    ``kvzip@0.5/scope=head``, ``aware:full``."""
    protocol, policy, budget, params = config
    return (("aware:" if protocol == "query_aware" else "") + policy + (f"@{budget}" if budget is not None else "")
            + "".join(f"/{k}={v}" for k, v in sorted(params.items())))


def pick(configs, names: set[str] | None) -> list:
    return [c for c in configs if names is None or config_name(c) in names]


def _index(ex: dict) -> int:
    return int(str(ex["id"]).rsplit("-", 1)[1])


def suite(tok, args) -> list[dict]:
    return build_real_suite(tok, seed=args.seed, n_per_task=args.n, lengths=[2048], tasks=args.tasks.split(","))


def run_kvprune(model, tok, examples, configs) -> None:
    """Every configuration on one example before the next, so a run stopped early leaves paired answers."""
    done = set()
    if ANSWERS.exists():
        done = {(r["protocol"], r["policy"], r["budget"], r["params"], r["id"])
                for r in map(json.loads, ANSWERS.read_text().splitlines())}
    info = haystack_info()
    prompt = chat_prompt(tok)
    tally = {config_name(c): [0, 0, 0.0] for c in configs}  # right, run, seconds
    for ex in sorted(examples, key=_index):  # the tasks in step, so a run stopped early stays balanced
        for config in configs:
            protocol, policy, budget, params = config
            tag = json.dumps(params, sort_keys=True) if params else ""
            if (protocol, policy, budget, tag, ex["id"]) in done:
                continue
            t0 = time.time()
            a = run_qa(model, tok, [ex], policy, budget, prompt=prompt, stop_strings=(), protocol=protocol, **params)[0]
            t = tally[config_name(config)]
            t[0], t[1], t[2] = t[0] + a.correct, t[1] + 1, t[2] + time.time() - t0
            with ANSWERS.open("a") as f:
                f.write(json.dumps(dict(length=2048, protocol=protocol, policy=policy, budget=budget, params=tag,
                                        task=a.task, id=a.id, correct=a.correct, prediction=a.prediction[:80],
                                        answer=a.answer, kv_bytes=a.kv_bytes, prompt_tokens=a.prompt_tokens,
                                        prefill_s=round(a.prefill_s, 3), decode_s=round(a.decode_s, 3),
                                        python=info["python"], haystack=info["sha256"])) + "\n")
            print(f"{ex['id']} {config_name(config)}: {'right' if a.correct else 'wrong'} ({time.time() - t0:.1f} s)",
                  flush=True)
    for name, (ok, n, secs) in tally.items():
        if n:
            print(f"{name}: {ok}/{n} ({secs:.0f} s)", flush=True)


def run_kvpress(tok, examples, python: str, threads: int) -> None:
    prompt = chat_prompt(tok)
    rows = []
    for ex in examples:
        c, q = split_prompt(tok, ex, prompt(ex))
        rows.append(dict(id=ex["id"], context_ids=c, question_ids=q, max_new_tokens=int(ex["max_new_tokens"]),
                         stop_ids=[tok.eos_token_id]))
    path = RESULTS / "kvzip_2k_examples.json"
    path.write_text(json.dumps(rows))
    here = Path(__file__).resolve().parent
    subprocess.run([python, str(here / "_kvzip_kvpress.py"), str(smollm2_dir()), str(path), str(KVPRESS),
                    ",".join(str(r) for r in (0.0, *RATIOS)), str(threads)], check=True)
    path.unlink()


@torch.no_grad()
def run_cost(model, tok, examples, repeats: int) -> None:
    """Plain prefill vs kvzip's forward (prefill + replay + eviction) of the same contexts, interleaved."""
    prompt = chat_prompt(tok)
    for ex in examples:
        ids = torch.tensor([split_prompt(tok, ex, prompt(ex))[0]])
        for _ in range(repeats):
            cache = make_cache(model, "full")
            t0 = time.perf_counter()
            model(input_ids=ids, **with_cache(cache), logits_to_keep=1)
            plain = time.perf_counter() - t0
            cache = make_cache(model, "kvzip", 0.5, tokenizer=tok)
            t0 = time.perf_counter()
            model(input_ids=ids, **with_cache(cache), logits_to_keep=1)
            total = time.perf_counter() - t0
            with COST.open("a") as f:
                f.write(json.dumps(dict(id=ex["id"], tokens=ids.shape[1], plain_s=round(plain, 3),
                                        kvzip_s=round(total, 3), replay_s=round(cache.replay_seconds, 3),
                                        threads=torch.get_num_threads())) + "\n")
            print(f"cost {ex['id']}: plain {plain:.1f} s, kvzip {total:.1f} s (replay {cache.replay_seconds:.1f} s)",
                  flush=True)


def paired_interval(a: int, b: int, c: int, d: int) -> tuple[float, float]:
    """95 % interval of p2 - p1 on a paired 2x2 table (a: both right, b: only the first right, c: only the second
    right, d: both wrong): Newcombe's square-and-add (1998, his method 10), the Wilson intervals of the two
    accuracies combined with their continuity-corrected correlation phi."""
    n = a + b + c + d
    p1, p2 = (a + b) / n, (a + c) / n
    (l1, u1), (l2, u2) = wilson(a + b, n), wilson(a + c, n)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    det = a * d - b * c
    phi = 0.0 if margins == 0 else (det - n / 2 if det > n / 2 else min(det, 0)) / math.sqrt(margins)
    lo = p2 - p1 - math.sqrt((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2)
    hi = p2 - p1 + math.sqrt((u2 - p2) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1) + (p1 - l1) ** 2)
    return max(-1.0, lo), min(1.0, hi)


def _by(rows: list[dict], key, full: bool = False) -> dict:
    groups: dict = {}
    for r in rows:
        if not full or r["policy"] == "full":
            groups.setdefault(key(r), []).append(r)
    return groups


def summarise(tok, args) -> str:
    examples = {ex["id"]: ex for ex in suite(tok, args)}
    rows = [json.loads(line) for line in ANSWERS.read_text().splitlines()] if ANSWERS.exists() else []
    out = ["| protocol | method | budget | accuracy | 95 % interval | vs full (same examples) | n | mean KV bytes | "
           "time to first token (s) |",
           "|---|---|---|---|---|---|---|---|---|"]
    # the tasks of --tasks, fixed before the run (the 2K tasks the full cache could do on the first 12 examples), not
    # re-chosen from the answers: a task whose full-cache accuracy drifts under 0.5 with more examples stays counted
    tasks = args.tasks.split(",")
    full_task: dict[str, list[str]] = {}
    for (protocol, task), v in sorted(_by(rows, lambda r: (r["protocol"], r["task"]), full=True).items()):
        full_task.setdefault(task, []).append(f"{protocol} {sum(r['correct'] for r in v)}/{len(v)}")

    def tally(task: str) -> str:
        return f"{task} ({', '.join(full_task.get(task, []))})"

    other = sorted(set(full_task) - set(tasks))
    out.insert(0, f"tasks (full cache per protocol): {'; '.join(map(tally, tasks))}"
               + (f"; not counted: {'; '.join(map(tally, other))}" if other else "") + "\n")
    rows = [r for r in rows if r["task"] in tasks]
    groups = _by(rows, lambda r: (r["protocol"], r["policy"], r["budget"], r["params"]))
    full = {(r["protocol"], r["id"]): bool(r["correct"]) for r in rows if r["policy"] == "full"}
    paired = ["", "paired against the full cache on the same examples (95 % interval: Newcombe's square-and-add for "
              "paired proportions, his method 10):", "",
              "| protocol | method | budget | n | full right, method wrong | method right, full wrong | vs full | "
              "95 % interval |", "|---|---|---|---|---|---|---|---|"]
    for (protocol, policy, budget, params), v in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "full", kv[0][3], -(kv[0][2] or 1))):
        k, n = sum(r["correct"] for r in v), len(v)
        lo, hi = wilson(k, n)
        name = policy + (f" {params}" if params else "")
        pairs = [(r["task"], full[(protocol, r["id"])], bool(r["correct"])) for r in v if (protocol, r["id"]) in full]
        delta = ""
        if policy != "full" and pairs:
            lost = Counter(t for t, f, m in pairs if f and not m)  # the full cache right, this one wrong
            won = Counter(t for t, f, m in pairs if m and not f)
            a, b, c = sum(f and m for _, f, m in pairs), sum(lost.values()), sum(won.values())
            plo, phigh = paired_interval(a, b, c, len(pairs) - a - b - c)
            delta = f"{100 * (c - b) / len(pairs):+.1f} pts"
            per_task = [f" ({', '.join(f'{t} {x[t]}' for t in tasks)})" if len(tasks) > 1 else "" for x in (lost, won)]
            paired.append(f"| {protocol} | {name} | {budget} | {len(pairs)} | {b}{per_task[0]} | {c}{per_task[1]} | "
                          f"{delta} | {100 * plo:+.1f} to {100 * phigh:+.1f} pts |")
        out.append(f"| {protocol} | {name} | {budget if budget is not None else '-'} | {k / n:.3f} | {lo:.2f}-{hi:.2f} | "
                   f"{delta} | {n} | {statistics.mean(r['kv_bytes'] for r in v) / 1e6:.1f} MB | "
                   f"{statistics.median(r['prefill_s'] for r in v):.1f} |")
    out += paired
    if KVPRESS.exists():
        eos = tok.eos_token_id
        out += ["", "kvpress 0.5.5 KVzipPress (query-agnostic, same token ids; budget = 1 - compression ratio):", "",
                "| method | budget | accuracy | 95 % interval | vs its full cache | n | context forward (s, median) |",
                "|---|---|---|---|---|---|---|"]
        by: dict[float, list[tuple[bool, float]]] = {}
        for r in map(json.loads, KVPRESS.read_text().splitlines()):
            ex = examples.get(r["id"])
            if ex is None:
                continue
            ids = r["ids"][: int(ex["max_new_tokens"])]
            end = next((i for i, t in enumerate(ids) if t == eos), len(ids))
            by.setdefault(r["ratio"], []).append(
                (bool(score_answer(tok.decode(ids[:end], skip_special_tokens=True).strip(), ex)), r["context_s"]))
        base = sum(c for c, _ in by.get(0.0, [])) / max(1, len(by.get(0.0, [])))
        for ratio, v in sorted(by.items()):
            k, n = sum(c for c, _ in v), len(v)
            lo, hi = wilson(k, n)
            name = "full (DynamicCache)" if ratio == 0 else "KVzipPress"
            delta = "" if ratio == 0 else f"{100 * (k / n - base):+.1f} pts"
            out.append(f"| {name} | {1 - ratio if ratio else '-'} | {k / n:.3f} | {lo:.2f}-{hi:.2f} | {delta} | {n} | "
                       f"{statistics.median(s for _, s in v):.1f} |")
    if COST.exists():
        c = [json.loads(line) for line in COST.read_text().splitlines()]
        ratio = [r["kvzip_s"] / r["plain_s"] for r in c]
        extra = [r["replay_s"] / r["plain_s"] for r in c]
        out += ["", f"scoring cost over {len(c)} runs ({len({r['id'] for r in c})} contexts of "
                f"{min(r['tokens'] for r in c)}-{max(r['tokens'] for r in c)} tokens, {c[0]['threads']} thread): "
                f"plain prefill median {statistics.median(r['plain_s'] for r in c):.2f} s; kvzip's replay + scoring + "
                f"eviction median {statistics.median(r['replay_s'] for r in c):.2f} s = "
                f"{statistics.median(extra):.2f}x the prefill (max {max(extra):.2f}x); context forward with kvzip "
                f"(prefill + replay) {statistics.median(ratio):.2f}x the plain prefill (max {max(ratio):.2f}x)"]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="store_true")
    ap.add_argument("--late", action="store_true", help="also run LATE_CONFIGS (kvpress's schedule, query-aware)")
    ap.add_argument("--summarise", action="store_true")
    ap.add_argument("--stages", default="kvprune,kvpress,cost")
    ap.add_argument("--configs", help="comma-separated names of the kvprune configurations to run (of CONFIGS, and "
                    "of LATE_CONFIGS with --late), e.g. full,kvzip@0.5,kvzip@0.25; default all; names: "
                    + ", ".join(config_name(c) for c in CONFIGS + LATE_CONFIGS))
    ap.add_argument("--n", type=int, default=12, help="examples per task")
    ap.add_argument("--kvpress-n", type=int, default=6, help="examples per task on the kvpress side (the first ones)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", default="niah_single,niah_multikey",
                    help="the 2K tasks the full cache could do on the first 12 examples (fixed: not re-chosen from the answers)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kvpress-python", default=".venv-kvpress/bin/python")
    ap.add_argument("--cost-examples", type=int, default=4)
    ap.add_argument("--cost-repeats", type=int, default=2)
    args = ap.parse_args()
    names = set(args.configs.split(",")) if args.configs else None
    unknown = sorted((names or set()) - {config_name(c) for c in CONFIGS + LATE_CONFIGS})
    if unknown:
        ap.error(f"unknown configurations {unknown}; expected some of "
                 f"{', '.join(config_name(c) for c in CONFIGS + LATE_CONFIGS)}")
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    if args.summarise:
        print(summarise(tok, args))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    examples = suite(tok, args)
    stages = args.stages.split(",")
    configs = pick(CONFIGS, names) if "kvprune" in stages else []
    # with the kvpress stage, the order the published results were made in: per head, kvpress, global
    first = [c for c in configs if c in CONFIGS[:3]] if "kvpress" in stages else configs
    run_kvprune(model, tok, examples, first)
    if "kvpress" in stages:
        run_kvpress(tok, [ex for ex in examples if _index(ex) < args.kvpress_n], args.kvpress_python, args.threads)
    run_kvprune(model, tok, examples, [c for c in configs if c not in first])
    if "cost" in stages and not COST.exists():
        run_cost(model, tok, examples[:: max(1, len(examples) // args.cost_examples)][: args.cost_examples],
                 args.cost_repeats)
    if args.late:
        run_kvprune(model, tok, examples, pick(LATE_CONFIGS, names))
    print(summarise(tok, args), flush=True)


if __name__ == "__main__":
    main()
