"""`gradloc probes`: probe sets from triples (unchanged/updated/new/outdated), each
filter, caps, shipped probes, determinism."""

import json

import pandas as pd
import pytest

from gradloc import probes
from gradloc.io import InputError

NO_CAPS = {"apply_caps": False}

TRIPLES = [
    # snapshot, subject_id, subject, relation, object
    (0, "al", "Alice", "employer", "Acme"), (0, "al", "Alice", "city", "Paris"),
    (1, "al", "Alice", "employer", "Beta Corp"), (1, "al", "Alice", "city", "Paris"),
    (1, "al", "Alice", "award", "Gold Medal"),                               # new relation: updated
    (0, "bo", "Bob", "city", "Rome"), (1, "bo", "Bob", "city", "Rome"),
    (0, "bo", "Bob", "motto", "Veni"),
    (1, "bo", "Bob", "motto", "one two three four five six seven"),         # too long: dropped
    (1, "ca", "Carol", "city", "Oslo"), (1, "ca", "Carol", "employer", "Delta"),  # new subject
    (1, "ca", "Carol", "pet", "Rex"),                                         # not in text: dropped
]
DOCS = [
    ("al", 0, "Alice", "Alice works for Acme. She lives in Paris."),
    ("bo", 0, "Bob", "Bob lives in Rome. His motto is Veni."),
    ("al", 1, "Alice", "Alice works for Beta Corp. She lives in Paris. She won the Gold Medal."),
    ("bo", 1, "Bob", "Bob lives in Rome. His motto is one two three four five six seven."),
    ("ca", 1, "Carol", "Carol lives in Oslo and works for Delta."),
]


def write_corpus(path, triples=TRIPLES, docs=DOCS, raw=None, source="local"):
    path.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(triples, columns=["snapshot", "subject_id", "subject", "relation", "object"]).to_parquet(
        path / "triples.parquet")
    pd.DataFrame([(d, s, t, x, "full") for d, s, t, x in docs],
                 columns=["doc_id", "snapshot", "title", "text", "kind"]).to_parquet(path / "documents.parquet")
    subjects = sorted({(t[1], t[2]) for t in triples})
    pd.DataFrame([{"entity_id": e, "name": n, "aliases": [], "type": "person"} for e, n in subjects]).to_parquet(
        path / "entities.parquet")
    n_snap = 1 + max([t[0] for t in triples] + [d[1] for d in docs])
    (path / "manifest.json").write_text(json.dumps(
        {"source": source, "snapshots": [{"index": i, "label": f"T{i}"} for i in range(n_snap)]}))
    if raw is not None:
        raw.to_parquet(path / "probes_raw.parquet")
    return path


def run_probes(tmp_path, params, **kw):
    corpus = write_corpus(tmp_path / "corpus", **kw)
    probes.run(params, corpus=str(corpus), tagged=str(tmp_path / "tagged"), out=str(tmp_path / "probes"))
    return pd.read_parquet(tmp_path / "probes" / "probes.parquet")


def facts(df, period, name):
    d = df[(df["period"] == period) & (df["set"] == name)]
    return sorted(zip(d["subject_id"], d["relation"], d["object"]))


def test_sets_and_filters(tmp_path):
    df = run_probes(tmp_path, NO_CAPS)
    assert facts(df, 0, "unchanged") == [("al", "city", "Paris"), ("al", "employer", "Acme"),
                                         ("bo", "city", "Rome"), ("bo", "motto", "Veni")]
    assert facts(df, 1, "unchanged") == [("al", "city", "Paris"), ("bo", "city", "Rome")]
    # Bob's 7-word motto is over max_object_words; Alice's award is a new relation.
    assert facts(df, 1, "updated") == [("al", "award", "Gold Medal"), ("al", "employer", "Beta Corp")]
    # Carol's pet is not in her article.
    assert facts(df, 1, "new") == [("ca", "city", "Oslo"), ("ca", "employer", "Delta")]
    # The old object of the updated employer fact; the new award relation has none.
    assert facts(df, 1, "outdated") == [("al", "employer", "Acme")]


def test_outdated_shares_the_updated_prefix(tmp_path):
    df = run_probes(tmp_path, NO_CAPS)
    upd = df[(df["period"] == 1) & (df["set"] == "updated") & (df["relation"] == "employer")].iloc[0]
    old = df[(df["period"] == 1) & (df["set"] == "outdated")].iloc[0]
    assert old["prefix"] == upd["prefix"] == "Alice employer"
    assert upd["statement"] == "Alice employer Beta Corp" and old["statement"] == "Alice employer Acme"
    assert df["probe_id"].is_unique


