"""Facts about entities that several stages share: their aliases and the articles
written about them (the tagging stage finds entity status with them, the probes stage
checks probe objects and statements against them)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def alias_list(value) -> list[str]:
    """The aliases cell as a list: parquet gives numpy arrays, csv/json may give None."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, str):
        return [value]
    return [str(a) for a in value]


def subject_articles(docs: pd.DataFrame, entities: pd.DataFrame | None,
                     triples: pd.DataFrame | None = None) -> dict[int, dict[str, str]]:
    """{snapshot: {entity or subject id: article text}}: the full documents whose title is
    the entity's name or an alias (and, given `triples`, a triple subject's name, which
    claims first, or whose doc_id is the subject_id). Several such documents
    (paraphrases) are joined in doc_id order; the first claim on a title wins."""
    owner: dict[str, str] = {}
    sids: set[str] = set()
    if triples is not None:
        for sid, subject in triples[["subject_id", "subject"]].drop_duplicates().itertuples(index=False):
            owner.setdefault(str(subject), str(sid))
        sids = set(triples["subject_id"].astype(str))
    if entities is not None and len(entities):
        aliases = entities["aliases"] if "aliases" in entities else [None] * len(entities)
        for eid, name, alias_cell in zip(entities["entity_id"].astype(str), entities["name"], aliases):
            for surface in [name, *alias_list(alias_cell)]:
                owner.setdefault(str(surface), eid)  # names are listed before aliases
    full = docs[docs["kind"] == "full"].sort_values(["snapshot", "doc_id"])
    out: dict[int, dict[str, str]] = {}
    for snap, doc_id, title, text in full[["snapshot", "doc_id", "title", "text"]].itertuples(index=False):
        eid = owner.get(str(title), str(doc_id) if str(doc_id) in sids else None)
        if eid is not None:
            arts = out.setdefault(int(snap), {})
            arts[eid] = f"{arts[eid]}\n{text}" if eid in arts else str(text)
    return out
