"""Mix-Review's replay (He et al. 2021): base-snapshot text mixed into each epoch.

Data only: the blocks that `gradloc.train` shuffles in beside the period's diff blocks,
`ratio` x as many as the diff has, drawn afresh every epoch. `source: current` replays
the current snapshot of the base documents instead: each base document as the corpus'
latest full version up to the trained period (`documents.parquet`, kind full), so the
replayed text states the new value of a changed fact and never the replaced one. A
document that a period changed without a full version in the corpus (a corpus of diffs
only) is left out. A document's id is its seq_id without the period: "P0:E0001_2:0" ->
"E0001_2"."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..engine import cut_blocks, with_eos
from ..io import InputError, read_table
from ..parts import Part, register


def blocks(base_docs: list[np.ndarray], seq_len: int, n: int, rng: np.random.Generator, pad_id: int) -> dict:
    """`n` blocks of base-snapshot documents (token ids, each ending in EOS) taken in a
    random order until the budget is met (the base snapshot can be far larger than a
    diff); sampled with replacement when the base text is shorter than the budget."""
    order, docs, have = rng.permutation(len(base_docs)), [], 0
    for i in order:
        if have >= n * seq_len:
            break
        docs.append(base_docs[i])
        have += len(base_docs[i])
    out = cut_blocks(docs, seq_len, pad_id)
    if len(out["input_ids"]) < n:
        pick = torch.from_numpy(rng.integers(0, len(out["input_ids"]), n))
        out = {k: v[pick] for k, v in out.items()}
    return {k: v[:n] for k, v in out.items()}


def doc_id(seq_id: str) -> str:
    """The document of a `gradloc split` sequence id "P{k}:{doc_id}:{i}" (another id is its own document)."""
    parts = seq_id.split(":")
    return ":".join(parts[1:-1]) if len(parts) >= 3 and parts[0].startswith("P") else seq_id


def current_docs(toks, period: int, corpus, tokenizer) -> list[np.ndarray]:
    """The base documents as of `period`: the latest full version up to it from the
    corpus, tokenized; those changed later than their latest full version are left out."""
    if not corpus:
        raise InputError("replay source current: needs --corpus (its documents.parquet: the current versions)")
    docs = read_table(Path(corpus) / "documents.parquet", ["doc_id", "snapshot", "text", "kind"])
    docs = docs[(docs["kind"] == "full") & (docs["snapshot"] <= period)].astype({"doc_id": str})
    latest = docs.sort_values(["doc_id", "snapshot"], kind="stable").groupby("doc_id").tail(1).set_index("doc_id")
    rows = toks.docs
    changed: dict[str, int] = {}
    for sid, p in zip(rows["seq_id"], rows["period"]):
        if 1 <= p <= period:
            changed[doc_id(sid)] = max(changed.get(doc_id(sid), 0), int(p))
    base = list(dict.fromkeys(doc_id(s) for s in toks.select(split="base")["seq_id"]))
    keep = [d for d in base if d in latest.index and changed.get(d, 0) <= latest.at[d, "snapshot"]]
    return [np.asarray(tokenizer(latest.at[d, "text"])["input_ids"], dtype=np.int64) for d in keep]


def _mix(entry, job):
    """`ratio` x the diff's blocks of base text per epoch."""
    current = entry.get("source") == "current"
    docs = current_docs(job.toks, job.period, job.inputs.get("corpus"), job.tokenizer) if current else job.base_docs
    if not docs:
        raise InputError(f"replay: {job.toks.path} has no split == 'base' documents to replay"
                         + (" with a current version in the corpus" if current and job.base_docs else ""))
    n, base = round(entry["ratio"] * job.n_diff), with_eos(docs, job.eos)
    return n, lambda rng: blocks(base, job.cfg["seq_len"], n, rng, job.pad_id)


def _needs(entry, method):
    return ["corpus"] if entry.get("source") == "current" else []


PART = register(Part("replay", needs=_needs, mix=_mix))
