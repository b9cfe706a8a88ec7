"""Mix-Review's replay (He et al. 2021): base-snapshot text mixed into each epoch.

Data only: the blocks that `gradloc.train` shuffles in beside the period's diff blocks,
`ratio` x as many as the diff has, drawn afresh every epoch."""

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


def _mix(entry, job):
    """`ratio` x the diff's blocks of base text per epoch."""
    if not job.base_docs:
        raise InputError(f"replay: {job.toks.path} has no split == 'base' documents to replay")
    n, base = round(entry["ratio"] * job.n_diff), with_eos(job.base_docs, job.eos)
    return n, lambda rng: blocks(base, job.cfg["seq_len"], n, rng, job.pad_id)


PART = register(Part("replay", mix=_mix))
