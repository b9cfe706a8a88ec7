"""Probe scoring and perplexity, shared by the base model's metrics and evaluation.

Object scoring: the model reads the probe's `prefix` and we sum log p of the object
tokens. Prefix and object are tokenized *separately*: ids(prefix) + ids(" " + object),
so the boundary is the same for every model and every probe, and the object's tokens
are exactly the ones scored (tokenizing the joined statement could merge the space or
the object's first characters into the prefix's last token). The prefix gets the
tokenizer's own leading special tokens (BOS for Llama-style tokenizers, none for
GPT-2); an empty prefix is replaced by BOS (or EOS) so the first object token has a
context.

Statement scoring (TemporalWiki's way): the whole `statement` string, tokenized as
the tokenizer does by default, scoring every token after the first.

top1: greedy decoding of len(object tokens) tokens after the prefix reproduces the
object tokens exactly. Greedy decoding matches token k iff the argmax given prefix +
object[:k] is object[k], so this is read off the same teacher-forced forward pass
(argmax at every object position equals the object token) with no generation loop.

Batches use right padding and an attention mask; with a causal model the padding
never influences real positions, so numbers do not depend on the batch size (up to
float rounding). Sequences are sorted by length to keep padding small.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .io import NonFiniteError, require_columns
from .models import max_positions

PROBE_COLUMNS = ["probe_id", "set", "prefix", "object", "statement"]
SCORE_COLUMNS = ["probe_id", "set", "object_logprob", "object_tokens", "statement_logprob",
                 "statement_tokens", "top1"]


def leading_special_ids(tokenizer) -> list[int]:
    """Ids the tokenizer puts before text by default (e.g. [BOS] for Llama, [] for GPT-2)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def _start_id(tokenizer) -> int:
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("tokenizer has neither BOS nor EOS: cannot score a probe with an empty prefix")


def encode_probe(tokenizer, prefix: str, obj: str, max_len: int | None = None) -> tuple[list[int], int]:
    """(ids of prefix + " " + object, number of object tokens at the end)."""
    prefix_ids = leading_special_ids(tokenizer) + tokenizer(prefix, add_special_tokens=False)["input_ids"]
    if not prefix_ids:
        prefix_ids = [_start_id(tokenizer)]
    obj_ids = tokenizer(" " + obj, add_special_tokens=False)["input_ids"]
    if max_len is not None and len(prefix_ids) + len(obj_ids) > max_len:
        # keep the object and the prefix's end (its last words are the most informative)
        obj_ids = obj_ids[:max_len - 1]
        prefix_ids = prefix_ids[-(max_len - len(obj_ids)):]
    return prefix_ids + obj_ids, len(obj_ids)


