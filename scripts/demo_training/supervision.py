"""Attention supervision, for training only: where a few heads should look, and the loss that says so."""

from __future__ import annotations

import torch

from kvprune.eval.tasks import NAMES, NUMBERS


def parse_offsets(text: str) -> dict[int, int]:
    return {int(h): int(o) for h, o in (part.split(":") for part in text.split(",") if part)}


_IS = ("is", "=")


def lookup_targets(words: list[str], max_layer: int = 1) -> tuple[list[tuple[int, int, int]], list[int]]:
    """Attention targets of one row (``words[0]`` is BOS): retrieval hops and the latest document number.

    Retrieval: wherever ``<key> is`` (or ``<key> =``) repeats a key that occurs earlier as ``<key> is
    <value>`` / ``<key> = <x>`` (for document rows: in the same document, i.e. with the same latest
    number), the ``is`` position should attend to that ``<value>`` -- layer 1; if the retrieved word is
    itself a variable (``var b = a``), layer 2 should attend to where ``a`` is assigned, and so on
    (layers 1 to ``max_layer``). Since the vartrack answers trace the chain hop by hop, one lookup
    per generated token, the default supervises layer 1 only. Returns ``(layer, query position, key position)`` triples and, per
    position, the position of the latest number token at or before it (-1 if none).
    """
    number = [-1] * len(words)
    last = -1
    for t, w in enumerate(words):
        if w in _NUMBER_SET:
            last = t
        number[t] = last
    def section(i: int) -> str | None:
        return words[number[i]] if number[i] >= 0 else None

    defs: dict[str, list[int]] = {}  # key -> positions of the word following "<key> is" / "<key> ="
    out = []
    for t in range(2, len(words)):
        if words[t] in _IS:
            key = words[t - 1]
            cands = [i for i in defs.get(key, ()) if section(i) == section(t)]
            if len(cands) == 1:
                i, layer = cands[0], 1
                while True:
                    out.append((layer, t, i))
                    nxt = words[i]
                    if layer >= max_layer or nxt not in _NAME_SET:
                        break
                    hop = [j for j in defs.get(nxt, ()) if words[j - 1] == "=" and j < i]
                    if len(hop) != 1:
                        break
                    i, layer = hop[0], layer + 1
        if t >= 2 and words[t - 1] in _IS and words[t - 2] in _NAME_SET:
            defs.setdefault(words[t - 2], []).append(t)
    return out, number


_NAME_SET, _NUMBER_SET = set(NAMES), set(NUMBERS)


class AttentionSupervision:
    """Auxiliary losses on a few attention patterns: -log of the attention weight on the target position.

    * layer 0, head 0 attends 1 token back and head 2 attends 2 tokens back (``--offset-heads``): the
      name two tokens before a value becomes part of the value's key;
    * layer 0, head 1 attends the latest document number (the section a fact is in, and the number the
      question names);
    * head 0 of layers 1-3 attends the value (or the next variable of a chain) that the query
      ``... of <name> is`` retrieves (see :func:`lookup_targets`).

    Gradient descent on the language-model loss alone stayed for thousands of steps on a plateau where
    the model copies *a* value after "is" (exact match at chance on multi-fact tasks); supervising where
    the heads look lets name-keyed retrieval form in a few hundred steps. Only the attention pattern
    is supervised (what the heads copy is learned from the LM loss), and the exported model is a plain
    Llama: these losses only shape training.
    """

    def __init__(self, model, offsets: dict[int, int], number_head: int = 1, lookup_head: int = 0):
        self.layers = [layer.self_attn for layer in model.model.layers]
        self.offsets, self.number_head, self.lookup_head = offsets, number_head, lookup_head
        self.inputs: dict[int, tuple] = {}
        for idx, attn in enumerate(self.layers):
            attn.register_forward_pre_hook(self._hook(idx), with_kwargs=True)

    def _hook(self, idx: int):
        def hook(module, args, kwargs):
            hs = args[0] if args else kwargs["hidden_states"]
            pe = args[1] if len(args) > 1 else kwargs["position_embeddings"]
            self.inputs[idx] = (hs, pe)
        return hook

    def _qk(self, idx: int):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        hs, (cos, sin) = self.inputs[idx]
        B, T, _ = hs.shape
        a = self.layers[idx]
        q = a.q_proj(hs).view(B, T, -1, a.head_dim).transpose(1, 2)
        k = a.k_proj(hs).view(B, T, -1, a.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q.float(), k.float(), q.shape[1] // k.shape[1], a.scaling

    def loss(self, valid: torch.Tensor, number: torch.Tensor, lookups: list[tuple[int, int, int, int]]) -> torch.Tensor:
        q, k, rep, scale = self._qk(0)
        T = q.shape[2]
        future = torch.ones(T, T, dtype=torch.bool).triu(1)
        terms = []

        def full(h: int) -> torch.Tensor:
            s = (q[:, h] @ k[:, h // rep].transpose(-1, -2)) * scale
            return s.masked_fill(future, float("-inf")).log_softmax(-1)

        for h, off in self.offsets.items():
            lp, t = full(h), torch.arange(off, T)
            m = valid[:, off:].float()
            terms.append(-(lp[:, t, t - off] * m).sum() / m.sum().clamp(min=1))
        m = (number >= 0) & valid
        if m.any():
            lp = full(self.number_head).gather(-1, number.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            terms.append(-(lp * m).sum() / m.sum())
        if lookups:
            tl = torch.tensor(lookups)
            for layer in sorted(set(tl[:, 1].tolist())):
                sel = tl[tl[:, 1] == layer]
                b, qp, kp = sel[:, 0], sel[:, 2], sel[:, 3]
                ql, kl, rep_l, sc = self._qk(layer)
                h = self.lookup_head
                s = torch.einsum("nd,ntd->nt", ql[b, h, qp], kl[b, h // rep_l]) * sc
                s = s.masked_fill(torch.arange(T)[None, :] > qp[:, None], float("-inf"))
                terms.append(-s.log_softmax(-1).gather(-1, kp[:, None]).mean())
        return sum(terms) / max(1, len(terms))
