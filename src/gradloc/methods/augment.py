"""Token-dropout augmentation (Gao et al., AAAI 2025): data only, like replay.

Each diff document is trained on together with `copies` augmented copies of it. In a
copy the token at rank r (0 = the largest score of the document) is kept with
probability `alpha * exp(-beta * r) + 1 - alpha`; the ranking is by `large - small`
attention score (`attention_contrast`) or by the large model's score alone
(`large_only`). Punctuation, whitespace-only and special tokens are never dropped.
Controls at equal volume:
- `random`: every droppable token is dropped with the same probability, the expected
  drop rate of the contrast copies of that document;
- `repeat`: no dropping; the document is repeated to the contrast copies' expected
  token count (rounded up or down at random, so the budget matches in expectation).

Dropping works on token ids: a dropped token is removed (the reference code replaces it
by spaces and re-tokenizes; with ids, removal is exact and needs no tokenizer). The
copies are a pure function of (seed, period, document index).
"""

from __future__ import annotations

import logging
import unicodedata

import numpy as np

from ..io import InputError
from ..parts import Part, register

log = logging.getLogger(__name__)


def protected_ids(tokenizer) -> np.ndarray:
    """bool per vocabulary id: special, punctuation-only or whitespace-only tokens."""
    vocab = len(tokenizer)
    keep = np.zeros(vocab, dtype=bool)
    special = set(tokenizer.all_special_ids)
    for i in range(vocab):
        text = tokenizer.decode([i]).strip()
        keep[i] = i in special or all(unicodedata.category(c)[0] in "PZ" for c in text)
    return keep


