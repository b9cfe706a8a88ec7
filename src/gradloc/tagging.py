"""Stage 3, `gradloc tag`: which entities each sequence mentions, and whether they are
new, updated or unchanged in the sequence's period.

Mentions come from a dictionary match (Aho-Corasick over entity names and aliases, word
boundaries, longest match wins): no NER, as in TemporalWiki where entities are Wikidata
items. Status comes from the triples: an entity is `new` in period k if it has no fact
in snapshot k-1 but has some in k, `updated` if its set of (relation, object) facts
changed from k-1 to k, else `unchanged`. Entities that never appear as a triple subject
fall back to their article: present in a snapshot if a `full` document there has the
entity's name (or an alias) as title, `new` if first present in k, `updated` if the
article's text changed from k-1 to k. Entities with neither triples nor an article are
background entities: `unchanged` in every period.
"""

from __future__ import annotations

import logging
from pathlib import Path

import ahocorasick
import numpy as np
import pandas as pd
from tqdm import tqdm

from . import schema
from .core import on_word_boundary
from .facts import alias_list, subject_articles
from .io import atomic_output, read_json, read_table, write_json, write_parquet

log = logging.getLogger(__name__)

STATUSES = ("new", "updated", "unchanged")
MENTION_COLUMNS = ["idx", "entity_id", "start", "end"]


def with_defaults(params: dict | None) -> dict:
    return schema.fill("tagging", params, where="tagging")


# --- mention finding ---------------------------------------------------------------------

def _fold(text: str, case_sensitive: bool) -> str:
    """Lower-case for matching, keeping every character's offset: a few characters
    (e.g. 'İ') lower to two, and those are left as they are."""
    if case_sensitive:
        return text
    low = text.lower()
    if len(low) == len(text):
        return low
    return "".join(c if len(c.lower()) != 1 else c.lower() for c in text)


def build_automaton(entities: pd.DataFrame, min_alias_chars: int = 3,
                    case_sensitive: bool = True) -> ahocorasick.Automaton:
    """Surface string -> (length, entity ids). A string that is one entity's name and
    another's alias belongs to the name's owner; a string shared at the same rank (two
    entities with the same name) keeps all of them: without context we cannot choose."""
    surfaces: dict[str, tuple[int, list[str]]] = {}  # key -> (rank: 0 name, 1 alias; ids)
    aliases = entities["aliases"] if "aliases" in entities else [None] * len(entities)
    for eid, name, alias_cell in zip(entities["entity_id"].astype(str), entities["name"], aliases):
        for rank, surface in [(0, name)] + [(1, a) for a in alias_list(alias_cell)]:
            if not isinstance(surface, str):
                continue
            surface = surface.strip()
            if len(surface) < min_alias_chars:
                continue
            key = _fold(surface, case_sensitive)
            old_rank, ids = surfaces.get(key, (2, []))
            if rank < old_rank:
                surfaces[key] = (rank, [eid])
            elif rank == old_rank and eid not in ids:
                ids.append(eid)
    automaton = ahocorasick.Automaton()
    for key, (_, ids) in surfaces.items():
        automaton.add_word(key, (len(key), tuple(ids)))
    if surfaces:
        automaton.make_automaton()
    return automaton


def match_text(text: str, automaton: ahocorasick.Automaton, case_sensitive: bool = True) -> list[tuple]:
    """(start, end, entity ids) of the non-overlapping mentions in one text, the longest
    match winning where matches overlap (then the leftmost)."""
    if not text or automaton.kind != ahocorasick.AHOCORASICK:
        return []
    hay = _fold(text, case_sensitive)
    found = []
    for last, (n, ids) in automaton.iter(hay):
        start, end = last - n + 1, last + 1
        if on_word_boundary(text, start, end):
            found.append((start, end, ids))
    found.sort(key=lambda m: (m[0] - m[1], m[0]))
    taken = bytearray(len(text))
    kept = []
    for start, end, ids in found:
        if not any(taken[start:end]):
            taken[start:end] = b"\x01" * (end - start)
            kept.append((start, end, ids))
    kept.sort()
    return kept


def find_mentions(texts: list[str], entities: pd.DataFrame, min_alias_chars: int = 3,
                  case_sensitive: bool = True) -> pd.DataFrame:
    """Entity mentions in each text: columns idx (index into texts), entity_id, start,
    end (character span, end exclusive). A span shared by several entities (same name)
    gives one row per entity."""
    automaton = build_automaton(entities, min_alias_chars, case_sensitive)
    rows = []
    for idx, text in enumerate(tqdm(texts, desc="tagging", leave=False, mininterval=2)):
        for start, end, ids in match_text(text, automaton, case_sensitive):
            rows.extend((idx, eid, start, end) for eid in ids)
    return pd.DataFrame(rows, columns=MENTION_COLUMNS).astype(
        {"idx": "int64", "entity_id": "str", "start": "int64", "end": "int64"})


# --- entity status -----------------------------------------------------------------------

def _facts_by_snapshot(triples: pd.DataFrame) -> dict[int, dict[str, frozenset]]:
    """{snapshot: {subject_id: {(relation, object), ...}}}."""
    out: dict[int, dict[str, frozenset]] = {}
    if triples.empty:
        return out
    t = triples.astype({"snapshot": int, "subject_id": str, "relation": str, "object": str})
    for (snap, sid), g in t.groupby(["snapshot", "subject_id"], sort=False):
        out.setdefault(int(snap), {})[sid] = frozenset(zip(g["relation"], g["object"]))
    return out