def test_filters_can_be_switched_off(tmp_path):
    df = run_probes(tmp_path, {**NO_CAPS, "require_object_in_text": False, "max_object_words": 10})
    assert ("ca", "pet", "Rex") in facts(df, 1, "new")
    assert ("bo", "motto", "one two three four five six seven") in facts(df, 1, "updated")
    # Bob's old motto, now paired with a kept updated fact.
    assert ("bo", "motto", "Veni") in facts(df, 1, "outdated")


def test_statements_seen_verbatim_are_dropped(tmp_path):
    # Bob's text says "Bob city Rome" word for word: that probe would test recall of a
    # sentence, not knowledge. Only that fact goes, in every period whose text holds it.
    docs = [(d, k, t, x + (" Bob city Rome." if d == "bo" else "")) for d, k, t, x in DOCS]
    df = run_probes(tmp_path, NO_CAPS, docs=docs)
    assert facts(df, 0, "unchanged") == [("al", "city", "Paris"), ("al", "employer", "Acme"), ("bo", "motto", "Veni")]
    assert facts(df, 1, "unchanged") == [("al", "city", "Paris")]
    kept = run_probes(tmp_path / "off", {**NO_CAPS, "drop_seen_statements": False}, docs=docs)
    assert ("bo", "city", "Rome") in facts(kept, 1, "unchanged")


def test_outdated_object_must_be_in_the_old_article(tmp_path):
    docs = [d if (d[0], d[1]) != ("al", 0) else ("al", 0, "Alice", "Alice lives in Paris.") for d in DOCS]
    df = run_probes(tmp_path, NO_CAPS, docs=docs)
    assert facts(df, 1, "outdated") == []
    assert facts(df, 0, "unchanged") == [("al", "city", "Paris"), ("bo", "city", "Rome"), ("bo", "motto", "Veni")]


def big_world(n_subjects=20, n_relations=4):
    triples, docs = [], []
    for s in range(n_subjects):
        objs = [f"Obj{s}x{r}" for r in range(n_relations)]
        for snap in (0, 1):
            triples += [(snap, f"s{s}", f"Subj{s}", f"rel{r}", objs[r]) for r in range(n_relations)]
            docs.append((f"s{s}", snap, f"Subj{s}", " ".join(objs)))
    # Period 1: all of T0 unchanged, plus one new subject with one fact.
    triples.append((1, "n0", "Newbie", "rel0", "Thing"))
    docs.append(("n0", 1, "Newbie", "Newbie likes Thing."))
    return triples, docs


def test_caps_bind_with_at_least_one(tmp_path):
    triples, docs = big_world()
    df = run_probes(tmp_path, {"subject_cap": 0.01, "relation_cap": 0.05}, triples=triples, docs=docs)
    p0 = df[(df["period"] == 0) & (df["set"] == "unchanged")]
    # n = 80 facts: at most ceil(0.8) = 1 per subject and ceil(4) = 4 per relation.
    assert p0.groupby("subject_id").size().max() == 1
    assert p0.groupby("relation").size().max() == 4
    assert len(p0) == 16
    # A set of one fact keeps its fact (at least one per subject / relation).
    assert facts(df, 1, "new") == [("n0", "rel0", "Thing")]
    # Looser caps keep more; no caps keep all.
    df2 = run_probes(tmp_path / "b", {"subject_cap": 0.05, "relation_cap": 0.5}, triples=triples, docs=docs)
    p0b = df2[(df2["period"] == 0) & (df2["set"] == "unchanged")]
    assert p0b.groupby("subject_id").size().max() == 4 and len(p0b) == 80
    df3 = run_probes(tmp_path / "c", {"apply_caps": False, "max_per_set": 7}, triples=triples, docs=docs)
    assert len(df3[(df3["period"] == 0)]) == 7


def test_deterministic_and_seeded(tmp_path):
    triples, docs = big_world()
    params = {"subject_cap": 0.01, "relation_cap": 0.05, "seed": 3}
    a = run_probes(tmp_path / "a", params, triples=triples, docs=docs)
    b = run_probes(tmp_path / "b", params, triples=triples[::-1], docs=docs[::-1])  # row order irrelevant
    pd.testing.assert_frame_equal(a.sort_values("probe_id").reset_index(drop=True),
                                  b.sort_values("probe_id").reset_index(drop=True))
    c = run_probes(tmp_path / "c", {**params, "seed": 4}, triples=triples, docs=docs)
    assert set(a["probe_id"]) != set(c["probe_id"])


