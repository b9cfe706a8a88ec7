"""Facts about entities that several stages share: their aliases and the articles
written about them (the tagging stage finds entity status with them, the probes stage
checks probe objects and statements against them), and the corpus' triples as fact sets
per period (the probes stage makes its probes from them; the subnet stage, salient-span
weighting and the attention stage's marks read them instead of the evaluation probes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .io import read_table

FACT_COLUMNS = ["subject_id", "subject", "relation", "object"]


def alias_list(value) -> list[str]:
    """The aliases cell as a list: parquet gives numpy arrays, csv/json may give None."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, str):
        return [value]
    return [str(a) for a in value]


def title_owners(entities: pd.DataFrame | None, triples: pd.DataFrame | None = None) -> dict[str, str]:
    """{document title: entity or subject id}: a triple subject's name claims first, then
    each entity's name and aliases; the first claim on a title wins."""
    owner: dict[str, str] = {}
    if triples is not None:
        for sid, subject in triples[["subject_id", "subject"]].drop_duplicates().itertuples(index=False):
            owner.setdefault(str(subject), str(sid))
    if entities is not None and len(entities):
        aliases = entities["aliases"] if "aliases" in entities else [None] * len(entities)
        for eid, name, alias_cell in zip(entities["entity_id"].astype(str), entities["name"], aliases):
            for surface in [name, *alias_list(alias_cell)]:
                owner.setdefault(str(surface), eid)  # names are listed before aliases
    return owner


def subject_articles(docs: pd.DataFrame, entities: pd.DataFrame | None,
                     triples: pd.DataFrame | None = None) -> dict[int, dict[str, str]]:
    """{snapshot: {entity or subject id: article text}}: the full documents whose title is
    the entity's name or an alias (and, given `triples`, a triple subject's name, which
    claims first, or whose doc_id is the subject_id). Several such documents
    (paraphrases) are joined in doc_id order; the first claim on a title wins."""
    owner = title_owners(entities, triples)
    sids = set(triples["subject_id"].astype(str)) if triples is not None else set()
    full = docs[docs["kind"] == "full"].sort_values(["snapshot", "doc_id"])
    out: dict[int, dict[str, str]] = {}
    for snap, doc_id, title, text in full[["snapshot", "doc_id", "title", "text"]].itertuples(index=False):
        eid = owner.get(str(title), str(doc_id) if str(doc_id) in sids else None)
        if eid is not None:
            arts = out.setdefault(int(snap), {})
            arts[eid] = f"{arts[eid]}\n{text}" if eid in arts else str(text)
    return out


# --- the corpus' triples as fact sets ----------------------------------------------------------

def default_prefix(subject: str, relation: str) -> str:
    """For triples without a template: TemporalWiki scores "subject relation object"."""
    return f"{subject} {relation.replace('_', ' ')}"


def prefix_function(source: str):
    """The probes' wording of a (subject, relation) cloze prefix for a corpus `source`."""
    if source == "synthetic":
        # The synthetic world phrases probes differently from its documents.
        from .data.synthetic import probe_prefix
        return probe_prefix
    return default_prefix


def read_triples(corpus) -> pd.DataFrame:
    """`corpus/triples.parquet` with string columns; an empty table when the corpus has
    none (TemporalWiki ships probes, not triples)."""
    path = Path(corpus) / "triples.parquet"
    if not path.exists():
        return pd.DataFrame(columns=["snapshot", *FACT_COLUMNS]).astype({"snapshot": int})
    t = read_table(path, ["snapshot", *FACT_COLUMNS])
    return t.astype({"snapshot": int, "subject_id": str, "subject": str, "relation": str, "object": str})


def _facts(triples: pd.DataFrame, snapshot: int) -> pd.DataFrame:
    t = triples[triples["snapshot"] == snapshot]
    return t[FACT_COLUMNS].drop_duplicates(["subject_id", "relation", "object"]).reset_index(drop=True)


def fact_sets(triples: pd.DataFrame, k: int) -> dict[str, pd.DataFrame]:
    """Candidate facts of update period k, before filters. `outdated` has one row per
    (subject, relation) that has an updated fact, holding the object(s) it replaced."""
    before, now = _facts(triples, k - 1), _facts(triples, k)
    key = ["subject_id", "relation", "object"]
    in_before = now.merge(before[key], on=key, how="left", indicator=True)["_merge"].eq("both").to_numpy()
    known_subject = now["subject_id"].isin(set(before["subject_id"])).to_numpy()
    sets = {
        "unchanged": now[in_before],
        "updated": now[~in_before & known_subject],
        "new": now[~known_subject],
    }
    # Old objects of an updated (subject, relation) that are gone in k. A relation that
    # is new for the subject has no old object, so no outdated probe.
    gone = before.merge(now[key], on=key, how="left", indicator=True)
    gone = gone[gone["_merge"] == "left_only"].drop(columns="_merge")
    sets["outdated"] = gone.merge(sets["updated"][["subject_id", "relation"]].drop_duplicates(),
                                  on=["subject_id", "relation"])
    return {s: df.reset_index(drop=True) for s, df in sets.items()}


def subject_objects(triples: pd.DataFrame, snapshot: int, min_chars: int = 2) -> dict[str, list[str]]:
    """{subject_id: the objects of its facts in `snapshot`} (objects of at least
    `min_chars` characters, sorted): what a sequence that mentions the subject may state."""
    f = _facts(triples, snapshot)
    f = f[f["object"].str.len() >= min_chars]
    return {str(s): sorted(set(g)) for s, g in f.groupby("subject_id")["object"]}