def entity_status(triples: pd.DataFrame, docs: pd.DataFrame, entities: pd.DataFrame,
                  periods: list[int]) -> pd.DataFrame:
    """Columns period, entity_id, status for every entity in the inventory or the
    triples' subjects, and every period (0 included: everything is `unchanged` at T0)."""
    facts = _facts_by_snapshot(triples)
    with_triples = set().union(*facts.values()) if facts else set()
    articles = subject_articles(docs, entities)
    ids = sorted(set(entities["entity_id"].astype(str)) | with_triples)
    rows = [(0, eid, "unchanged") for eid in ids]
    for k in periods:
        for eid in ids:
            # Entities with triples are judged by their facts, the rest by their article.
            state = facts if eid in with_triples else articles
            before, now = state.get(k - 1, {}).get(eid), state.get(k, {}).get(eid)
            if now is not None and before is None:
                status = "new"
            elif now is not None and now != before:
                status = "updated"
            else:
                status = "unchanged"
            rows.append((k, eid, status))
    return pd.DataFrame(rows, columns=["period", "entity_id", "status"]).astype(
        {"period": "int64", "entity_id": "str", "status": "str"})


# --- sequences -----------------------------------------------------------------------------

def tag_sequences(seqs: pd.DataFrame, entities: pd.DataFrame, status: pd.DataFrame,
                  min_alias_chars: int = 3, case_sensitive: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(sequences with knowledge_type and n_new/n_updated/n_unchanged, mentions with status)."""
    seqs = seqs.reset_index(drop=True)
    found = find_mentions(seqs["text"].tolist(), entities, min_alias_chars, case_sensitive)
    mentions = pd.DataFrame({
        "seq_id": seqs["seq_id"].to_numpy()[found["idx"].to_numpy()],
        "period": seqs["period"].to_numpy()[found["idx"].to_numpy()].astype("int64"),
        "entity_id": found["entity_id"].to_numpy(),
        "start": found["start"].to_numpy(), "end": found["end"].to_numpy(),
    })
    mentions = mentions.merge(status, on=["period", "entity_id"], how="left")
    # An inventory entity always has a status; guard against a period outside the table.
    mentions["status"] = mentions["status"].fillna("unchanged").astype(str)

    # Counts of distinct entities per status, so one entity named five times counts once.
    distinct = mentions.drop_duplicates(["seq_id", "entity_id"])
    counts = distinct.groupby(["seq_id", "status"]).size().unstack(fill_value=0)
    counts = counts.reindex(columns=list(STATUSES), fill_value=0)
    counts.columns = [f"n_{s}" for s in STATUSES]
    out = seqs.merge(counts, left_on="seq_id", right_index=True, how="left")
    for s in STATUSES:
        out[f"n_{s}"] = out[f"n_{s}"].fillna(0).astype("int64")
    out["knowledge_type"] = np.select(
        [out["n_new"] > 0, out["n_updated"] > 0, out["n_unchanged"] > 0],
        ["new", "updated", "unchanged"], default="none")
    out["knowledge_type"] = out["knowledge_type"].astype(str)
    return out, mentions


def load_entities(corpus: str | Path) -> pd.DataFrame:
    entities = read_table(Path(corpus) / "entities.parquet", ["entity_id", "name"])
    entities["entity_id"] = entities["entity_id"].astype(str)
    return entities


def load_triples(corpus: str | Path) -> pd.DataFrame:
    """The corpus triples, or an empty table for sources without any (local text)."""
    path = Path(corpus) / "triples.parquet"
    if not path.exists():
        log.warning("%s not found: entity status comes from article titles only", path)
        return pd.DataFrame(columns=["snapshot", "subject_id", "relation", "object"])
    return read_table(path, ["snapshot", "subject_id", "relation", "object"])


def run(params: dict, corpus: str, split: str, out: str) -> None:
    p = with_defaults(params)
    entities = load_entities(corpus)
    triples = load_triples(corpus)
    docs = read_table(Path(corpus) / "documents.parquet", ["doc_id", "snapshot", "title", "text", "kind"])
    seqs = read_table(Path(split) / "sequences.parquet", ["seq_id", "period", "split", "doc_id", "origin", "text"])
    manifest = read_json(Path(split) / "manifest.json")
    periods = [int(x["index"]) for x in manifest.get("periods", [])]

    status = entity_status(triples, docs, entities, periods)
    tagged, mentions = tag_sequences(seqs, entities, status, int(p["min_alias_chars"]), bool(p["case_sensitive"]))
    counts = _counts(tagged, status)
    with atomic_output(out) as tmp:
        write_parquet(tagged, tmp / "sequences.parquet")
        write_parquet(mentions, tmp / "mentions.parquet")
        write_parquet(status, tmp / "entity_status.parquet")
        write_json({"params": p, "counts": counts}, tmp / "manifest.json")
    for k, by_type in counts["sequences"].items():
        log.info("tag: P%s sequences by knowledge type: %s", k, by_type)
    log.info("tag: %d sequences, %d mentions of %d entities", len(tagged), len(mentions),
             mentions["entity_id"].nunique())


def _counts(tagged: pd.DataFrame, status: pd.DataFrame) -> dict:
    seq = tagged.groupby(["period", "knowledge_type"]).size()
    ent = status.groupby(["period", "status"]).size()
    return {
        "sequences": {str(k): {t: int(n) for t, n in g.droplevel(0).items()} for k, g in seq.groupby(level=0)},
        "entities": {str(k): {t: int(n) for t, n in g.droplevel(0).items()} for k, g in ent.groupby(level=0)},
    }
