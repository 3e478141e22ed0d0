"""KVzip on SmolLM2-135M-Instruct and the real-text suite at 2K tokens, beside kvpress's KVzipPress.

    python benchmarks/real_kvzip.py --run        # all stages, resumable (per-example JSONL lines)
    python benchmarks/real_kvzip.py --summarise  # the tables of BENCHMARKS.md, from the JSONL files

Stages (one process, one thread each side, in this order): kvprune's answers for each configuration of
``CONFIGS`` (query-agnostic: the context is one forward -- for kvzip, the forward plus its replay and
eviction -- then the question, then greedy decoding; ``run_qa`` per example); kvpress 0.5.5's ``KVzipPress``
on the same token ids in its own virtual environment (``_kvzip_kvpress.py``); then the scoring cost: a plain
prefill of the context and a kvzip forward (prefill + replay + eviction) of the same context, interleaved.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
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


def _index(ex: dict) -> int:
    return int(str(ex["id"]).rsplit("-", 1)[1])


def suite(tok, args) -> list[dict]:
    return build_real_suite(tok, seed=args.seed, n_per_task=args.n, lengths=[2048], tasks=args.tasks.split(","))


def run_kvprune(model, tok, examples, configs) -> None:
    done = set()
    if ANSWERS.exists():
        done = {(r["protocol"], r["policy"], r["budget"], r["params"], r["id"])
                for r in map(json.loads, ANSWERS.read_text().splitlines())}
    info = haystack_info()
    prompt = chat_prompt(tok)
    for protocol, policy, budget, params in configs:
        tag = json.dumps(params, sort_keys=True) if params else ""
        t0, ok, n = time.time(), 0, 0
        for ex in examples:
            if (protocol, policy, budget, tag, ex["id"]) in done:
                continue
            a = run_qa(model, tok, [ex], policy, budget, prompt=prompt, stop_strings=(), protocol=protocol, **params)[0]
            ok, n = ok + a.correct, n + 1
            with ANSWERS.open("a") as f:
                f.write(json.dumps(dict(length=2048, protocol=protocol, policy=policy, budget=budget, params=tag,
                                        task=a.task, id=a.id, correct=a.correct, prediction=a.prediction[:80],
                                        answer=a.answer, kv_bytes=a.kv_bytes, prompt_tokens=a.prompt_tokens,
                                        prefill_s=round(a.prefill_s, 3), decode_s=round(a.decode_s, 3),
                                        python=info["python"], haystack=info["sha256"])) + "\n")
        if n:
            print(f"{protocol} {policy} {budget} {tag}: {ok}/{n} ({time.time() - t0:.0f} s)", flush=True)


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


def summarise(tok, args) -> str:
    examples = {ex["id"]: ex for ex in suite(tok, args)}
    rows = [json.loads(line) for line in ANSWERS.read_text().splitlines()] if ANSWERS.exists() else []
    out = ["| protocol | method | budget | accuracy | 95 % interval | vs full | n | mean KV bytes | time to first token (s) |",
           "|---|---|---|---|---|---|---|---|---|"]
    full_task: dict[tuple, list[int]] = {}
    for r in rows:
        if r["policy"] == "full":
            full_task.setdefault((r["protocol"], r["task"]), []).append(int(r["correct"]))
    usable = {k for k, v in full_task.items() if sum(v) / len(v) >= 0.5}  # as BENCHMARKS §8: tasks the full cache can do
    excluded = sorted({t for (_, t) in full_task} - {t for (_, t) in usable})
    rows = [r for r in rows if (r["protocol"], r["task"]) in usable]
    out.insert(0, f"tasks: {', '.join(sorted({t for (_, t) in usable}))}" + (f" (excluded, full cache < 0.5: {', '.join(excluded)})" if excluded else "") + "\n")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["protocol"], r["policy"], r["budget"], r["params"]), []).append(r)
    full = {p: sum(r["correct"] for r in v) / len(v) for (p, pol, _, _), v in groups.items() if pol == "full"}
    for (protocol, policy, budget, params), v in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "full", kv[0][3], -(kv[0][2] or 1))):
        k, n = sum(r["correct"] for r in v), len(v)
        lo, hi = wilson(k, n)
        delta = "" if policy == "full" or protocol not in full else f"{100 * (k / n - full[protocol]):+.1f} pts"
        name = policy + (f" {params}" if params else "")
        out.append(f"| {protocol} | {name} | {budget if budget is not None else '-'} | {k / n:.3f} | {lo:.2f}-{hi:.2f} | "
                   f"{delta} | {n} | {statistics.mean(r['kv_bytes'] for r in v) / 1e6:.1f} MB | "
                   f"{statistics.median(r['prefill_s'] for r in v):.1f} |")
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
    ap.add_argument("--n", type=int, default=12, help="examples per task")
    ap.add_argument("--kvpress-n", type=int, default=6, help="examples per task on the kvpress side (the first ones)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", default="niah_single,niah_multikey", help="the 2K tasks the full cache can do")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kvpress-python", default=".venv-kvpress/bin/python")
    ap.add_argument("--cost-examples", type=int, default=4)
    ap.add_argument("--cost-repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    if args.summarise:
        print(summarise(tok, args))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    examples = suite(tok, args)
    stages = args.stages.split(",")
    if "kvprune" in stages:
        run_kvprune(model, tok, examples, CONFIGS[:3])
    if "kvpress" in stages:
        run_kvpress(tok, [ex for ex in examples if _index(ex) < args.kvpress_n], args.kvpress_python, args.threads)
    if "kvprune" in stages:
        run_kvprune(model, tok, examples, CONFIGS[3:])
    if "cost" in stages and not COST.exists():
        run_cost(model, tok, examples[:: max(1, len(examples) // args.cost_examples)][: args.cost_examples],
                 args.cost_repeats)
    if args.late:
        run_kvprune(model, tok, examples, LATE_CONFIGS)
    print(summarise(tok, args), flush=True)


if __name__ == "__main__":
    main()
