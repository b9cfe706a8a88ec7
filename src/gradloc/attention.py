"""Stage `gradloc attention`: per-token attention scores of a large and a small model
over one period's training diff, for the `augment` method part (Gao et al., AAAI 2025).

The score of token j is the attention it *receives* from later tokens, averaged over
layers and heads and divided by the number of later tokens:

    s_j = 1 / (L * H * (T - 1 - j)) * sum_{layers, heads} sum_{i > j} A[i, j]

(0 for the last token of a window, which no later token attends to). The authors'
released code sums each attention row over keys instead, which is 1 for every softmax
row whatever the text, so its "large minus small" is rounding noise; this is the
paper's definition.

Memory stays bounded: each attention module's weights [B, H, T, T] are reduced to
column sums [B, T] by a forward hook as soon as the layer has run (eager attention, the
only implementation that returns the weights; the model is not asked to collect them).
Documents longer than `seq_len` are scored in consecutive windows; the tokenizer's
leading special ids (BOS for Llama) are put before each window and not scored.

Outputs `attention/P{period}/`: `large.npy`, `small.npy` (float32) and `marked.npy`
(uint8: 1 where the token lies in an entity mention or an object of a fact of this
period, in the corpus' triples, whose subject the sequence mentions; never read from the
evaluation probes),
one value per token of the period's `split == train` documents, back to back in
`tokens/docs.parquet` order; `meta.json` (period, n_docs, n_tokens, the tokenizer's
fingerprint, both models, window length, time and tokens/s).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from . import schema
from .core import attention_scores as load  # noqa: F401  (gradloc.attention.load reads this stage's output)
from .core import marks, no_probes, spans_of  # noqa: F401  (marks, spans_of: gradloc.attention's API)
from .io import InputError, atomic_output, write_json
from .tokenfiles import load as load_tokens
from .tokenfiles import tokenizer_fingerprint

log = logging.getLogger(__name__)


# --- the score ------------------------------------------------------------------------------

def received(attn: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """Attention each key receives from strictly later (real) queries, summed over heads:
    attn [B, H, T, T] (rows: queries), query_mask [B, T] -> [B, T]."""
    a = attn.float() * query_mask[:, None, :, None].float()
    col = a.sum(dim=(1, 2))                                  # over heads and queries
    return col - a.diagonal(dim1=2, dim2=3).sum(dim=1)       # minus the token's own query


def normalise(total: torch.Tensor, n_layers: int, n_heads: int, lengths: torch.Tensor) -> torch.Tensor:
    """Summed received attention -> the mean over layers and heads per later token."""
    T = total.shape[1]
    later = (lengths[:, None] - 1 - torch.arange(T)[None, :]).clamp(min=0)
    return torch.where(later > 0, total / (n_layers * n_heads * later.clamp(min=1)), torch.zeros_like(total))


class ReceivedAttention:
    """Forward hooks on every attention module of `model` that add each layer's
    received attention into `self.total` and drop the weights."""

    def __init__(self, model):
        model.config._attn_implementation = "eager"  # the one implementation that returns weights
        self.modules = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
        if not self.modules:
            raise InputError(f"{type(model).__name__}: no attention modules found")
        self.total, self.layers, self.heads, self.mask = None, 0, 0, None
        self.handles = [m.register_forward_hook(self.hook) for m in self.modules]

    def hook(self, module, args, output):
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if not torch.is_tensor(weights) or weights.dim() != 4:
            raise InputError(f"{type(module).__name__} returned no attention weights (eager attention needed)")
        part = received(weights, self.mask)
        self.total = part if self.total is None else self.total + part
        self.layers, self.heads = self.layers + 1, weights.shape[1]

    def __call__(self, model, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.total, self.layers, self.mask = None, 0, mask
        model(input_ids=input_ids, attention_mask=mask, use_cache=False)
        return normalise(self.total, self.layers, self.heads, mask.sum(1).cpu()).cpu()

    def remove(self):
        for h in self.handles:
            h.remove()


def windows(docs: list[np.ndarray], seq_len: int) -> list[tuple[int, int, int]]:
    """(doc index, start, end) of consecutive windows covering every document."""
    return [(d, s, min(s + seq_len, len(doc))) for d, doc in enumerate(docs) for s in range(0, len(doc), seq_len)]


@torch.inference_mode()
def score_docs(model, docs: list[np.ndarray], seq_len: int, batch_size: int, lead: list[int], pad_id: int,
               device) -> list[np.ndarray]:
    """Per-token scores of every document (see the module doc), float32."""
    hooks = ReceivedAttention(model)
    out = [np.zeros(len(d), dtype=np.float32) for d in docs]
    win = sorted(windows(docs, seq_len - len(lead)), key=lambda w: w[2] - w[1])  # little padding
    try:
        for b in range(0, len(win), batch_size):
            batch = win[b:b + batch_size]
            T = len(lead) + max(e - s for _, s, e in batch)
            ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), T), dtype=torch.long)
            for k, (d, s, e) in enumerate(batch):
                ids[k, :len(lead) + e - s] = torch.as_tensor(lead + docs[d][s:e].tolist())
                mask[k, :len(lead) + e - s] = 1
            scores = hooks(model, ids.to(device), mask.to(device)).numpy()
            for k, (d, s, e) in enumerate(batch):
                out[d][s:e] = scores[k, len(lead):len(lead) + e - s]
    finally:
        hooks.remove()
    return out


# --- entity / object marks (for the report's enrichment check) --------------------------------

def load_pair(large, small):
    """Both models (fp32, eval) and the large one's tokenizer; their tokenizers must be one."""
    from .methods import load_checkpoint

    (lm, ltok), (sm, stok) = load_checkpoint(large), load_checkpoint(small)
    if tokenizer_fingerprint(ltok) != tokenizer_fingerprint(stok):
        raise InputError(f"{large} and {small} have different tokenizers: attention contrast compares the "
                         "two models token by token, so they must share one (same family at two sizes)")
    return lm.float().eval(), sm.float().eval(), ltok


