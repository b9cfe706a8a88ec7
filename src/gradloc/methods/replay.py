"""Mix-Review's replay (He et al. 2021): base-snapshot text mixed into each epoch.

Data only: the blocks that `gradloc.train` shuffles in beside the period's diff blocks,
`ratio` x as many as the diff has, drawn afresh every epoch. `source: current` replays
only the base documents that no period up to the trained one changed (a document's id
is its seq_id without the period: "P0:E0001_2:0" -> "E0001_2"), so the replayed text
never restates a replaced value."""

from __future__ import annotations

import numpy as np
import torch

from ..engine import cut_blocks, with_eos
from ..io import InputError
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


def current_docs(toks, period: int) -> list[np.ndarray]:
    """The base documents whose document no period up to `period` changed."""
    rows = toks.docs
    changed = {doc_id(s) for s in rows.loc[(rows["period"] >= 1) & (rows["period"] <= period), "seq_id"]}
    base = toks.select(split="base")
    return toks.docs_of(base[[doc_id(s) not in changed for s in base["seq_id"]]])


def _mix(entry, job):
    """`ratio` x the diff's blocks of base text per epoch."""
    docs = current_docs(job.toks, job.period) if entry.get("source") == "current" else job.base_docs
    if not docs:
        raise InputError(f"replay: {job.toks.path} has no split == 'base' documents to replay"
                         + (" that the periods up to this one left unchanged" if job.base_docs else ""))
    n, base = round(entry["ratio"] * job.n_diff), with_eos(docs, job.eos)
    return n, lambda rng: blocks(base, job.cfg["seq_len"], n, rng, job.pad_id)


PART = register(Part("replay", mix=_mix))