def encode_text(tokenizer, text: str, max_len: int | None = None) -> list[list[int]]:
    """Default tokenization of a text, cut into windows of at most max_len tokens."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if max_len is None or len(ids) <= max_len:
        return [ids]
    return [ids[i:i + max_len] for i in range(0, len(ids), max_len)]


def pad_batch(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return tid


@torch.no_grad()
def token_logprobs(model, tokenizer, seqs: list[list[int]], batch_size: int, desc: str | None = None):
    """For each id sequence: (log p of tokens 1..n-1 given their prefix, argmax
    prediction for tokens 1..n-1), as float64 / int64 numpy arrays."""
    device = next(model.parameters()).device
    pad_id = _pad_id(tokenizer)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    logps: list = [None] * len(seqs)
    preds: list = [None] * len(seqs)
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, leave=False):
        idx = order[start:start + batch_size]
        ids, mask = pad_batch([seqs[i] for i in idx], pad_id, device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = F.log_softmax(logits[:, :-1], dim=-1)
        target = ids[:, 1:]
        lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).double().cpu().numpy()
        am = logits[:, :-1].argmax(-1).cpu().numpy()
        for row, i in enumerate(idx):
            n = len(seqs[i]) - 1
            logps[i], preds[i] = lp[row, :n], am[row, :n]
    model.train(was_training)
    return logps, preds


def score_probes(model, tokenizer, probes_df: pd.DataFrame, batch_size: int = 32,
                 progress: bool = True) -> pd.DataFrame:
    """One row per probe: probe_id, set, object_logprob, object_tokens,
    statement_logprob, statement_tokens, top1 (see the module docstring)."""
    require_columns(probes_df, PROBE_COLUMNS, "probes")
    if probes_df.empty:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(
            SCORE_COLUMNS, ["str", "str", "float64", "int64", "float64", "int64", "bool"])})
    max_len = max_positions(model)
    obj_seqs, n_obj = [], []
    for prefix, obj in zip(probes_df["prefix"].fillna(""), probes_df["object"].astype(str)):
        ids, k = encode_probe(tokenizer, prefix, obj, max_len)
        obj_seqs.append(ids)
        n_obj.append(k)
    stmt_seqs = [encode_text(tokenizer, s, max_len)[0] for s in probes_df["statement"].astype(str)]

    obj_lp, obj_pred = token_logprobs(model, tokenizer, obj_seqs, batch_size, "objects" if progress else None)
    stmt_lp, _ = token_logprobs(model, tokenizer, stmt_seqs, batch_size, "statements" if progress else None)

    rows = []
    for i, (seq, k) in enumerate(zip(obj_seqs, n_obj)):
        target = np.asarray(seq[len(seq) - k:])
        rows.append({
            "object_logprob": float(obj_lp[i][-k:].sum()) if k else 0.0,
            "object_tokens": k,
            "statement_logprob": float(stmt_lp[i].sum()),
            "statement_tokens": len(stmt_lp[i]),
            "top1": bool(k and np.array_equal(obj_pred[i][-k:], target)),
        })
    out = pd.DataFrame(rows)
    for col in ("object_logprob", "statement_logprob"):
        bad = ~np.isfinite(out[col].to_numpy())
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise NonFiniteError(
                f"probe {probes_df['probe_id'].iloc[i]} (set {probes_df['set'].iloc[i]}): non-finite "
                f"{col.replace('_', ' ')} {out[col].iloc[i]} ({int(bad.sum())} probe(s) in all)")
    out.insert(0, "set", probes_df["set"].astype(str).to_numpy())
    out.insert(0, "probe_id", probes_df["probe_id"].astype(str).to_numpy())
    return out[SCORE_COLUMNS]


def score_pairs(model, tokenizer, prefixes, objects, batch_size: int = 32,
                desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(summed log p of the object tokens, number of object tokens) of each (prefix,
    object) pair, encoded as `encode_probe` does; identical pairs are scored once, each
    distinct prefix and object tokenized once. A non-finite score is a NonFiniteError
    naming the pair."""
    max_len = max_positions(model)
    pairs = list(zip(pd.Series(prefixes).fillna("").astype(str), pd.Series(objects).astype(str)))
    unique = list(dict.fromkeys(pairs))
    lead = leading_special_ids(tokenizer)
    start = [_start_id(tokenizer)] if not lead else []

    def encode_all(texts):
        texts = list(dict.fromkeys(texts))
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return dict(zip(texts, ids))

    pre = encode_all([p for p, _ in unique])
    obj = encode_all([" " + o for _, o in unique])
    encoded = []  # (prefix ids, object ids) of each distinct pair
    for p, o in unique:
        prefix_ids, obj_ids = (lead + pre[p]) or start, obj[" " + o]
        if max_len is not None and len(prefix_ids) + len(obj_ids) > max_len:  # as encode_probe
            obj_ids = obj_ids[:max_len - 1]
            prefix_ids = prefix_ids[-(max_len - len(obj_ids)):]
        encoded.append((prefix_ids, obj_ids))
    if isinstance(model, PreTrainedModel) and all(o for _, o in encoded):  # each distinct prefix read once, its candidates from its cache
        groups: dict[tuple, list[int]] = {}
        for i, (prefix_ids, _) in enumerate(encoded):
            groups.setdefault(tuple(prefix_ids), []).append(i)
        scored = cached_object_logprobs(model, [(list(g), [encoded[i][1] for i in rows]) for g, rows in groups.items()],
                                        batch_size, desc)
        by_pair = {i: lp for rows, lps in zip(groups.values(), scored) for i, lp in zip(rows, lps)}
        lps = [by_pair[i] for i in range(len(encoded))]
    else:
        lps, _ = token_logprobs(model, tokenizer, [p + o for p, o in encoded], batch_size, desc)
    score = {}
    for pair, (_, obj_ids), lp in zip(unique, encoded, lps):
        k = len(obj_ids)
        total = float(lp[-k:].sum()) if k else 0.0
        if not math.isfinite(total):
            raise NonFiniteError(f"non-finite log-probability {total} of object {pair[1]!r} after {pair[0]!r}")
        score[pair] = (total, k)
    out = np.array([score[p] for p in pairs], dtype=np.float64).reshape(-1, 2)
    return out[:, 0], out[:, 1].astype(np.int64)


