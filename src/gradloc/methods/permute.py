"""`permute_objects`: the negative control of uptake (issue 20).

The period's diff documents with every new or changed fact made wrong: within each
relation, each (subject, relation) of the period's new and updated facts (from the
corpus' triples, never from the probes) gets the object of another such fact, a seeded
cyclic shift, so the text keeps the same names and tokens but states wrong facts. A
method that trains on it learns that the new names exist and which words follow which
relation, not who works where: its object-perplexity "uptake" should stay large while
its fact-level uptake stays at chance. Objects shared by every fact of a relation (the
year every new organisation was founded) cannot be made wrong, which is one reason the
fact-level metrics leave constant-object probes out.

In each document, an occurrence of a fact's object (whole words) is replaced when the
fact's subject is mentioned in the same document (tagged mentions); the first fact in
(subject, relation) order claims an object string.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..facts import fact_sets, read_triples
from ..io import InputError, read_table
from ..parts import Part, register

log = logging.getLogger(__name__)


def wrong_objects(facts: pd.DataFrame, seed: int) -> dict[tuple[str, str], tuple[str, str]]:
    """{(subject_id, relation): (true object, wrong object)}: per relation, facts in a
    seeded order, each taking the object of the next one (the last the first's)."""
    out = {}
    for rel, g in facts.groupby("relation", sort=True):
        rows = sorted(zip(g["subject_id"].astype(str), g["object"].astype(str)),
                      key=lambda r: hashlib.sha1(f"{seed}\x1f{rel}\x1f{r[0]}\x1f{r[1]}".encode()).hexdigest())
        for i, (sid, obj) in enumerate(rows):
            out[(sid, str(rel))] = (obj, rows[(i + 1) % len(rows)][1])
    return out


def permute_texts(texts: list[str], mentioned: list[set[str]], mapping: dict) -> tuple[list[str], int]:
    """(texts with the objects of their mentioned subjects' facts replaced, replacements
    made). One regex pass per document, longest object first."""
    by_subject: dict[str, list[tuple[str, str]]] = {}
    for (sid, _rel), (true, wrong) in sorted(mapping.items()):
        if true != wrong:
            by_subject.setdefault(sid, []).append((true, wrong))
    out, n = [], 0
    for text, subjects in zip(texts, mentioned):
        repl: dict[str, str] = {}
        for sid in sorted(subjects):
            for true, wrong in by_subject.get(sid, []):
                repl.setdefault(true, wrong)
        if not repl:
            out.append(text)
            continue
        pattern = re.compile(r"(?<!\w)(" + "|".join(re.escape(t) for t in sorted(repl, key=len, reverse=True))
                             + r")(?!\w)")
        new, k = pattern.subn(lambda m: repl[m.group(1)], text)
        out.append(new)
        n += k
    return out, n


def permuted(rows, part: dict, corpus, tagged, tokenizer, period: int, dtype):
    """(the period's diff documents with the objects of its new and changed facts permuted
    within each relation, re-tokenized as `gradloc tokens` does; a summary)."""
    if not corpus or not tagged:
        raise InputError("permute_objects: needs --corpus (the triples) and --tagged (texts and mentions)")
    sets = fact_sets(read_triples(corpus), period)
    changed = pd.concat([sets["updated"], sets["new"]], ignore_index=True)
    if changed.empty:
        raise InputError(f"{corpus}/triples.parquet: no new or changed facts in snapshot {period}: nothing to permute")
    mapping = wrong_objects(changed, int(part["seed"]))
    seqs = read_table(Path(tagged) / "sequences.parquet", ["seq_id", "text"])
    text = dict(zip(seqs["seq_id"].astype(str), seqs["text"].astype(str)))
    mentions = read_table(Path(tagged) / "mentions.parquet", ["seq_id", "entity_id"])
    mentioned = mentions.groupby(mentions["seq_id"].astype(str))["entity_id"].agg(lambda x: set(map(str, x)))
    ids = rows["seq_id"].astype(str).tolist()
    texts, n = permute_texts([text[i] for i in ids], [mentioned.get(i, set()) for i in ids], mapping)
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]  # as `gradloc tokens`
    docs = [np.asarray(e, dtype=dtype) for e in encoded]
    wrong = sum(t != w for t, w in mapping.values())
    summary = {"facts": len(mapping), "facts_made_wrong": wrong, "replacements": n,
               "documents_changed": sum(a != b for a, b in zip(texts, (text[i] for i in ids)))}
    if n == 0:
        raise InputError(f"permute_objects: no object of the period's {len(mapping)} new or changed facts occurs in "
                         f"a document mentioning its subject ({tagged}): the control would equal full")
    log.info("permute_objects P%d: %s", period, summary)
    return docs, summary


def _documents(entry, job):
    job.docs, job.extra["permute_objects"] = permuted(job.rows, entry, job.inputs.get("corpus"), job.inputs.get("tagged"),
                                                      job.tokenizer, job.period, job.docs[0].dtype)


PART = register(Part("permute_objects", needs=lambda entry, method: ["tagged", "corpus"], documents=_documents))