def run(params: dict, large, small, tokens, tagged, probes=None, period=1, out="attention", corpus=None) -> None:
    from .models import device

    p = schema.fill("attention", params, where="attention params")
    no_probes(probes, "attention")
    p.pop("small_model", None)
    period, dev = int(period), device()
    lm, sm, tokenizer = load_pair(large, small)
    toks = load_tokens(tokens, tokenizer)
    rows = toks.select(period=period, split="train")
    if rows.empty:
        raise InputError(f"{toks.path}/docs.parquet: no rows with period == {period} and split == 'train'")
    docs = toks.docs_of(rows)
    max_pos = min(getattr(m.config, "n_positions", None) or m.config.max_position_embeddings for m in (lm, sm))
    seq_len = min(p["seq_len"] or max_pos, max_pos)
    lead, pad = toks.meta["leading_special_ids"], toks.meta["pad_id"] or 0
    n_tok = int(sum(len(d) for d in docs))
    started, result = time.time(), {}
    for name, model in (("large", lm), ("small", sm)):
        model.to(dev)
        result[name] = np.concatenate(score_docs(model, docs, seq_len, p["batch_size"], lead, pad, dev))
        model.cpu()
    elapsed = time.time() - started
    texts, spans = spans_of(rows, tagged, corpus, period)
    marked = np.concatenate(marks(tokenizer, texts, docs, spans))
    with atomic_output(out) as tmp:
        np.save(tmp / "large.npy", result["large"])
        np.save(tmp / "small.npy", result["small"])
        np.save(tmp / "marked.npy", marked)
        write_json({"period": period, "n_docs": len(docs), "n_tokens": n_tok, "tokenizer": toks.meta["tokenizer"],
                    "large_model": str(large), "small_model": str(small), "seq_len": seq_len,
                    "device": str(dev), "score_time_s": round(elapsed, 2),
                    "tokens_per_s": round(2 * n_tok / max(elapsed, 1e-9), 1)}, tmp / "meta.json")
    log.info("attention P%d: %d documents, %d tokens scored by 2 models in %.1f s; %.1f%% marked entity/object",
             period, len(docs), n_tok, elapsed, 100 * marked.mean() if n_tok else 0)