@torch.no_grad()
def cached_object_logprobs(model, groups: list[tuple[list[int], list[list[int]]]], batch_size: int,
                           desc: str | None = None) -> list[list[np.ndarray]]:
    """log p of each object token (float64 arrays) for groups (prefix ids, [object ids, ...]):
    every prefix is run once and its objects continue from its key/value cache, so a
    prefix shared by K candidates costs one pass, not K. Prefixes of one length are
    batched (no padding, so positions are those of the full sequence); objects are
    right-padded after them. The numbers equal `token_logprobs` on prefix + object up to
    float rounding. Needs a Hugging Face causal LM (its `cache` argument)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list = [[None] * len(objs) for _, objs in groups]
    by_len: dict[int, list[int]] = {}
    for g, (pre, _) in enumerate(groups):
        by_len.setdefault(len(pre), []).append(g)
    batches = []  # (group indices): one prefix length, at most batch_size objects (one group at least)
    for n in sorted(by_len):
        cur, rows = [], 0
        for g in by_len[n]:
            if cur and rows + len(groups[g][1]) > batch_size:
                batches.append(cur)
                cur, rows = [], 0
            cur.append(g)
            rows += len(groups[g][1])
        batches.append(cur)
    for gs in tqdm(batches, desc=desc, disable=desc is None, leave=False):
        pre = torch.tensor([groups[g][0] for g in gs], dtype=torch.long, device=device)
        res = model(input_ids=pre, use_cache=True, logits_to_keep=1)
        first = F.log_softmax(res.logits[:, -1].float(), dim=-1)  # the first object token's distribution
        owner = [(b, g, j) for b, g in enumerate(gs) for j in range(len(groups[g][1]))]
        objs = [groups[g][1][j] for _, g, j in owner]
        rows = torch.tensor([b for b, _, _ in owner], device=device)
        lp0 = first[rows, torch.tensor([o[0] for o in objs], device=device)].double().cpu().numpy()
        width = max(len(o) for o in objs) - 1  # an object's last token is never an input
        rest = None
        if width > 0:
            cache = res.cache
            cache.batch_select_indices(rows)
            ids, mask = pad_batch([o[:-1] or o[:1] for o in objs], 0, device)
            ids, mask = ids[:, :width], mask[:, :width]
            mask = torch.cat([torch.ones(len(objs), pre.shape[1], dtype=mask.dtype, device=device), mask], 1)
            logits = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True).logits.float()
            target = pad_batch([o[1:] or [0] for o in objs], 0, device)[0][:, :width]
            rest = F.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1).double().cpu().numpy()
        for r, (_, g, j) in enumerate(owner):
            k = len(objs[r])
            out[g][j] = np.concatenate([lp0[r:r + 1], rest[r, :k - 1] if k > 1 else []])
    model.train(was_training)
    return out


def perplexity(logprob_sum: float, n_tokens: int) -> float | None:
    """exp(-sum log p / tokens); None ("nothing measured", null in JSON) when nothing was
    scored. A non-finite sum is a NonFiniteError, never a perplexity."""
    if n_tokens <= 0:
        return None
    if not math.isfinite(logprob_sum):
        raise NonFiniteError(f"non-finite log-probability sum {logprob_sum} over {n_tokens} tokens")
    try:
        return math.exp(-logprob_sum / n_tokens)
    except OverflowError:
        raise NonFiniteError(f"perplexity overflows: mean log-probability {logprob_sum / n_tokens:.4g}") from None


def fmt_ppl(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def text_logprob(model, tokenizer, texts: list[str], batch_size: int = 32,
                 progress: bool = True) -> tuple[float, int]:
    """(sum of token log-probs, number of scored tokens) over texts; a text longer than
    the model's context is cut into windows, each scored after its first token."""
    max_len = max_positions(model)
    return ids_logprob(model, tokenizer, [w for t in texts for w in encode_text(tokenizer, t, max_len)],
                       batch_size, progress)


def ids_logprob(model, tokenizer, seqs: list[list[int]], batch_size: int = 32,
                progress: bool = True) -> tuple[float, int]:
    """`text_logprob` of already tokenized texts (the default tokenization: leading
    special ids included); a sequence longer than the model's context is cut into windows."""
    max_len = max_positions(model)
    if max_len:
        seqs = [s[i:i + max_len] for s in seqs for i in range(0, len(s), max_len)]
    seqs = [s for s in seqs if len(s) > 1]
    if not seqs:
        return 0.0, 0
    lps, _ = token_logprobs(model, tokenizer, seqs, batch_size, "held-out" if progress else None)
    bad = [i for i, lp in enumerate(lps) if not np.isfinite(lp).all()]
    if bad:
        raise NonFiniteError(f"held-out sequence {bad[0]}: non-finite log-probability ({len(bad)} sequence(s) in all)")
    return float(sum(lp.sum() for lp in lps)), int(sum(len(lp) for lp in lps))


def summarize(scores: pd.DataFrame) -> dict:
    """Per set: object_ppl, statement_ppl (token-weighted), top1 (accuracy), n."""
    out = {}
    for name, g in scores.groupby("set", sort=True):
        out[str(name)] = {
            "object_ppl": perplexity(g["object_logprob"].sum(), int(g["object_tokens"].sum())),
            "statement_ppl": perplexity(g["statement_logprob"].sum(), int(g["statement_tokens"].sum())),
            "top1": float(g["top1"].mean()),
            "n": int(len(g)),
        }
    return out
