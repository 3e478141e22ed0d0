"""The demo model's tokenizer: SentencePiece BPE on the task language, exported as a fast tokenizer."""

from __future__ import annotations

import random
from pathlib import Path

from kvprune.eval.tasks import ALL_WORDS, TASKS, build_suite, format_prompt

from .common import BOS, PAD, log


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
