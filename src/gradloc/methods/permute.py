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
import re

import pandas as pd


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