def test_shipped_probes_are_used(tmp_path):
    raw = pd.DataFrame([
        (1, "updated", "Alice", "employer", "Beta Corp", "Alice now works for"),
        (1, "unchanged", "Bob", "city", "Rome", ""),
        (1, "unchanged", "Bob", "motto", "one two three four five six seven", ""),
    ], columns=["period", "set", "subject", "relation", "object", "prefix"])
    df = run_probes(tmp_path, NO_CAPS, raw=raw)
    p1 = df[df["period"] == 1].set_index("object")
    assert sorted(p1.index) == ["Beta Corp", "Rome"]  # the long object still goes
    assert p1.loc["Beta Corp", "statement"] == "Alice now works for Beta Corp"
    assert p1.loc["Rome", "prefix"] == "Bob city"  # empty prefix: "subject relation"
    assert p1.loc["Rome", "subject_id"] == "bo"  # name looked up in the inventory
    # Period 0 still comes from the triples.
    assert len(facts(df, 0, "unchanged")) == 4


def test_bad_shipped_set_name(tmp_path):
    # `changed` is a set (TemporalWiki's own); a typo of it is not.
    raw = pd.DataFrame([(1, "chanegd", "Alice", "employer", "Beta Corp", "")],
                       columns=["period", "set", "subject", "relation", "object", "prefix"])
    with pytest.raises(InputError, match="chanegd"):
        run_probes(tmp_path, NO_CAPS, raw=raw)


def test_empty_period_is_an_error(tmp_path):
    # No snapshot-1 article holds any object: period 0 is fine, period 1 has nothing left.
    docs = [d for d in DOCS if d[1] == 0] + [("al", 1, "Alice", "Nothing to see.")]
    with pytest.raises(InputError, match="period 1"):
        run_probes(tmp_path, NO_CAPS, docs=docs)
    assert not (tmp_path / "probes").exists()


def test_default_prefix_replaces_underscores():
    assert probes.default_prefix("Alice", "place_of_birth") == "Alice place of birth"


# --- on the synthetic world --------------------------------------------------------------------

def synthetic_corpus(path, **params):
    from gradloc.data.synthetic import generate
    world = generate(params)
    path.mkdir(parents=True)
    for name in ("documents", "triples", "entities"):
        world[name].to_parquet(path / f"{name}.parquet")
    n = world["documents"]["snapshot"].max() + 1
    (path / "manifest.json").write_text(json.dumps(
        {"source": "synthetic", "snapshots": [{"index": i, "label": f"T{i}"} for i in range(n)]}))
    return path, world


def test_synthetic_probes(tmp_path):
    from gradloc.data.synthetic import probe_prefix
    corpus, world = synthetic_corpus(tmp_path / "corpus")
    # The caps proposed for config/config.yaml: loose enough for a world of 17 relations.
    params = {"subject_cap": 0.05, "relation_cap": 0.25}
    probes.run(params, corpus=str(corpus), tagged=str(tmp_path / "tagged"), out=str(tmp_path / "probes"))
    df = pd.read_parquet(tmp_path / "probes" / "probes.parquet")
    sizes = df.groupby(["period", "set"]).size()
    for k in (1, 2):
        for name in set(probes.SETS) - {"changed"}:  # `changed`: TemporalWiki's, not made from triples
            assert sizes[k, name] >= 30, (k, name, sizes[k, name])
    # Probes use the generator's phrasing, which no document of a probed subject uses:
    # the probe-worded entities (those with an infobox) are never probed.
    assert (df["prefix"] == [probe_prefix(s, r) for s, r in zip(df["subject"], df["relation"])]).all()
    docs = world["documents"]
    worded = set(docs.loc[docs["doc_id"].str.endswith("_facts"), "doc_id"].str.rsplit("_", n=1).str[0])
    assert worded and not set(df["subject_id"]) & worded
    all_text = "\n".join(docs["text"])
    assert not any(p in all_text for p in df["prefix"].drop_duplicates().head(200))
    # The second wording (paraphrase efficacy) is the generator's template 1, and no probed
    # statement occurs in any document in either wording.
    assert (df["paraphrase"] == [probe_prefix(s, r, 1) for s, r in zip(df["subject"], df["relation"])]).all()
    for wording in ("prefix", "paraphrase"):
        assert not any(f"{q} {o}" in all_text for q, o in zip(df[wording], df["object"]))
    # Each subject's status in the period: new subjects' probes are `new`, updated ones'
    # `updated` and `outdated`; unchanged facts of an updated subject are "touched".
    later = df[df["period"] > 0]
    assert (later.loc[later["set"] == "new", "subject_status"] == "new").all()
    assert (later.loc[later["set"].isin(["updated", "outdated"]), "subject_status"] == "updated").all()
    tri = world["triples"]
    key = ["subject_id", "relation", "object"]

    def changed_subjects(k):
        now, before = tri[tri["snapshot"] == k], tri[tri["snapshot"] == k - 1]
        m = now.merge(before[key], on=key, how="left", indicator=True)
        return set(m.loc[m["_merge"] == "left_only", "subject_id"]) & set(before["subject_id"])

    unch = later[later["set"] == "unchanged"]
    expect = ["updated" if sid in changed_subjects(k) else "unchanged" for k, sid in zip(unch["period"],
                                                                                         unch["subject_id"])]
    assert (unch["subject_status"] == expect).all() and "updated" in expect and "unchanged" in expect
    assert (df[df["period"] == 0]["subject_status"] == "unchanged").all()
    # Shortcuts: a constant object of a period's set and relation is flagged, and counted.
    flagged = df[df["constant_object"]]
    for (k, name, rel), g in df.groupby(["period", "set", "relation"]):
        assert g["constant_object"].all() == (len(g) >= 2 and g["object"].nunique() == 1)
    manifest = json.loads((tmp_path / "probes" / "manifest.json").read_text())
    assert sum(n for sets in manifest["constant_object"].values() for n in sets.values()) == len(flagged)
    # Each outdated probe is the fact its updated probe replaced: same prefix, the old object.
    tri = world["triples"]
    for row in df[df["set"] == "outdated"].itertuples():
        upd = df[(df["period"] == row.period) & (df["set"] == "updated") & (df["subject_id"] == row.subject_id)
                 & (df["relation"] == row.relation)]
        assert len(upd) == 1 and upd["prefix"].iat[0] == row.prefix and upd["object"].iat[0] != row.object
        was = tri[(tri["snapshot"] == row.period - 1) & (tri["subject_id"] == row.subject_id)
                  & (tri["relation"] == row.relation)]["object"]
        assert was.tolist() == [row.object]
    # Tight TWiki caps keep fewer updated probes in a world this small.
    probes.run({}, corpus=str(corpus), tagged=str(tmp_path / "tagged"), out=str(tmp_path / "tight"))
    tight = pd.read_parquet(tmp_path / "tight" / "probes.parquet").groupby(["period", "set"]).size()
    assert tight[1, "updated"] < sizes[1, "updated"]


