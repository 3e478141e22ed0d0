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
from _loops import answer_examples, teacher_force  # noqa: E402

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
        self.models = _load_model(model_dir)
        self.seqs = torch.load(seq_path)
        self.prompt_len = int(prompt_len)
        lp, *_ = self._teacher_force("full", 0.0)
        self.ref = lp
        out = {**_environment(), "nll_full": fidelity_metrics(lp, lp, self.seqs[:, self.prompt_len:])["nll_full"]}
        if qa:
            self._load_qa(qa["model_dir"], qa["examples_path"])
        return out

    def init_qa(self, threads: int, model_dir: str, examples_path: str) -> dict:
        """QA only (no fidelity sequences): load the model folder and the examples' token ids."""
        torch.set_num_threads(int(threads))
        self._load_qa(model_dir, examples_path)
        return _environment()

    def _load_qa(self, model_dir: str, examples_path: str) -> None:
        self.qa_models = _load_model(model_dir)
        with open(examples_path) as f:
            self.qa_examples = json.load(f)

    def _teacher_force(self, name: str, ratio: float):
        model = self.models["eager" if name in EAGER else "sdpa"]
        press = make_press(name, ratio, self.prompt_len)
        return teacher_force(model, self.seqs, self.prompt_len, DynamicCache(), press, _mean_kept)

    def fidelity(self, press: str, ratio: float) -> dict:
        lp, prefill_s, decode_s, kept_prefill, kept_end = self._teacher_force(press, float(ratio))
        n = self.seqs.shape[0]
        m = fidelity_metrics(lp, self.ref, self.seqs[:, self.prompt_len:])
        return {**m, "prefill_s": prefill_s / n, "decode_s": decode_s / n,
                "kept_after_prefill": kept_prefill, "kept_end": kept_end}

    def qa(self, press: str, ratio: float, max_new_tokens: int, stop_ids: list[int]) -> dict:
        """Query-agnostic: the context is prefilled under the press, then the question, then greedy decoding."""
        return self._answer(press, ratio, max_new_tokens, stop_ids, query_aware=False)

    def qa_aware(self, press: str, ratio: float, max_new_tokens: int, stop_ids: list[int]) -> dict:
        """Query-aware: context and question are one prefill under the press, then greedy decoding."""
        return self._answer(press, ratio, max_new_tokens, stop_ids, query_aware=True)

    def _answer(self, press: str, ratio: float, max_new_tokens: int, stop_ids: list[int], query_aware: bool) -> dict:
        model = self.qa_models["eager" if press in EAGER else "sdpa"]

        def setup(n: int, _n_question: int):
            return DynamicCache(), make_press(press, float(ratio), n)

        return answer_examples(model, self.qa_examples, setup, max_new_tokens, {int(s) for s in stop_ids}, _mean_kept,
                               query_aware=query_aware)


def _mean_kept(cache) -> float:
    lens = [layer.keys.shape[-2] for layer in cache.layers if getattr(layer, "keys", None) is not None]
    return float(sum(lens) / len(lens)) if lens else 0.0


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def _load_model(model_dir: str) -> dict[str, torch.nn.Module]:
    """The saved model folder twice: SDPA, and eager for the presses that need attention weights."""
    return {impl: AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=impl, dtype=torch.float32).eval()
            for impl in ("sdpa", "eager")}


def _environment() -> dict:
    """The versions on this side and the torch thread count, as ``init`` and ``init_qa`` reply."""
    return {"versions": {"kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else _dist_version("kvpress"),
                         "transformers": transformers.__version__, "torch": torch.__version__,
                         "python": sys.version.split()[0]},
            "threads": torch.get_num_threads()}


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
