"""Stage `gradloc probes`: cloze probes per update period, in TWiki-Probes' form.

From the triples of snapshots k-1 and k: `unchanged` facts hold in both; `updated` facts
are new in k for a subject that already existed (changed object or new relation); `new`
facts belong to subjects first seen in k; `outdated` probes pair each kept updated fact
with the object it replaced (same prefix), to measure whether the old answer fades.
Period 0 holds every T0 fact as `unchanged`, for the base model's accuracy.

TWiki-Probes' filters, each a config option: the object must appear in the subject's
article of that snapshot (k-1 for outdated), objects longer than `max_object_words`
are dropped, and one subject / one relation may fill at most `subject_cap` /
`relation_cap` of a set. Caps allow max(1, ceil(cap * n)) probes each, n being the set's
size after the other filters: on small sets with few relations a 5% relation cap binds
hard (10 relations x 5% keep half of the set at most), so small worlds should raise the
caps or set `apply_caps: false`. The object-in-text filter is skipped (with a warning)
for a snapshot that has no subject article at all. One filter of our own
(`drop_seen_statements`): a probe whose whole statement occurs in its subject's text
would test verbatim recall, not knowledge, and is dropped; in the synthetic world this
removes exactly the probe-worded entities (see `gradloc.data.synthetic`).

Sources that ship probes (`probes_raw.parquet`: TemporalWiki, ECBD) give the sets of the
periods they cover as they are, minus over-long objects; `outdated` comes only from
triples (TWiki-Probes do not record the replaced object).
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import pandas as pd

from . import schema
from .core import stable_unit
from .factlevel import constant_objects
from .facts import FACT_COLUMNS, _facts, default_prefix, fact_sets, prefix_function, subject_articles  # noqa: F401 (re-exported)
from .io import InputError, atomic_output, read_json, read_table, write_json, write_parquet

log = logging.getLogger(__name__)

# `changed`: TemporalWiki's own set (new and updated facts together), kept as shipped when
# the corpus has no evidence to tell new from updated entities (data/temporalwiki.py).
SETS = ("unchanged", "updated", "new", "outdated", "changed")
PROBE_COLUMNS = ["probe_id", "period", "set", "subject_id", "subject", "relation", "object", "prefix", "statement",
                 "paraphrase", "subject_status", "constant_object"]


def with_defaults(params: dict | None) -> dict:
    return schema.fill("probes", params, where="probes")


# --- filters ---------------------------------------------------------------------------------

def _in_subject_text(facts: pd.DataFrame, articles: dict[str, str], needles) -> pd.Series:
    return pd.Series([x in articles.get(s, "") for s, x in zip(facts["subject_id"], needles)],
                     index=facts.index, dtype=bool)


def object_in_text(facts: pd.DataFrame, articles: dict[str, str]) -> pd.Series:
    """True where the object string occurs in the subject's article (TWiki's filter)."""
    return _in_subject_text(facts, articles, facts["object"])


def short_object(facts: pd.DataFrame, max_words: int) -> pd.Series:
    return facts["object"].str.split().str.len().le(max_words)


def cap(facts: pd.DataFrame, subject_cap: float, relation_cap: float, seed: int, tag: str,
        apply_caps: bool = True, max_per_set: int | None = None) -> pd.DataFrame:
    """Deterministic sample: visit facts in an order fixed by a stable hash of (seed, tag,
    fact), keep each while its subject and relation are under their caps
    (max(1, ceil(cap * n)) each), then keep at most max_per_set."""
    if facts.empty:
        return facts
    order = sorted(range(len(facts)), key=lambda i: stable_unit(
        f"{seed}|{tag}|{facts['subject_id'].iat[i]}|{facts['relation'].iat[i]}|{facts['object'].iat[i]}"))
    n = len(facts)
    max_subject = max(1, math.ceil(subject_cap * n)) if apply_caps else n
    max_relation = max(1, math.ceil(relation_cap * n)) if apply_caps else n
    per_subject: dict[str, int] = {}
    per_relation: dict[str, int] = {}
    keep = []
    for i in order:
        s, r = facts["subject_id"].iat[i], facts["relation"].iat[i]
        if per_subject.get(s, 0) < max_subject and per_relation.get(r, 0) < max_relation:
            per_subject[s] = per_subject.get(s, 0) + 1
            per_relation[r] = per_relation.get(r, 0) + 1
            keep.append(i)
    if max_per_set is not None:
        keep = keep[:max_per_set]
    return facts.iloc[sorted(keep)].reset_index(drop=True)


def statement_in_text(facts: pd.DataFrame, articles: dict[str, str], prefix_fn) -> pd.Series:
    """True where the probe's statement (prefix, space, object) occurs in the subject's article."""
    return _in_subject_text(facts, articles, [f"{prefix_fn(n, r)} {o}" for n, r, o in
                                              zip(facts["subject"], facts["relation"], facts["object"])])


def filter_period(sets: dict[str, pd.DataFrame], articles_now: dict, articles_before: dict,
                  p: dict, period: int, prefix_fn=None) -> dict[str, pd.DataFrame]:
    """Apply every filter to one period's candidate sets; outdated follows the kept
    updated facts, checked against the k-1 article. `prefix_fn` (the probes' wording)
    is needed for `drop_seen_statements`."""
    out = {}
    for name in ("unchanged", "updated", "new", *(["changed"] if "changed" in sets else [])):
        f = sets.get(name, pd.DataFrame(columns=FACT_COLUMNS))
        f = f[short_object(f, int(p["max_object_words"]))]
        if p["require_object_in_text"] and _has_articles(articles_now, period, period):
            f = f[object_in_text(f, articles_now)]
        if p["drop_seen_statements"] and prefix_fn is not None and len(f):
            f = f[~statement_in_text(f, articles_now, prefix_fn)]
        out[name] = cap(f.reset_index(drop=True), float(p["subject_cap"]), float(p["relation_cap"]),
                        int(p["seed"]), f"{period}|{name}", bool(p["apply_caps"]), p["max_per_set"])
    if "outdated" in sets:
        f = sets["outdated"].merge(out["updated"][["subject_id", "relation"]].drop_duplicates(),
                                   on=["subject_id", "relation"])
        f = f[short_object(f, int(p["max_object_words"]))]
        if p["require_object_in_text"] and _has_articles(articles_before, period, period - 1):
            f = f[object_in_text(f, articles_before)]
        out["outdated"] = f.reset_index(drop=True)
    return out


def _has_articles(articles: dict, period: int, snapshot: int) -> bool:
    """A snapshot without any subject article (TemporalWiki ships later periods as diffs
    only, and T0 only with its base dump) cannot check objects against text: say so and
    keep the facts rather than drop them all."""
    if not articles:
        log.warning("probes: P%d: no subject articles in snapshot %d, object-in-text filter skipped",
                    period, snapshot)
    return bool(articles)


# --- prefixes and assembly ---------------------------------------------------------------------

def paraphrase_function(source: str):
    """A second probe wording of the same question (the synthetic world's template 1), or
    None where the source has none: `paraphrase` is then empty."""
    if source == "synthetic":
        from .data.synthetic import probe_prefix
        return lambda subject, relation: probe_prefix(subject, relation, 1)
    return None


def _probe_id(period: int, name: str, subject_id: str, relation: str, obj: str) -> str:
    digest = hashlib.sha1(f"{subject_id}\x1f{relation}\x1f{obj}".encode()).hexdigest()[:12]
    return f"P{period}-{name}-{digest}"


def assemble(period: int, name: str, facts: pd.DataFrame, prefix_fn, paraphrase_fn=None,
             articles: dict | None = None) -> pd.DataFrame:
    """The probes of one set. `paraphrase` is the second wording's prefix (empty without
    one, and where that wording's statement occurs in the subject's text: it would test
    verbatim recall)."""
    if facts.empty:
        return pd.DataFrame(columns=PROBE_COLUMNS[:-2])
    df = facts[FACT_COLUMNS].astype(str).copy()
    if "prefix" in facts:  # shipped probes; an empty prefix falls back to subject + relation
        given = facts["prefix"].fillna("").astype(str)
        df["prefix"] = [g if g.strip() else default_prefix(s, r)
                        for g, s, r in zip(given, df["subject"], df["relation"])]
    else:
        df["prefix"] = [prefix_fn(s, r) for s, r in zip(df["subject"], df["relation"])]
    df["statement"] = df["prefix"] + " " + df["object"]
    df["paraphrase"] = ""
    if paraphrase_fn is not None and "prefix" not in facts:
        para = [paraphrase_fn(s, r) for s, r in zip(df["subject"], df["relation"])]
        seen = _in_subject_text(df, articles or {}, [f"{q} {o}" for q, o in zip(para, df["object"])])
        df["paraphrase"] = [("" if x else q) for q, x in zip(para, seen)]
    df.insert(0, "set", name)
    df.insert(0, "period", period)
    df.insert(0, "probe_id", [_probe_id(period, name, s, r, o)
                              for s, r, o in zip(df["subject_id"], df["relation"], df["object"])])
    return df[PROBE_COLUMNS[:-2]]


def subject_status(probes: pd.DataFrame, triples: pd.DataFrame) -> pd.Series:
    """Per probe, its subject's status in the probe's period: `new` (not in snapshot k-1),
    `updated` (a fact of it changed or was added in k), else `unchanged` (period 0: all
    unchanged). From the triples where they cover the period, else from the period's
    probe sets (shipped probes: a subject with a new / updated or changed probe)."""
    status = {}
    for k in sorted(set(probes["period"])):
        if k > 0 and (triples["snapshot"] == k).any():
            sets = fact_sets(triples, k)
            for name in ("updated", "new"):
                status.update({(k, s): name for s in sets[name]["subject_id"]})
        elif k > 0:
            p = probes[probes["period"] == k]
            for name, label in (("changed", "updated"), ("updated", "updated"), ("new", "new")):
                status.update({(k, s): label for s in p.loc[p["set"] == name, "subject_id"]})
    return pd.Series([status.get((k, s), "unchanged") for k, s in zip(probes["period"], probes["subject_id"])],
                     index=probes.index, dtype=object)


# --- sources ---------------------------------------------------------------------------------------

def raw_sets(raw: pd.DataFrame, entities: pd.DataFrame, period: int, path: Path) -> dict[str, pd.DataFrame]:
    """Candidate sets of one period from shipped probes (TemporalWiki, ECBD)."""
    bad = sorted(set(raw["set"]) - set(SETS))
    if bad:
        raise InputError(f"{path}: column 'set' has values {bad}; expected one of {list(SETS)}")
    ids = dict(zip(entities["name"].astype(str), entities["entity_id"].astype(str))) if len(entities) else {}
    r = raw[raw["period"] == period].astype({"subject": str, "relation": str, "object": str})
    r = r.assign(subject_id=[ids.get(s, s) for s in r["subject"]])
    r = r.drop_duplicates(["set", "subject_id", "relation", "object"])
    return {name: g.drop(columns=["set", "period"]).reset_index(drop=True) for name, g in r.groupby("set")}


def build_probes(p: dict, periods: list[int], triples: pd.DataFrame, articles: dict,
                 prefix_fn, raw: pd.DataFrame | None = None, entities: pd.DataFrame | None = None,
                 raw_path: Path = Path("probes_raw.parquet"), paraphrase_fn=None) -> pd.DataFrame:
    """All probes: period 0 (T0 facts) and every update period, with each subject's
    status in the period and the `constant_object` flag (`factlevel.constant_objects`)."""
    p = with_defaults(p)
    entities = entities if entities is not None else pd.DataFrame(columns=["entity_id", "name"])
    frames = []
    for k in [0, *periods]:
        if raw is not None and (raw["period"] == k).any():
            # Shipped probes were curated by their authors (TWiki-Probes already checked
            # objects against articles and capped subjects and relations; ECBD's
            # "relations" are span types, where a relation cap means nothing), and later
            # articles may exist only as diffs: only the word limit and max_per_set apply.
            sets = raw_sets(raw, entities, k, raw_path)
            q = {**p, "require_object_in_text": False, "apply_caps": False, "drop_seen_statements": False}
        elif k == 0:
            sets = {"unchanged": _facts(triples, 0)}
            q = p
        else:
            sets = fact_sets(triples, k)
            q = p
        n_candidates = sum(len(f) for f in sets.values())
        kept = filter_period(sets, articles.get(k, {}), articles.get(k - 1, {}), q, k, prefix_fn)
        n_kept = sum(len(f) for f in kept.values())
        log.info("probes: P%d %s", k, ", ".join(f"{s}={len(kept.get(s, []))}/{len(sets.get(s, []))}"
                                               for s in SETS))
        if n_kept == 0 and (k > 0 or n_candidates > 0):
            raise InputError(f"probes: period {k}: every probe set is empty after filtering "
                             f"({n_candidates} candidate facts; see max_object_words, "
                             f"require_object_in_text and the caps)")
        frames.extend(assemble(k, name, f, prefix_fn, paraphrase_fn, articles.get(k - 1 if name == "outdated" else k))
                      for name, f in kept.items())
    probes = pd.concat(frames, ignore_index=True).astype({"period": "int64"})
    probes["subject_status"] = subject_status(probes, triples)
    probes["constant_object"] = constant_objects(probes)
    return probes[PROBE_COLUMNS]


def run(params: dict, corpus: str, tagged: str, out: str) -> None:
    p = with_defaults(params)
    corpus = Path(corpus)
    manifest = read_json(corpus / "manifest.json")
    try:
        snapshots = sorted(int(s["index"]) for s in manifest["snapshots"])
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{corpus / 'manifest.json'}: 'snapshots' must be a list of {{index, label}}") from None
    periods = [k for k in snapshots if k > 0]

    raw_path = corpus / "probes_raw.parquet"
    raw = read_table(raw_path, ["period", "set", "subject", "relation", "object"]) if raw_path.exists() else None
    triples_path = corpus / "triples.parquet"
    if triples_path.exists():
        triples = read_table(triples_path, ["snapshot", "subject_id", "subject", "relation", "object"])
    elif raw is not None:
        triples = pd.DataFrame(columns=["snapshot", *FACT_COLUMNS])
    else:
        raise InputError(f"{triples_path}: file not found (and no probes_raw.parquet): no facts to probe")
    triples = triples.astype({"snapshot": int, "subject_id": str, "subject": str, "relation": str, "object": str})
    entities_path = corpus / "entities.parquet"
    entities = read_table(entities_path, ["entity_id", "name"]) if entities_path.exists() else None
    docs = read_table(corpus / "documents.parquet", ["doc_id", "snapshot", "title", "text", "kind"])
    articles = subject_articles(docs, entities if entities is not None else pd.DataFrame(
        columns=["entity_id", "name", "aliases"]), triples)

    source = manifest.get("source", "")
    probes = build_probes(p, periods, triples, articles, prefix_function(source), raw, entities, raw_path,
                          paraphrase_function(source))
    _check_against_tags(probes, Path(tagged))

    def count(df):
        return {str(k): {s: int(n) for s, n in g.groupby("set").size().items()} for k, g in df.groupby("period")}
    counts = count(probes)
    # Probes a constant guess answers (every subject of the period's set and relation has
    # the same object, e.g. every new organisation "was founded in 2019"): fact-level
    # metrics leave them out and count them here.
    shortcuts = count(probes[probes["constant_object"]])
    with atomic_output(out) as tmp:
        write_parquet(probes, tmp / "probes.parquet")
        write_json({"params": p, "counts": counts, "constant_object": shortcuts}, tmp / "manifest.json")
    log.info("probes: %d probes; %s; constant-object probes (left out of fact-level metrics): %s",
             len(probes), counts, shortcuts or "none")


def _check_against_tags(probes: pd.DataFrame, tagged: Path) -> None:
    """The tagger and the probes derive `new` from the same triples: say so if they
    disagree (e.g. the corpus changed between the two stages)."""
    path = tagged / "entity_status.parquet"
    if not path.exists():
        return
    status = read_table(path, ["period", "entity_id", "status"])
    new = probes[(probes["set"] == "new") & (probes["period"] > 0)]
    merged = new.merge(status, left_on=["period", "subject_id"], right_on=["period", "entity_id"], how="inner")
    odd = merged[merged["status"] != "new"]
    if len(odd):
        log.warning("probes: %d `new` probes whose subject the tagger does not call new (e.g. %s in P%d)",
                    len(odd), odd["subject_id"].iat[0], odd["period"].iat[0])