def test_synthetic_probes_through_the_cli(tmp_path):
    from gradloc.cli import main
    corpus = tmp_path / "corpus"
    data = {"source": "synthetic", "synthetic": {"n_entities": 60, "docs_per_entity": 1}}
    rc = [main(["download", "--params", json.dumps(data), "--out", str(corpus)]),
          main(["split", "--corpus", str(corpus), "--out", str(tmp_path / "split")]),
          main(["tag", "--corpus", str(corpus), "--split", str(tmp_path / "split"), "--out", str(tmp_path / "tagged")]),
          main(["probes", "--params", '{"apply_caps": false}', "--corpus", str(corpus),
                "--tagged", str(tmp_path / "tagged"), "--out", str(tmp_path / "probes")])]
    assert rc == [0, 0, 0, 0]
    df = pd.read_parquet(tmp_path / "probes" / "probes.parquet")
    status = pd.read_parquet(tmp_path / "tagged" / "entity_status.parquet")
    # Probes and tagger agree on which subjects are new.
    new = df[(df["set"] == "new")].merge(status, left_on=["period", "subject_id"], right_on=["period", "entity_id"])
    assert len(new) > 0 and (new["status"] == "new").all()
    upd = df[(df["set"] == "updated")].merge(status, left_on=["period", "subject_id"],
                                              right_on=["period", "entity_id"])
    assert len(upd) > 0 and (upd["status"] == "updated").all()


def test_shipped_probes_skip_caps_and_text_filter_without_articles(tmp_path):
    # TemporalWiki without its base dump: no articles anywhere, probes shipped per period.
    raw = pd.DataFrame([(1, "unchanged", f"S{i}", "rel", f"O{i}", "") for i in range(40)],
                       columns=["period", "set", "subject", "relation", "object", "prefix"])
    triples = [(0, f"S{i}", f"S{i}", "rel", f"O{i}") for i in range(40)]
    triples += [(1, f"S{i}", f"S{i}", "rel", f"O{i}") for i in range(40)]
    df = run_probes(tmp_path, {"relation_cap": 0.05}, triples=triples, docs=[("x", 1, "X", "diff only")], raw=raw)
    assert len(facts(df, 1, "unchanged")) == 40  # no relation cap on shipped probes
    # Period 0 comes from the triples: caps apply, the text filter cannot (no T0 article).
    assert len(facts(df, 0, "unchanged")) == 2  # ceil(0.05 * 40) for the one relation
