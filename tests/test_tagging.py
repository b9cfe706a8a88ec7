"""`gradloc tag`: dictionary mentions (word boundaries, longest match, aliases, case),
entity status per period, knowledge types of sequences."""

import json

import pandas as pd
import pytest

from gradloc import split, tagging
from gradloc.io import InputError
from gradloc.tagging import entity_status, find_mentions


def ents(*rows):
    return pd.DataFrame([{"entity_id": e, "name": n, "aliases": a, "type": "x"} for e, n, a in rows])


def spans(df, texts):
    return sorted((texts[i][s:e], eid) for i, eid, s, e in df[["idx", "entity_id", "start", "end"]].itertuples(index=False))


def test_word_boundaries():
    e = ents(("ann", "Ann", []))
    texts = ["Ann met Anna and Joanne. (Ann)", "Ann's car", "Anne", "Ann_x"]
    m = find_mentions(texts, e)
    assert m[["idx", "start", "end"]].values.tolist() == [[0, 0, 3], [0, 26, 29], [1, 0, 3]]


def test_longest_match_wins_on_overlap():
    e = ents(("ny", "New York", []), ("nyc", "New York City", []), ("yc", "York City Hall", []))
    texts = ["He lives in New York City now.", "New York is big.", "the York City Hall and New York City Hall"]
    m = find_mentions(texts, e)
    assert spans(m[m["idx"] == 0], texts) == [("New York City", "nyc")]
    assert spans(m[m["idx"] == 1], texts) == [("New York", "ny")]
    # "York City Hall" (14 chars) beats "New York City" (13), which overlaps it.
    assert spans(m[m["idx"] == 2], texts) == [("York City Hall", "yc"), ("York City Hall", "yc")]


def test_aliases_and_min_alias_chars():
    e = ents(("ibm", "International Business Machines", ["IBM", "Big Blue", "IB"]))
    texts = ["IBM, also Big Blue, not IB. International Business Machines."]
    m = find_mentions(texts, e, min_alias_chars=3)
    assert [s for s, _ in spans(m, texts)] == ["Big Blue", "IBM", "International Business Machines"]
    m2 = find_mentions(texts, e, min_alias_chars=2)
    assert "IB" in [s for s, _ in spans(m2, texts)]


def test_name_beats_alias_and_shared_names_keep_both():
    e = ents(("a", "Mercury", []), ("b", "Freddie Mercury", ["Mercury"]), ("c", "Jordan", []), ("d", "Jordan", []))
    texts = ["Mercury is a planet. Jordan."]
    m = find_mentions(texts, e)
    assert spans(m, texts) == [("Jordan", "c"), ("Jordan", "d"), ("Mercury", "a")]


def test_case_option():
    e = ents(("p", "Paris", []), ("i", "İzmir", []))
    texts = ["paris and PARIS and Paris; izmir, İzmir"]
    assert len(find_mentions(texts, e, case_sensitive=True)) == 2
    m = find_mentions(texts, e, case_sensitive=False)
    # Spans are offsets into the original text, even where lower-casing changes length.
    assert spans(m, texts) == [("PARIS", "p"), ("Paris", "p"), ("paris", "p"), ("İzmir", "i")]


def test_no_entities_and_empty_texts():
    m = find_mentions(["", "text"], ents(("x", "ab", [])))
    assert m.empty and list(m.columns) == ["idx", "entity_id", "start", "end"]


TRIPLES = [
    # snapshot, subject_id, subject, relation, object
    (0, "al", "Alice", "employer", "Acme"), (0, "al", "Alice", "city", "Paris"),
    (1, "al", "Alice", "employer", "Beta"), (1, "al", "Alice", "city", "Paris"),   # updated in 1
    (0, "bo", "Bob", "city", "Rome"), (1, "bo", "Bob", "city", "Rome"),             # unchanged
    (1, "ca", "Carol", "city", "Oslo"),                                             # new in 1
    (2, "al", "Alice", "employer", "Beta"), (2, "al", "Alice", "city", "Paris"),
    (2, "bo", "Bob", "city", "Rome"), (2, "bo", "Bob", "award", "Prize"),         # updated in 2
    (2, "ca", "Carol", "city", "Oslo"),
]


def triples_df(rows=TRIPLES):
    return pd.DataFrame(rows, columns=["snapshot", "subject_id", "subject", "relation", "object"])


def docs_df(rows):
    return pd.DataFrame(rows, columns=["doc_id", "snapshot", "title", "text", "kind"])


