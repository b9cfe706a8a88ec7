"""Stage 1, `gradloc download`: produce the `corpus/` folder (docs/formats.md) from the
source the config names: the synthetic world (offline default), TemporalWiki, ECBD or
local files. Every source's tables pass the same checks before anything is written,
and the folder appears only when complete (downloads and unpacked archives live in the
stage's temporary folder and are removed with it)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..io import InputError, atomic_output, write_json
from ..schema import fill
from . import DOC_COLUMNS, ENTITY_COLUMNS, PROBE_COLUMNS, TRIPLE_COLUMNS, ecbd, local, synthetic, temporalwiki
from .sources import Corpus, is_missing

log = logging.getLogger(__name__)

MODULES = {"synthetic": synthetic, "temporalwiki": temporalwiki, "ecbd": ecbd, "local": local}


def with_defaults(params: dict | None) -> dict:
    """The data slice with every source's defaults filled in from the schema, so a
    partial JSON given by hand works; unknown keys and sources are errors. The chosen
    source's module then checks what the schema cannot."""
    p = fill("data", params, where="data")
    p[p["source"]] = MODULES[p["source"]].with_defaults(p[p["source"]])
    return p


def load_synthetic(p: dict, work: Path) -> Corpus:
    tables = synthetic.generate(p)
    return Corpus(source="synthetic", labels=synthetic.labels(p), documents=tables["documents"],
                  triples=tables["triples"], entities=tables["entities"],
                  notes={"synthetic_year_of_T0": synthetic.BASE_YEAR})


LOADERS = {"synthetic": load_synthetic, "temporalwiki": temporalwiki.load, "ecbd": ecbd.load, "local": local.load}


# --- checks -----------------------------------------------------------------------------------

# Column types of docs/formats.md, written explicitly so that an empty table (ECBD has no
# triples) still has typed columns and every source gives the same schema.
_STR, _INT = pa.string(), pa.int64()
SCHEMAS = {
    "documents": pa.schema([("doc_id", _STR), ("snapshot", _INT), ("title", _STR), ("text", _STR), ("kind", _STR)]),
    "triples": pa.schema([("snapshot", _INT), ("subject_id", _STR), ("subject", _STR), ("relation", _STR),
                          ("object", _STR), ("object_id", _STR)]),
    "entities": pa.schema([("entity_id", _STR), ("name", _STR), ("aliases", pa.list_(_STR)), ("type", _STR)]),
    "probes_raw": pa.schema([("period", _INT), ("set", _STR), ("subject", _STR), ("relation", _STR),
                             ("object", _STR), ("prefix", _STR)]),
}
NULLABLE = {"object_id"}


def normalise(c: Corpus) -> Corpus:
    """Columns in the order of docs/formats.md, integer snapshots, documents sorted."""
    c.documents = (c.documents[DOC_COLUMNS].astype({"snapshot": "int64"})
                   .sort_values(["snapshot", "doc_id"], kind="stable").reset_index(drop=True))
    c.triples = c.triples[TRIPLE_COLUMNS].astype({"snapshot": "int64"}).reset_index(drop=True)
    c.entities = c.entities[ENTITY_COLUMNS].reset_index(drop=True)
    if c.probes is not None:
        c.probes = c.probes[PROBE_COLUMNS].astype({"period": "int64"}).reset_index(drop=True)
    return c


def write_table(df: pd.DataFrame, name: str, folder: Path) -> None:
    schema = SCHEMAS[name]
    columns = {}
    for f in schema:
        values = df[f.name].tolist()
        if pa.types.is_list(f.type):
            values = [[str(a) for a in v] for v in values]
        elif pa.types.is_string(f.type):
            values = [None if is_missing(v) and f.name in NULLABLE else ("" if is_missing(v) else str(v))
                      for v in values]
        else:
            values = [int(v) for v in values]
        columns[f.name] = pa.array(values, type=f.type)
    pq.write_table(pa.table(columns, schema=schema), folder / f"{name}.parquet")


