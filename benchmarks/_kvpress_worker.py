"""kvpress side of ``benchmarks/kvpress_side_by_side.py``: runs in kvpress's own virtual environment.

Not meant to be run by hand. The driver starts it as ``<kvpress python> _kvpress_worker.py`` and
talks to it with one JSON object per line (commands on stdin, results on stdout), so that kvpress
and kvprune configurations can be timed interleaved on the same (shared) machine. It imports only
torch, transformers and kvpress: kvprune is not installed in kvpress's environment (kvpress 0.5.5
pins transformers < 5.3).

Protocol (each reply is one JSON line; errors come back as ``{"error": ...}``):

* ``{"cmd": "init", "threads", "model_dir", "seq_path", "prompt_len", "qa": null | {"model_dir", "examples_path"}}``
  loads the saved stories260K folder (sdpa, plus an eager copy for ObservedAttentionPress), the token
  sequences, and the full-cache (plain ``DynamicCache``) reference; replies with versions.
* ``{"cmd": "fidelity", "press", "ratio"}``: prefill ``prompt_len`` tokens under the press, teacher-force
  the rest one token per step (no compression while decoding: kvpress compresses once, after prefill),
  reply with NLL increase, greedy agreement, KL vs the full cache and prefill / decode seconds.
* ``{"cmd": "qa", "press", "ratio", "max_new_tokens", "stop_ids"}``: per example (batch 1) prefill the
  context under the press, then the question, then greedy decoding; reply with the generated ids.
* ``{"cmd": "init_qa", "threads", "model_dir", "examples_path"}``: QA only (the real-model driver,
  ``benchmarks/real_kvpress.py``); ``{"cmd": "qa_aware", ...}`` as ``qa`` but with context and question
  prefilled together under the press (the query-aware protocol).
* ``{"cmd": "quit"}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

_OUT = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol channel
os.dup2(2, 1)  # anything else printed to stdout (warnings, progress) goes to stderr

import kvpress
import torch
import transformers
from kvpress import (
    AdaKVPress,
    ExpectedAttentionPress,
    KeyDiffPress,
    KnormPress,
    ObservedAttentionPress,
    PyramidKVPress,
    RandomPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)
from kvpress.utils import compute_n_kept
from transformers import AutoModelForCausalLM, DynamicCache

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _greedy import answer  # noqa: E402

#: presses run by default; "full" is the uncompressed DynamicCache
PRESSES = (
    "full", "SnapKV", "PyramidKV", "TOVA", "ObservedAttention", "ExpectedAttention",
    "AdaKV-ExpectedAttention", "Knorm", "KeyDiff", "StreamingLLM", "Random",
)
EAGER = {"ObservedAttention"}  # needs attention weights: attn_implementation="eager"


def snap_window(n_kept: int) -> int:
    """Observation window shared with kvprune's snapkv: 32, or half the kept tokens when fewer."""
    return max(1, min(32, n_kept // 2))


def make_press(name: str, ratio: float, k_len: int):
    n_kept = compute_n_kept(k_len, ratio)
    w = snap_window(n_kept)
    return {
        "full": lambda: None,
        "SnapKV": lambda: SnapKVPress(compression_ratio=ratio, window_size=w),
        "PyramidKV": lambda: PyramidKVPress(compression_ratio=ratio, window_size=w),
        "TOVA": lambda: TOVAPress(compression_ratio=ratio),
        "ObservedAttention": lambda: ObservedAttentionPress(compression_ratio=ratio),
        "ExpectedAttention": lambda: ExpectedAttentionPress(compression_ratio=ratio),
        "AdaKV-ExpectedAttention": lambda: AdaKVPress(ExpectedAttentionPress(compression_ratio=ratio)),
        "Knorm": lambda: KnormPress(compression_ratio=ratio),
        "KeyDiff": lambda: KeyDiffPress(compression_ratio=ratio),
        "StreamingLLM": lambda: StreamingLLMPress(compression_ratio=ratio),
        "Random": lambda: RandomPress(compression_ratio=ratio, seed=0),
    }[name]()


def fidelity_metrics(lp: torch.Tensor, ref: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Same definitions as ``kvprune.eval.fidelity.fidelity_metrics`` (copied: kvprune is not installed here)."""
    lp = torch.log_softmax(lp.double(), dim=-1)
    ref = torch.log_softmax(ref.double(), dim=-1)
    idx = targets.long().unsqueeze(-1)
    nll = -lp.gather(-1, idx).mean()
    nll_full = -ref.gather(-1, idx).mean()
    return {
        "nll": float(nll),
        "nll_full": float(nll_full),
        "nll_increase": float(nll - nll_full),
        "greedy_agreement": float((lp.argmax(-1) == ref.argmax(-1)).double().mean()),
        "kl": float((ref.exp() * (ref - lp)).sum(-1).clamp_min(0).mean()),
    }


class Worker:
    def __init__(self) -> None:
        self.models: dict[str, torch.nn.Module] = {}
        self.qa_models: dict[str, torch.nn.Module] = {}
        self.ref: torch.Tensor | None = None

    # -- commands -------------------------------------------------------------------------
    def init(self, threads: int, model_dir: str, seq_path: str, prompt_len: int, qa: dict | None) -> dict:
        torch.set_num_threads(int(threads))
        for impl in ("sdpa", "eager"):
            self.models[impl] = AutoModelForCausalLM.from_pretrained(
                model_dir, attn_implementation=impl, dtype=torch.float32
            ).eval()
        self.seqs = torch.load(seq_path)
        self.prompt_len = int(prompt_len)
        lp, _, _, _ = self._teacher_force("full", 0.0)
        self.ref = lp
        out = {
            "versions": {
                "kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else _dist_version("kvpress"),
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "python": sys.version.split()[0],
            },
            "threads": torch.get_num_threads(),
            "nll_full": fidelity_metrics(lp, lp, self.seqs[:, self.prompt_len:])["nll_full"],
        }
        if qa:
            for impl in ("sdpa", "eager"):
                self.qa_models[impl] = AutoModelForCausalLM.from_pretrained(
                    qa["model_dir"], attn_implementation=impl, dtype=torch.float32
                ).eval()
            with open(qa["examples_path"]) as f:
                self.qa_examples = json.load(f)
        return out

    def init_qa(self, threads: int, model_dir: str, examples_path: str) -> dict:
        """QA only (no fidelity sequences): load the model folder and the examples' token ids."""
        torch.set_num_threads(int(threads))
        for impl in ("sdpa", "eager"):
            self.qa_models[impl] = AutoModelForCausalLM.from_pretrained(
                model_dir, attn_implementation=impl, dtype=torch.float32
            ).eval()
        with open(examples_path) as f:
            self.qa_examples = json.load(f)
        return {"versions": {"kvpress": _dist_version("kvpress"), "transformers": transformers.__version__,
                             "torch": torch.__version__, "python": sys.version.split()[0]},
                "threads": torch.get_num_threads()}

    def qa_aware(self, press: str, ratio: float, max_new_tokens: int, stop_ids: list[int]) -> dict:
        """Query-aware: context and question are one prefill under the press, then greedy decoding."""
        model = self.qa_models["eager" if press in EAGER else "sdpa"]
        stop = {int(s) for s in stop_ids}
        preds, prefill, decode, kept = [], [], [], []
        with torch.inference_mode():
            for ex in self.qa_examples:
                ids = torch.tensor([ex["context_ids"] + ex["question_ids"]])
                n = ids.shape[1]
                pr = make_press(press, float(ratio), n)
                cache = DynamicCache()
                t0 = time.perf_counter()
                if pr is None:
                    logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
                else:
                    with pr(model):
                        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
                t1 = time.perf_counter()
                kept.append(_mean_kept(cache))
                nxt = int(logits[0, -1].argmax())
                gen, step = [nxt], n
                while nxt not in stop and len(gen) < max_new_tokens:
                    logits = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache,
                                   position_ids=torch.tensor([[step]]), use_cache=True).logits
                    step += 1
                    nxt = int(logits[0, -1].argmax())
                    gen.append(nxt)
                preds.append(gen)
                prefill.append(t1 - t0)
                decode.append(time.perf_counter() - t1)
        return {"predictions": preds, "prefill_s": prefill, "decode_s": decode, "kept_after_prefill": kept}

    def _teacher_force(self, name: str, ratio: float):
        model = self.models["eager" if name in EAGER else "sdpa"]
        seq, p = self.seqs, self.prompt_len
        length = seq.shape[1]
        press = make_press(name, ratio, p)
        cache = DynamicCache()
        out = []
        with torch.inference_mode():
            t0 = time.perf_counter()
            if press is None:
                logits = model(input_ids=seq[:, :p], past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            else:
                with press(model):
                    logits = model(input_ids=seq[:, :p], past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            out.append(torch.log_softmax(logits[:, -1].float(), dim=-1))
            t1 = time.perf_counter()
            kept_prefill = _mean_kept(cache)
            for t in range(p, length - 1):
                pos = torch.full((seq.shape[0], 1), t, dtype=torch.long)
                logits = model(input_ids=seq[:, t : t + 1], past_key_values=cache, position_ids=pos, use_cache=True).logits
                out.append(torch.log_softmax(logits[:, -1].float(), dim=-1))
            t2 = time.perf_counter()
        return torch.stack(out, dim=1), t1 - t0, t2 - t1, (kept_prefill, _mean_kept(cache))

    def fidelity(self, press: str, ratio: float) -> dict:
        lp, prefill_s, decode_s, (kept_prefill, kept_end) = self._teacher_force(press, float(ratio))
        n = self.seqs.shape[0]
        m = fidelity_metrics(lp, self.ref, self.seqs[:, self.prompt_len:])
        return {**m, "prefill_s": prefill_s / n, "decode_s": decode_s / n,
                "kept_after_prefill": kept_prefill, "kept_end": kept_end}

    def qa(self, press: str, ratio: float, max_new_tokens: int, stop_ids: list[int]) -> dict:
        model = self.qa_models["eager" if press in EAGER else "sdpa"]
        stop = {int(s) for s in stop_ids}
        preds, prefill, decode, kept = [], [], [], []
        with torch.inference_mode():
            for ex in self.qa_examples:
                ctx = torch.tensor([ex["context_ids"]])
                q = torch.tensor([ex["question_ids"]])
                n_ctx = ctx.shape[1]
                pr = make_press(press, float(ratio), n_ctx)
                cache = DynamicCache()
                t0 = time.perf_counter()
                if pr is None:
                    model.model(input_ids=ctx, past_key_values=cache, use_cache=True)
                else:
                    with pr(model):
                        model.model(input_ids=ctx, past_key_values=cache, use_cache=True)
                kept.append(_mean_kept(cache))
                gen, t1 = answer(model, cache, q, n_ctx, max_new_tokens, stop)
                t2 = time.perf_counter()
                preds.append(gen)
                prefill.append(t1 - t0)
                decode.append(t2 - t1)
        return {"predictions": preds, "prefill_s": prefill, "decode_s": decode, "kept_after_prefill": kept}


def _mean_kept(cache) -> float:
    lens = [layer.keys.shape[-2] for layer in cache.layers if getattr(layer, "keys", None) is not None]
    return float(sum(lens) / len(lens)) if lens else 0.0


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def main() -> None:
    w = Worker()
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        cmd = msg.pop("cmd")
        if cmd == "quit":
            break
        try:
            reply = getattr(w, cmd)(**msg)
        except Exception as e:  # noqa: BLE001 -- reported per configuration; the driver records the failure
            traceback.print_exc(file=sys.stderr)
            reply = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
        _OUT.write(json.dumps(reply) + "\n")
        _OUT.flush()


if __name__ == "__main__":
    main()