def status_map(st):
    return {(int(p), e): s for p, e, s in st.itertuples(index=False)}


def test_status_from_triples():
    e = ents(("al", "Alice", []), ("bo", "Bob", []), ("ca", "Carol", []))
    st = status_map(entity_status(triples_df(), docs_df([]), e, [1, 2]))
    assert {k: v for k, v in st.items() if k[0] == 0} == {(0, "al"): "unchanged", (0, "bo"): "unchanged",
                                                           (0, "ca"): "unchanged"}
    assert st[1, "al"] == "updated" and st[1, "bo"] == "unchanged" and st[1, "ca"] == "new"
    assert st[2, "al"] == "unchanged" and st[2, "bo"] == "updated" and st[2, "ca"] == "unchanged"


def test_status_fallback_to_article_titles():
    # "Dan" has no triples: judged by the article titled with his name (or alias).
    e = ents(("dan", "Dan Brown", ["Danny"]), ("eve", "Eve", []), ("bg", "Oslo", []))
    docs = docs_df([("d1", 0, "Danny", "Dan writes.", "full"), ("d1", 1, "Danny", "Dan writes books.", "full"),
                    ("d1", 2, "Danny", "Dan writes books.", "full"),
                    ("e1", 2, "Eve", "Eve is here.", "full")])
    st = status_map(entity_status(triples_df([]), docs, e, [1, 2]))
    assert st[1, "dan"] == "updated" and st[2, "dan"] == "unchanged"
    assert st[1, "eve"] == "unchanged" and st[2, "eve"] == "new"
    assert st[1, "bg"] == st[2, "bg"] == "unchanged"  # background entity, never tracked