def validate(c: Corpus) -> None:
    """The checks every later stage relies on; errors name the snapshot at fault."""
    n = len(c.labels)
    if n < 2:
        raise InputError(f"{c.source}: need T0 and at least one update snapshot, got {c.labels}")
    if c.documents.empty:
        raise InputError(f"{c.source}: empty corpus: no documents at all")
    counts = c.documents.groupby("snapshot").size()
    outside = sorted(set(counts.index) - set(range(n)))
    if outside:
        raise InputError(f"{c.source}: documents in snapshot(s) {outside}, but only 0..{n - 1} exist")
    for k in range(n):
        if k == 0 and c.base_missing:
            continue
        if counts.get(k, 0) == 0:
            raise InputError(f"{c.source}: snapshot {k} ({c.labels[k]}) has no documents")
    full = c.documents[c.documents["kind"] == "full"]
    dup = full.duplicated(["doc_id", "snapshot"])
    if dup.any():
        row = full[dup].iloc[0]
        raise InputError(f"{c.source}: doc_id {row['doc_id']!r} appears twice in snapshot {row['snapshot']}")
    bad = sorted(set(c.triples["snapshot"]) - set(range(n)))
    if bad:
        raise InputError(f"{c.source}: triples in snapshot(s) {bad}, but only 0..{n - 1} exist")


def entity_changes(triples: pd.DataFrame, n: int) -> dict:
    """Per update period, how many triple subjects are new, updated or unchanged (the
    definition the tagging stage uses), for the manifest and the log."""
    facts = {k: {} for k in range(n)}
    for k, s, r, o in zip(triples["snapshot"], triples["subject_id"], triples["relation"], triples["object"]):
        facts[int(k)].setdefault(s, set()).add((r, o))
    out = {}
    for k in range(1, n):
        before, now = facts[k - 1], facts[k]
        out[str(k)] = {"new": sum(s not in before for s in now),
                       "updated": sum(s in before and now[s] != before[s] for s in now),
                       "unchanged": sum(s in before and now[s] == before[s] for s in now)}
    return out


def manifest(c: Corpus, params: dict) -> dict:
    docs = c.documents.groupby("snapshot").size()
    m = {
        "source": c.source,
        "snapshots": [{"index": k, "label": label} for k, label in enumerate(c.labels)],
        "base_snapshot": "missing" if c.base_missing else "present",
        "counts": {
            "documents": {str(k): int(docs.get(k, 0)) for k in range(len(c.labels))},
            "triples": {str(k): int(v) for k, v in c.triples.groupby("snapshot").size().items()},
            "entities": int(len(c.entities)),
            "entity_changes": entity_changes(c.triples, len(c.labels)),
        },
        "params": {"source": params["source"], params["source"]: params[params["source"]]},
    }
    if c.probes is not None:
        m["counts"]["probes"] = {f"{k}/{s}": int(v) for (k, s), v in c.probes.groupby(["period", "set"]).size().items()}
    m.update({k: v for k, v in c.notes.items() if k not in m})
    return m


def summary(m: dict) -> str:
    docs = ", ".join(f"{s['label']}={m['counts']['documents'][str(s['index'])]}" for s in m["snapshots"])
    changes = "; ".join(f"P{k}: " + " ".join(f"{t}={v}" for t, v in c.items())
                        for k, c in m["counts"]["entity_changes"].items())
    probes = sum(m["counts"].get("probes", {}).values())
    return (f"download ({m['source']}): documents {docs}; {m['counts']['entities']} entities; "
            f"{sum(m['counts']['triples'].values())} triples; {probes} raw probes; entity changes {changes or '-'}")


def run(params: dict, out: str) -> None:
    p = with_defaults(params)
    with atomic_output(out) as tmp:
        work = tmp / "_work"  # downloads and unpacked archives: removed before the folder is published
        work.mkdir()
        corpus = normalise(LOADERS[p["source"]](p[p["source"]], work))
        validate(corpus)
        shutil.rmtree(work)
        write_table(corpus.documents, "documents", tmp)
        write_table(corpus.triples, "triples", tmp)
        write_table(corpus.entities, "entities", tmp)
        if corpus.probes is not None:
            write_table(corpus.probes, "probes_raw", tmp)
        m = manifest(corpus, p)
        write_json(m, tmp / "manifest.json")
    log.info(summary(m))
