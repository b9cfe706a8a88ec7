"""Your own corpus: documents in a jsonl, csv or parquet file, cut into snapshots by a
label column (each distinct value a snapshot, in sorted order) or by a timestamp column
and `boundaries` (T0 < b1 <= T1 < b2 <= T2 ...).

Rows with the same id in several snapshots are versions of one article (kind full), so
the split stage diffs them. Optional: a triples file (snapshot, subject, relation,
object; snapshot as the same labels, or a timestamp when boundaries are used; optional
subject_id, object_id) and an entity inventory (entity_id, name, aliases as a list or a
'|'-separated string, optional type). Without an inventory the entities are the
triples' subjects and entity-like objects.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..io import InputError, read_table
from ..schema import fill
from . import DOC_COLUMNS, ENTITY_COLUMNS, TRIPLE_COLUMNS
from .sources import Corpus, empty, entities_from_triples, entity_like, existing, frame, is_missing, parse_aliases


def with_defaults(params: dict | None) -> dict:
    p = fill("data.local", params, where="data.local")
    if p["boundaries"] is not None and (not isinstance(p["boundaries"], list) or not p["boundaries"]):
        raise InputError(f"data.local.boundaries: a non-empty list of timestamps or null, got {p['boundaries']!r}")
    return p


# --- snapshots --------------------------------------------------------------------------------

def _timestamps(values, where: str) -> pd.DatetimeIndex:
    """Parse timestamps (naive ones read as UTC, so they compare with aware ones)."""
    out = []
    for v in values:
        try:
            out.append(pd.Timestamp(v).tz_localize("UTC") if pd.Timestamp(v).tzinfo is None
                       else pd.Timestamp(v).tz_convert("UTC"))
        except (ValueError, TypeError):
            raise InputError(f"{where}: not a timestamp: {v!r}") from None
    return pd.DatetimeIndex(out)


def _sorted_labels(values) -> list:
    """Distinct snapshot labels in order: numerically if all are numbers, else as text."""
    distinct = list(dict.fromkeys(values))
    if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in distinct):
        return sorted(distinct)
    return sorted(distinct, key=str)


class Snapshots:
    """Maps a time value to its snapshot index, by label or by boundaries."""

    def __init__(self, p: dict, values):
        self.boundaries = None
        if p["boundaries"] is None:
            ordered = _sorted_labels(values)
            self.labels = [_label(v) for v in ordered]
        else:
            self.boundaries = _timestamps(p["boundaries"], "data.local.boundaries")
            if not self.boundaries.is_monotonic_increasing or self.boundaries.has_duplicates:
                raise InputError(f"data.local.boundaries: must increase strictly, got {p['boundaries']}")
            self.labels = ["T0"] + [str(b) for b in p["boundaries"]]
        self.index = {label: i for i, label in enumerate(self.labels)}

    def of(self, values, where: str) -> list[int]:
        if self.boundaries is None:
            out = []
            for v in values:
                if _label(v) not in self.index:
                    raise InputError(f"{where}: unknown snapshot {v!r}; the documents' snapshots are {self.labels}")
                out.append(self.index[_label(v)])
            return out
        out = []
        for v in values:  # a label (e.g. "T0") or a timestamp cut by the boundaries
            out.append(self.index[str(v)] if str(v) in self.index else
                       int(self.boundaries.searchsorted(_timestamps([v], where)[0], side="right")))
        return out


def _label(v) -> str:
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        v = int(v)
    return str(v)


# --- tables -----------------------------------------------------------------------------------

def load_documents(p: dict) -> tuple[pd.DataFrame, Snapshots, Path]:
    path = existing(p["documents"], "data.local.documents")
    fields = [p["text_field"], p["time_field"]] + [f for f in (p["id_field"], p["title_field"]) if f]
    df = read_table(path, fields)
    if df.empty:
        raise InputError(f"{path}: no documents")
    where = f"{path}, column {p['time_field']!r}"
    if df[p["time_field"]].map(is_missing).any():
        row = int(df[p["time_field"]].map(is_missing).to_numpy().argmax())
        raise InputError(f"{where}: empty value in row {row + 1}")
    snaps = Snapshots(p, df[p["time_field"]].tolist())
    snapshot = snaps.of(df[p["time_field"]].tolist(), where)
    rows = []
    for i, rec in enumerate(df.to_dict("records")):
        text = "" if is_missing(rec[p["text_field"]]) else str(rec[p["text_field"]])
        title = "" if not p["title_field"] or is_missing(rec[p["title_field"]]) else str(rec[p["title_field"]])
        if p["id_field"] and not is_missing(rec[p["id_field"]]):
            doc_id = _label(rec[p["id_field"]])
        else:
            doc_id = title or f"row{i + 1}"
        rows.append((doc_id, snapshot[i], title or doc_id, text, "full"))
    docs = frame(rows, DOC_COLUMNS)
    dup = docs.duplicated(["doc_id", "snapshot"])
    if dup.any():
        d = docs[dup].iloc[0]
        raise InputError(f"{path}: document id {d['doc_id']!r} appears twice in snapshot "
                         f"{snaps.labels[d['snapshot']]!r} (set data.local.id_field to a unique id column)")
    return docs, snaps, path


def load_inventory(p: dict) -> pd.DataFrame | None:
    if not p["entities"]:
        return None
    path = existing(p["entities"], "data.local.entities")
    df = read_table(path, ["entity_id", "name"])
    aliases = df["aliases"] if "aliases" in df.columns else [None] * len(df)
    types = df["type"] if "type" in df.columns else ["entity"] * len(df)
    rows = [(_label(e), str(n), parse_aliases(a), "entity" if is_missing(t) else str(t))
            for e, n, a, t in zip(df["entity_id"], df["name"], aliases, types)]
    return frame(rows, ENTITY_COLUMNS)


def load_triples(p: dict, snaps: Snapshots, inventory: pd.DataFrame | None) -> pd.DataFrame:
    if not p["triples"]:
        return empty(TRIPLE_COLUMNS)
    path = existing(p["triples"], "data.local.triples")
    df = read_table(path, ["snapshot", "subject", "relation", "object"])
    snapshot = snaps.of(df["snapshot"].tolist(), f"{path}, column 'snapshot'")
    lookup = {}
    if inventory is not None:
        for eid, name, aliases in zip(inventory["entity_id"], inventory["name"], inventory["aliases"]):
            for surface in [*aliases, name]:  # a name wins over another entity's equal alias
                lookup[surface] = eid
    subjects = {str(s) for s in df["subject"]}
    rows = []
    for i, rec in enumerate(df.to_dict("records")):
        s, o = str(rec["subject"]), str(rec["object"])
        sid = rec.get("subject_id")
        sid = lookup.get(s, s) if is_missing(sid) else _label(sid)
        oid = rec.get("object_id")
        if is_missing(oid):
            oid = lookup.get(o) if inventory is not None else (o if entity_like(o, subjects) else None)
        else:
            oid = _label(oid)
        rows.append((snapshot[i], sid, s, str(rec["relation"]), o, oid))
    return frame(rows, TRIPLE_COLUMNS)


def load(p: dict, work: Path) -> Corpus:
    p = with_defaults(p)
    docs, snaps, path = load_documents(p)
    inventory = load_inventory(p)
    triples = load_triples(p, snaps, inventory)
    if inventory is None:
        inventory = entities_from_triples(list(triples["subject"]), list(triples["object"]))
    return Corpus(source="local", labels=snaps.labels, documents=docs, triples=triples, entities=inventory,
                  notes={"documents_file": str(path)})