def test_run_writes_knowledge_types(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = docs_df([
        ("al", 0, "Alice", "Alice works at Acme in Paris. Bob is her friend.", "full"),
        ("bo", 0, "Bob", "Bob lives in Rome.", "full"),
        ("al", 1, "Alice", "Alice works at Acme in Paris. Bob is her friend. Since 2021 Alice works at Beta.",
         "full"),
        ("bo", 1, "Bob", "Bob lives in Rome. He met Carol, a pilot from Oslo, in Rome.", "full"),
        ("ca", 1, "Carol", "Carol lives in Oslo and flies planes across the sea.", "full"),
        ("zz", 1, "Zed", "A sentence that mentions no tracked entity whatsoever.", "full"),
    ])
    docs.to_parquet(corpus / "documents.parquet")
    triples_df(TRIPLES[:7]).to_parquet(corpus / "triples.parquet")
    ents(("al", "Alice", []), ("bo", "Bob", []), ("ca", "Carol", [])).to_parquet(corpus / "entities.parquet")
    (corpus / "manifest.json").write_text(json.dumps({"snapshots": [{"index": 0, "label": "T0"},
                                                                   {"index": 1, "label": "T1"}]}))
    split.run({"heldout_fraction": 0.0}, corpus=str(corpus), out=str(tmp_path / "split"))
    tagging.run({}, corpus=str(corpus), split=str(tmp_path / "split"), out=str(tmp_path / "tagged"))

    seqs = pd.read_parquet(tmp_path / "tagged" / "sequences.parquet").set_index("seq_id")
    assert set(seqs[seqs["period"] == 0]["knowledge_type"]) == {"unchanged"}
    p1 = seqs[seqs["period"] == 1].set_index("doc_id")
    assert p1.loc["al", "knowledge_type"] == "updated"            # "Since 2021 Alice works at Beta."
    assert p1.loc["bo", "knowledge_type"] == "new"                # mentions Carol (new) and Bob
    assert (p1.loc["bo", "n_new"], p1.loc["bo", "n_unchanged"]) == (1, 0)  # Bob's 2nd sentence only
    assert p1.loc["ca", "knowledge_type"] == "new"
    assert p1.loc["zz", "knowledge_type"] == "none"
    assert p1.loc["zz", ["n_new", "n_updated", "n_unchanged"]].tolist() == [0, 0, 0]

    mentions = pd.read_parquet(tmp_path / "tagged" / "mentions.parquet")
    for seq_id, start, end, eid, status in mentions[["seq_id", "start", "end", "entity_id", "status"]].itertuples(
            index=False):
        assert seqs.loc[seq_id, "text"][start:end] == {"al": "Alice", "bo": "Bob", "ca": "Carol"}[eid]
        if seqs.loc[seq_id, "period"] == 1:
            assert status == {"al": "updated", "bo": "unchanged", "ca": "new"}[eid]
    status = pd.read_parquet(tmp_path / "tagged" / "entity_status.parquet")
    assert len(status) == 6


def test_missing_entities_file_is_named(tmp_path):
    (tmp_path / "corpus").mkdir()
    with pytest.raises(InputError, match="entities.parquet"):
        tagging.run({}, corpus=str(tmp_path / "corpus"), split=str(tmp_path / "split"), out=str(tmp_path / "t"))
    with pytest.raises(InputError, match="min_alias"):
        tagging.run({"min_alias": 2}, corpus=str(tmp_path / "corpus"), split=str(tmp_path / "s"), out=str(tmp_path / "t"))


# --- against the synthetic world's ground truth ------------------------------------------------

@pytest.fixture(scope="module")
def world():
    from gradloc.data.synthetic import generate
    return generate({"n_entities": 240, "n_snapshots": 3, "docs_per_entity": 2, "seed": 0})


def test_mentions_match_synthetic_ground_truth(world):
    docs = world["documents"].reset_index(drop=True)
    found = find_mentions(docs["text"].tolist(), world["entities"], min_alias_chars=3)
    found["doc_id"] = docs["doc_id"].to_numpy()[found["idx"]]
    found["snapshot"] = docs["snapshot"].to_numpy()[found["idx"]]
    key = ["doc_id", "snapshot", "entity_id", "start", "end"]
    pred = set(found[key].itertuples(index=False, name=None))
    truth = set(world["mentions"][key].itertuples(index=False, name=None))
    hits = len(pred & truth)
    assert len(truth) > 1000
    assert hits / len(pred) >= 0.95, f"precision {hits / len(pred):.3f}"
    assert hits / len(truth) >= 0.95, f"recall {hits / len(truth):.3f}"


def test_status_matches_synthetic_world(world):
    """Ground truth without the triples: a synthetic article is a function of its
    entity's facts, so an entity is new in k when its article first appears in k, and
    updated when its article's text changed from k-1 to k."""
    docs, entities = world["documents"], world["entities"]
    st = status_map(entity_status(world["triples"], docs, entities, [1, 2]))
    name_to_id = dict(zip(entities["name"], entities["entity_id"]))
    text = {(name_to_id[t], s, d): x for d, s, t, x in docs[["doc_id", "snapshot", "title", "text"]].itertuples(
        index=False)}
    for k in (1, 2):
        present = {e for e, s, _ in text if s == k}
        before = {e for e, s, _ in text if s == k - 1}
        new = present - before
        updated = {e for e, s, d in text if s == k and e in before and text[e, k - 1, d] != text[e, k, d]}
        assert len(new) == 29 and len(updated) > 20
        assert {e for e in present if st[k, e] == "new"} == new
        assert {e for e in present if st[k, e] == "updated"} == updated


def test_synthetic_split_and_tag(world, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("documents", "triples", "entities"):
        world[name].to_parquet(corpus / f"{name}.parquet")
    (corpus / "manifest.json").write_text(json.dumps(
        {"source": "synthetic", "snapshots": [{"index": i, "label": f"T{i}"} for i in range(3)]}))
    split.run({}, corpus=str(corpus), out=str(tmp_path / "split"))
    tagging.run({}, corpus=str(corpus), split=str(tmp_path / "split"), out=str(tmp_path / "tagged"))
    seqs = pd.read_parquet(tmp_path / "tagged" / "sequences.parquet")
    status = pd.read_parquet(tmp_path / "tagged" / "entity_status.parquet")
    name_to_id = dict(zip(world["entities"]["name"], world["entities"]["entity_id"]))
    doc_entity = dict(zip(world["documents"]["doc_id"], world["documents"]["title"].map(name_to_id)))
    for k in (1, 2):
        p = seqs[seqs["period"] == k]
        # Unchanged articles render identically, so every diff sequence carries news.
        assert set(p["knowledge_type"]) <= {"new", "updated"}
        new_ids = set(status[(status["period"] == k) & (status["status"] == "new")]["entity_id"])
        upd_ids = set(status[(status["period"] == k) & (status["status"] == "updated")]["entity_id"])
        entity_of = p["doc_id"].map(doc_entity)
        assert set(entity_of[p["origin"] == "new_doc"]) == new_ids
        assert set(entity_of[p["origin"] == "added_sentences"]) == upd_ids
        assert (p.loc[entity_of.isin(new_ids), "knowledge_type"] == "new").all()
        assert (p["knowledge_type"] == "updated").sum() > 10
        assert (p["split"] == "heldout").sum() == round(0.1 * len(p))
