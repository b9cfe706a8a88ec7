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
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import schema
from .io import InputError, atomic_output, read_json, read_table, write_json
from .tokens import load as load_tokens
from .tokens import tokenizer_fingerprint

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

def marks(tokenizer, texts: list[str], ids: list[np.ndarray], spans: list[list[tuple[int, int]]]) -> list[np.ndarray]:
    """1 for each token overlapping one of its text's character spans."""
    out = []
    for text, doc, sp in zip(texts, ids, spans):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        m = np.zeros(len(doc), dtype=np.uint8)
        if list(enc["input_ids"]) == doc.tolist():  # else: unmarked (cannot align)
            for t, (a, b) in enumerate(enc["offset_mapping"]):
                m[t] = any(a < e and s < b for s, e in sp)
        out.append(m)
    return out


def spans_of(rows: pd.DataFrame, tagged, corpus, period: int) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """(text, [entity mention spans + fact object occurrences]) of each row's sequence.
    Fact objects are those of the corpus' triples of snapshot `period` whose subject the
    sequence mentions (`tagged/mentions.parquet`); every occurrence in the text counts.
    The evaluation probes are not read: no test answer marks a token. A corpus that ships
    its probes (`probes_raw.parquet`: TemporalWiki, ECBD) made its triples from them, so
    there only the mentions count."""
    from .facts import read_triples, subject_objects

    seqs = read_table(Path(tagged) / "sequences.parquet", ["seq_id", "text"]).set_index("seq_id")["text"]
    mentions = read_table(Path(tagged) / "mentions.parquet", ["seq_id", "entity_id", "start", "end"])
    by_seq = mentions.groupby("seq_id")[["start", "end"]].apply(lambda g: list(zip(g["start"], g["end"])))
    subjects = mentions.groupby("seq_id")["entity_id"].apply(lambda g: sorted(set(g.astype(str))))
    shipped = corpus and (Path(corpus) / "probes_raw.parquet").exists()
    objects_of = subject_objects(read_triples(corpus), int(period)) if corpus and not shipped else {}
    texts, spans = [], []
    for sid in rows["seq_id"]:
        text = str(seqs.get(sid, ""))
        sp = list(by_seq.get(sid, []))
        for o in sorted({o for e in subjects.get(sid, []) for o in objects_of.get(e, [])}):
            start = text.find(o)
            while start >= 0:
                sp.append((start, start + len(o)))
                start = text.find(o, start + 1)
        texts.append(text)
        spans.append(sp)
    return texts, spans


def no_probes(probes, stage: str) -> None:
    """The old `--probes` input: refused, naming what replaced it."""
    if probes:
        raise InputError(f"{stage}: --probes is no longer read (the marks must not see the evaluation probes' "
                         "objects); pass --corpus (the corpus folder: its triples give the fact objects)")


# --- the stage ------------------------------------------------------------------------------

def load_pair(large, small):
    """Both models (fp32, eval) and the large one's tokenizer; their tokenizers must be one."""
    from .methods import load_checkpoint

    (lm, ltok), (sm, stok) = load_checkpoint(large), load_checkpoint(small)
    if tokenizer_fingerprint(ltok) != tokenizer_fingerprint(stok):
        raise InputError(f"{large} and {small} have different tokenizers: attention contrast compares the "
                         "two models token by token, so they must share one (same family at two sizes)")
    return lm.float().eval(), sm.float().eval(), ltok


def run(params: dict, large, small, tokens, tagged, probes=None, period=1, out="attention", corpus=None) -> None:
    from .basemodel import device

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


def load(folder, toks, period: int) -> dict[str, list[np.ndarray]]:
    """The scores of `period`'s train documents, split per document (large, small, marked)."""
    folder = Path(folder)
    meta = read_json(folder / "meta.json")
    if meta["tokenizer"] != toks.meta["tokenizer"] or int(meta["period"]) != int(period):
        raise InputError(f"{folder}: scores of period {meta['period']} with tokenizer {meta['tokenizer']}, "
                         f"expected period {period} with {toks.meta['tokenizer']}; rerun `gradloc attention`")
    lengths = toks.select(period=period, split="train")["length"].to_numpy()
    cuts = np.cumsum(lengths)[:-1]
    out = {}
    for name in ("large", "small", "marked"):
        values = np.load(folder / f"{name}.npy")
        if len(values) != lengths.sum():
            raise InputError(f"{folder}/{name}.npy: {len(values)} values for {lengths.sum()} tokens")
        out[name] = np.split(values, cuts)
    return out