def keep_probabilities(score: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """Keep probability of each token from its rank by `score` (descending, ties by position)."""
    rank = np.empty(len(score), dtype=np.int64)
    rank[np.argsort(-score, kind="stable")] = np.arange(len(score))
    return alpha * np.exp(-beta * rank) + 1 - alpha


def keep_masks(doc, large, small, aug, protected, rng) -> list[np.ndarray]:
    """One bool keep mask per copy (`repeat`: all-True masks, as many as the budget gives)."""
    n, kind = len(doc), aug["kind"]
    droppable = ~protected[doc]
    contrast = keep_probabilities(large - small, aug["alpha"], aug["beta"])
    if kind == "large_only":
        p = keep_probabilities(large, aug["alpha"], aug["beta"])
    elif kind == "random":
        rate = (1 - contrast[droppable]).mean() if droppable.any() else 0.0
        p = np.full(n, 1 - rate)
    else:
        p = contrast
    p = np.where(droppable, p, 1.0)
    if kind == "repeat":
        expected = aug["copies"] * np.where(droppable, contrast, 1.0).sum() / max(n, 1)
        k = int(expected) + int(rng.random() < expected - int(expected))
        return [np.ones(n, dtype=bool)] * k
    return [rng.random(n) < p for _ in range(aug["copies"])]


def apply(docs: list[np.ndarray], scores: dict, aug: dict, protected: np.ndarray, seed: int, period: int):
    """(each document followed by its copies, the keep masks per document for inspection)."""
    out, masks = [], []
    for i, doc in enumerate(docs):
        rng = np.random.default_rng([seed, period, i])
        m = keep_masks(doc, scores["large"][i], scores["small"][i], aug, protected, rng) if len(doc) else []
        out.append(doc)
        out.extend(doc[k] for k in m)
        masks.append(m)
    return out, masks


def inspect(docs: list[np.ndarray], masks: list[list[np.ndarray]], marked: list[np.ndarray], protected, aug: dict,
            tokenizer) -> tuple[dict, str]:
    """(summary for metrics.json, Markdown): drop rate per copy, keep rate of entity/object
    tokens vs all droppable tokens (enrichment; ~1 for random dropout), one document marked."""
    n_copies = max((len(m) for m in masks), default=0)
    per_copy = []
    kept = {"marked": [0, 0], "other": [0, 0]}  # [kept, total] of droppable tokens
    for c in range(n_copies):
        dropped = total = 0
        for doc, m, mk in zip(docs, masks, marked):
            if c >= len(m):
                continue
            d = ~protected[doc]
            dropped += int((~m[c] & d).sum())
            total += int(d.sum())
            for key, sel in (("marked", d & (mk > 0)), ("other", d & (mk == 0))):
                kept[key][0] += int(m[c][sel].sum())
                kept[key][1] += int(sel.sum())
        per_copy.append(round(dropped / total, 4) if total else 0.0)
    rate = {k: (v[0] / v[1] if v[1] else float("nan")) for k, v in kept.items()}
    all_rate = (kept["marked"][0] + kept["other"][0]) / max(1, kept["marked"][1] + kept["other"][1])
    summary = {"kind": aug["kind"], "copies": n_copies, "drop_rate_per_copy": per_copy,
               "keep_rate_marked": round(rate["marked"], 4), "keep_rate_other": round(rate["other"], 4),
               "marked_enrichment": round(rate["marked"] / all_rate, 4) if all_rate else None,
               "tokens_original": int(sum(len(d) for d in docs)),
               "tokens_copies": int(sum(int(k.sum()) for m in masks for k in m))}
    lines = [f"# Token dropout: {aug['kind']}", "",
             f"- copies per document: {n_copies} (alpha {aug['alpha']}, beta {aug['beta']})",
             f"- drop rate of droppable tokens per copy: {', '.join(f'{r:.3f}' for r in per_copy) or '–'}",
             f"- keep rate of entity/object tokens {summary['keep_rate_marked']:.3f} vs other tokens "
             f"{summary['keep_rate_other']:.3f} (enrichment {summary['marked_enrichment']}; random dropout: ~1)",
             f"- tokens: {summary['tokens_original']} original + {summary['tokens_copies']} in copies", ""]
    pick = next((i for i, (d, m, mk) in enumerate(zip(docs, masks, marked)) if m and mk.any() and len(d) >= 16), None)
    if pick is not None:
        words = []
        for t, k, mk in zip(docs[pick].tolist(), masks[pick][0], marked[pick]):
            w = tokenizer.decode([t]).replace("\n", " ")
            core = w.strip()
            if core:
                core = f"**{core}**" if mk else core
                w = w[:len(w) - len(w.lstrip())] + (core if k else f"~~{core}~~")
            words.append(w)
        lines += ["First copy of one document (~~struck~~: dropped; **bold**: entity/object token):", "",
                  "> " + "".join(words).strip(), ""]
    return summary, "\n".join(lines)


def with_copies(items: list, masks: list[list[np.ndarray]], cut) -> list:
    """A per-document list expanded like `apply`'s output: each item, then cut(item, mask) per copy."""
    out = []
    for x, m in zip(items, masks):
        out.append(x)
        out.extend(cut(x, k) for k in m)
    return out


def _documents(entry, job):
    """Each document followed by its copies; the knowledge types and marks follow them."""
    from ..core import attention_scores

    path = job.inputs.get("attention")
    if not path:
        raise InputError("augment: needs --attention (the `gradloc attention` folder of this period)")
    scores = attention_scores(path, job.toks, job.period)
    protected = protected_ids(job.tokenizer)
    out, masks = apply(job.docs, scores, entry, protected, job.seed, job.period)
    summary, text = inspect(job.docs, masks, scores["marked"], protected, entry, job.tokenizer)
    log.info("augment %s: %d documents -> %d (%s)", entry["kind"], len(job.docs), len(out), summary)
    job.docs = out
    job.types = with_copies(job.types, masks, lambda t, k: t)
    job.marked = None if job.marked is None else with_copies(job.marked, masks, lambda m, k: m[k])
    job.extra["augment"], job.files["augment.md"] = summary, text


PART = register(Part("augment", needs=lambda entry, method: ["attention"], documents=_documents))
