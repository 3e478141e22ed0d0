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

This file is the command line; the code of each phase is in ``scripts/demo_training/`` (one module per
concern: tokenizer, data, supervision, evaluation, model, training, card, export).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (ROOT, HERE):  # run from a checkout without installing; demo_training/ sits next to this file
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

# the machine is often shared: passive OpenMP waiting keeps 2 threads from spinning against other jobs
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after the environment above)
from demo_training.common import DEFAULT_STAGES  # noqa: E402
from demo_training.export import export  # noqa: E402
from demo_training.tokenizer import train_tokenizer  # noqa: E402
from demo_training.training import train  # noqa: E402


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
