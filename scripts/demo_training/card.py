"""The model card template that the export phase fills in (``kvprune/demo/model/README.md``)."""

CARD = """---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [kvprune, synthetic, long-context, llama]
---

# kvprune demo model

A {params:.2f}M-parameter Llama-architecture model (`LlamaForCausalLM`, {layers} layers, hidden {hidden},
{heads} query heads × 32, {kv} KV heads, RoPE θ = 50000, max positions 2560, tied embeddings) with a
{vocab}-piece SentencePiece BPE tokenizer (exported as a `tokenizers` fast tokenizer: loading needs neither
sentencepiece nor `trust_remote_code`). It was trained by the kvprune project, from scratch, only on the
synthetic long-document QA language of `kvprune.eval.tasks`, so that KV-cache policies can be compared on
a model that answers long-document questions. It knows nothing else.

**Status: {status}** The project's targets are full-cache exact match ≥ 0.98 at 512 tokens and ≥ 0.95 at
2048 tokens on every task (see the table below for what this checkpoint reaches).

```python
from kvprune.demo import load_demo_model
from kvprune.eval.tasks import build_suite, format_prompt
model, tok = load_demo_model()
ex = build_suite(seed=1, n_per_task=1, lengths=(512,))[0]
ids = tok(format_prompt(ex), return_tensors="pt")
out = model.generate(**ids, max_new_tokens=4, do_sample=False)
print(tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True), "| expected:", ex["answer"])
```

## Data

Generated on the fly by `kvprune.eval.tasks.generate_doc` (deterministic per seed and step; no external
data). Four task kinds, sampled with weights {weights}: single needle, multi-key retrieval (up to one fact
per ~96 tokens, 4 relations), multi-document QA (sections `document <k> :` with the asked name also in
distractor documents), variable tracking (chains `var a = <value>`, `var b = a`, 1–2 hops, with distractor
chains; the answer traces the chain hop by hop, `answer : <c> = <b> = <a> = <value>`). Filler is made of random 4–8-word phrases invented per document, each repeated 2–4 times. Each
training document is followed by 1–6 questions with a RULER-style answer prefix
(`question : what is the code of <name> ? answer : the code of <name> is <value> </s>`).

Loss: one token-level mean cross-entropy over every context token except the random names, values and
document numbers (repeated phrase occurrences are predictable only by looking back: the dense in-context
copying signal) and over the answers and their `</s>` (answer tokens weighted {answer_weight}×), plus
{attn_weight} × an attention-supervision loss (mean of -log attention weight on a target position), for
training only: in layer 0, head 0 attends the previous token, head 2 the token two back and head 1 the
latest document number; head 0 of layer 1 attends, from each `is` (or `=`) that repeats a name already
stated as `<name> is <value>` (or `<name> = <x>`, in the same document for sectioned text), the position of
that value{hops}. Only where heads look is supervised; what they copy is learned from the language-model loss.
Without this loss the model stayed for thousands of steps on a plateau where it answers with *a* value
of the document (multi-fact tasks at chance). The exported model is a plain Llama.

## Training

- Curriculum (length × batch × steps): {stages}; with probability {mix_short} a step uses an earlier stage's
  length (same tokens per step).
{init}{warmup_text}A fraction {copy_mix} of the rows are copy rows (a random run of words, then the same run) and {phrase_mix}
  are phrase rows: short phrases over a small pool of 6–24 words, each repeated at random places, so that
  continuing a phrase needs matching two or more previous tokens (as `the code of <name> is` does; the
  fixed-offset copy rows alone taught a position trick, and the model then answered with a value of the
  wrong fact), and {fact_mix} are fact rows: facts (a third each: `the <relation> of <name> is <value> .`;
  variable chains `var a = <value> .`, `var b = a .` of 1-3 variables; per-document facts with names
  recurring across documents) restated afterwards in another order (`<c> = <b> = <a> = <value> .`,
  `in document <k> , the code of <name> is <value> .`), with the loss on the restated values -- one
  retrieval target per fact. The remaining rows are task documents.
- {steps} steps, AdamW (β = 0.9, 0.95, weight decay {wd}), peak LR {lr}, {warmup} warm-up steps, cosine to 10 %,
  gradient clipping 1.0, seed {seed}.
- Final training loss (EMA): language-model {lm:.3f}, answers {ans:.3f}.
- Wall time: {minutes:.0f} minutes on 2 CPU cores (`torch.set_num_threads(2)`, shared machine), exported from
  the checkpoint of step {export_step}.
- Reproduce: `{command}` (resumable: re-run the same command after an interruption).
{note}
## Evaluation (full cache)

Exact match of greedy decoding (`generate`, plain `DynamicCache`, `max_new_tokens=6`) on held-out documents
(`build_suite(seed={eval_seed}, ...)`, never seen in training):

| length | examples | all | needle | multikey | multidoc | vartrack |
|---|---|---|---|---|---|---|
{rows}

## Limitations

The model only understands the synthetic task language; it was trained up to 2048 tokens and is not
expected to work beyond 2560 positions. It is a test fixture for KV-cache policies, not a language model.
Its retrieval happens in layer 1 (the supervised lookup head), so KV policies that lose the fact a
question needs fail it outright: a wrong value, or for variable tracking a chain that breaks at the hop
whose assignment was evicted. Where a task is below target, only the tasks near 1.0 separate policies by
retrieval rather than by chance.
"""
