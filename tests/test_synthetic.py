"""The synthetic temporal world: determinism, the promised rates of new and updated
entities, articles that change only where facts change, objects inside the subject's
article, exact mention ground truth, names that make tagging well-defined, and probe
phrasings no article uses (only the infoboxes of the probe-worded entities)."""

import re

import pytest

from gradloc.data import download, synthetic
from gradloc.io import InputError

SMALL = {"seed": 3, "n_entities": 100, "n_snapshots": 3, "update_rate": 0.2, "new_rate": 0.1,
         "docs_per_entity": 2}


@pytest.fixture(scope="module")
def world():
    return synthetic.generate(SMALL)


def facts_by_subject(triples, k):
    t = triples[triples["snapshot"] == k]
    out = {}
    for s, r, o in zip(t["subject_id"], t["relation"], t["object"]):
        out.setdefault(s, set()).add((r, o))
    return out


def sentences(text):
    return re.split(r"(?<=\.) ", text)


def articles(docs, k):
    d = docs[docs["snapshot"] == k]
    return dict(zip(d["doc_id"], d["text"]))


def test_same_params_give_identical_files(tmp_path):
    params = {"source": "synthetic", "synthetic": {**SMALL, "n_entities": 40}}
    download.run(params, out=str(tmp_path / "a"))
    download.run(params, out=str(tmp_path / "b"))
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["documents.parquet", "entities.parquet", "manifest.json", "triples.parquet"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    other = synthetic.generate({**SMALL, "n_entities": 40, "seed": 4})["documents"]
    same = synthetic.generate({**SMALL, "n_entities": 40})["documents"]
    assert list(other["text"]) != list(same["text"])


def test_counts_of_new_updated_unchanged_follow_the_rates(world):
    triples = world["triples"]
    known = SMALL["n_entities"]
    for k in (1, 2):
        before, now = facts_by_subject(triples, k - 1), facts_by_subject(triples, k)
        new = [s for s in now if s not in before]
        updated = [s for s in before if now[s] != before[s]]
        assert len(new) == round(SMALL["new_rate"] * SMALL["n_entities"])  # 10
        assert len(updated) == int(SMALL["update_rate"] * known + 0.5)     # of the entities known at k-1
        assert set(before) <= set(now)  # nobody disappears
        known = len(now)
    entities = world["entities"]
    assert len(entities) == 100 + 2 * 10
    assert set(entities["type"]) == set(synthetic.ENTITY_KINDS)


def test_articles_change_only_where_facts_change(world):
    docs, triples = world["documents"], world["triples"]
    for k in (1, 2):
        before_facts, now_facts = facts_by_subject(triples, k - 1), facts_by_subject(triples, k)
        old, new = articles(docs, k - 1), articles(docs, k)
        for doc_id, text in new.items():
            subject = doc_id.rsplit("_", 1)[0]
            if doc_id not in old:
                assert subject not in before_facts  # a new article is a new entity's
                continue
            changed = now_facts[subject] - before_facts[subject]
            if not changed:
                assert text == old[doc_id]  # byte-identical
                continue
            old_sents = set(sentences(old[doc_id]))
            added = [s for s in sentences(text) if s not in old_sents]
            assert added
            # Every new sentence states one of the changed facts.
            assert all(any(o in s for _, o in changed) for s in added), (added, changed)
            # ...and every sentence of the old article that is gone stated an old value.
            gone = [s for s in sentences(old[doc_id]) if s not in set(sentences(text))]
            stale = before_facts[subject] - now_facts[subject]
            assert all(any(o in s for _, o in stale) for s in gone)


def test_objects_appear_in_every_variant_of_the_subject_article(world):
    docs, triples = world["documents"], world["triples"]
    text = {(d, k): t for d, k, t in zip(docs["doc_id"], docs["snapshot"], docs["text"])}
    for k, sid, obj, oid in zip(triples["snapshot"], triples["subject_id"], triples["object"], triples["object_id"]):
        assert len(obj.split()) <= 5
        for j in range(SMALL["docs_per_entity"]):
            assert obj in text[(f"{sid}_{j}", k)], (sid, obj)
    # Entity-valued objects link to an entity of that name.
    names = dict(zip(world["entities"]["entity_id"], world["entities"]["name"]))
    linked = triples[triples["object_id"].notna()]
    assert len(linked) > 0
    assert all(names[i] == o for i, o in zip(linked["object_id"], linked["object"]))


def test_variants_are_paraphrases_not_copies(world):
    docs = world["documents"]
    t0 = docs[docs["snapshot"] == 0].set_index("doc_id")["text"]
    pairs = [(t0[f"{e}_0"], t0[f"{e}_1"]) for e in world["entities"]["entity_id"][:100]]
    assert all(a != b for a, b in pairs)
    for relation, templates in synthetic.DOC_TEMPLATES.items():
        assert len(set(templates)) >= 4, relation


def test_names_are_unique_and_never_inside_another_surface(world):
    ent = world["entities"]
    owner = {}
    for eid, name, aliases in zip(ent["entity_id"], ent["name"], ent["aliases"]):
        for surface in [name, *aliases]:
            assert surface not in owner, surface
            owner[surface] = eid
    surfaces = sorted(owner)
    lowered = [s.lower() for s in surfaces]
    for a, la in zip(surfaces, lowered):
        for b, lb in zip(surfaces, lowered):
            if a != b and owner[a] != owner[b]:
                assert la not in lb, (a, b)
    # Nor inside any word the templates or literal values use.
    common = synthetic._Registry().common
    assert not [s for s in lowered if s in common]
    # Aliases: surname of people, three-letter acronym of organisations.
    people = ent[ent["type"] == "person"]
    assert all(a == [n.split()[-1]] for n, a in zip(people["name"], people["aliases"]))
    orgs = ent[ent["type"] == "organisation"]
    assert all(a == ["".join(w[0] for w in n.split())] and len(a[0]) == 3 for n, a in zip(orgs["name"], orgs["aliases"]))


def test_mentions_are_exactly_what_a_dictionary_finds(world):
    docs, ent, mentions = world["documents"], world["entities"], world["mentions"]
    owner = {s: e for e, n, al in zip(ent["entity_id"], ent["name"], ent["aliases"]) for s in [n, *al]}
    pattern = re.compile("|".join(re.escape(s) for s in sorted(owner, key=len, reverse=True)))
    found = {(d, k, owner[m.group()], m.start(), m.end())
             for d, k, t in zip(docs["doc_id"], docs["snapshot"], docs["text"]) for m in pattern.finditer(t)}
    truth = set(map(tuple, mentions[["doc_id", "snapshot", "entity_id", "start", "end"]].itertuples(index=False)))
    assert found == truth
    # Aliases are used too, not only full names.
    names = set(ent["name"])
    text = {(d, k): t for d, k, t in zip(docs["doc_id"], docs["snapshot"], docs["text"])}
    spans = [text[(d, k)][a:b] for d, k, a, b in zip(mentions["doc_id"], mentions["snapshot"],
                                                      mentions["start"], mentions["end"])]
    assert any(s not in names for s in spans)


def test_new_entities_turn_up_in_articles_of_known_entities(world):
    triples, mentions = world["triples"], world["mentions"]
    before, now = facts_by_subject(triples, 0), facts_by_subject(triples, 1)
    new = set(now) - set(before)
    m = mentions[mentions["snapshot"] == 1]
    subject_of_doc = m["doc_id"].str.rsplit("_", n=1).str[0]
    assert ((m["entity_id"].isin(new)) & (subject_of_doc.isin(set(before)))).any()


def worded_ids(docs):
    return set(docs.loc[docs["doc_id"].str.endswith("_facts"), "doc_id"].str.rsplit("_", n=1).str[0])


def test_probe_phrasings_are_only_in_the_infoboxes_of_probe_worded_entities(world):
    docs, triples = world["documents"], world["triples"]
    doc_templates = {t for ts in synthetic.DOC_TEMPLATES.values() for t in ts}
    doc_templates |= set(synthetic.HISTORY_TEMPLATES.values())
    for relation, templates in synthetic.PROBE_TEMPLATES.items():
        assert relation in synthetic.RELATIONS
        assert len(templates) >= 2 and not set(templates) & doc_templates
    worded = worded_ids(docs)
    is_box = docs["doc_id"].str.endswith("_facts")
    articles = "\n".join(docs.loc[~is_box, "text"]).lower()
    corpus = "\n".join(docs["text"]).lower()
    t0 = triples[triples["snapshot"] == 0]
    for sid, subject, relation, obj in zip(t0["subject_id"], t0["subject"], t0["relation"], t0["object"]):
        for variant in range(2):
            prefix = synthetic.probe_prefix(subject, relation, variant)
            assert subject in prefix and not prefix.endswith(" ")
            assert prefix.lower() not in articles, prefix
            # Worded entities state every fact in both probe wordings; the others nowhere.
            assert (f"{prefix} {obj}.".lower() in corpus) == (sid in worded), (sid, prefix)
    assert synthetic.probe_prefix("Mara Keller", "employer") == "The employer of Mara Keller is"
    # The document-phrased prefix, by contrast, is training text.
    assert synthetic.document_prefix("Mara Keller", "employer") == "Mara Keller's employer is"
    hits = [f"{synthetic.document_prefix(s, r)} {o}".lower() in corpus
            for s, r, o in zip(t0["subject"], t0["relation"], t0["object"])]
    assert 0.3 < sum(hits) / len(hits) < 0.9
    with pytest.raises(InputError, match="unknown relation"):
        synthetic.probe_prefix("Mara Keller", "favourite colour")


def test_probe_worded_share_picks_half_of_each_snapshots_entities_and_changes_nothing_else(world):
    docs, ent = world["documents"], world["entities"]
    worded = worded_ids(docs)
    first_seen = world["triples"].groupby("subject_id")["snapshot"].min()
    born = first_seen.groupby(first_seen).apply(lambda s: set(s.index))
    for k, ids in born.items():
        assert len(ids & worded) == round(0.5 * len(ids)), k
    # An infobox exists in every snapshot from the entity's first one on, and sits after
    # all articles of its snapshot.
    for k, g in docs.groupby("snapshot"):
        is_box = g["doc_id"].str.endswith("_facts").tolist()
        assert is_box == sorted(is_box)
        assert worded_ids(g) == {e for e in worded if first_seen[e] <= k}
    # Share 0: the same world without infoboxes; share 1: every entity worded.
    plain = synthetic.generate({**SMALL, "probe_worded_share": 0.0})
    assert plain["triples"].equals(world["triples"]) and plain["entities"].equals(ent)
    articles = docs[~docs["doc_id"].str.endswith("_facts")].reset_index(drop=True)
    assert plain["documents"].equals(articles)
    assert worded_ids(synthetic.generate({**SMALL, "probe_worded_share": 1.0})["documents"]) == set(ent["entity_id"])


def test_more_paraphrases_of_changes_leave_t0_alone(world):
    """The 'more paraphrases' lever of issue 11: entities born after T0 get
    new_docs_per_entity variants, and each article restates its latest changed facts
    change_restatements more times; T0 is byte-identical, so the base model still fits."""
    more = synthetic.generate({**SMALL, "new_docs_per_entity": 4, "change_restatements": 2})
    docs, more_docs = world["documents"], more["documents"]
    assert more_docs[more_docs["snapshot"] == 0].reset_index(drop=True).equals(
        docs[docs["snapshot"] == 0].reset_index(drop=True))
    first_seen = more["triples"].groupby("subject_id")["snapshot"].min()
    arts = more_docs[(more_docs["snapshot"] == 2) & ~more_docs["doc_id"].str.endswith("_facts")]
    n_docs = arts["doc_id"].str.rsplit("_", n=1).str[0].value_counts()
    later = (first_seen[n_docs.index] > 0).values
    assert set(n_docs[later]) == {4} and set(n_docs[~later]) == {2}
    # Each article of an entity changed in period 1 names its new object twice more than
    # without restatements (the same world otherwise: same facts, same changes).
    plain = synthetic.generate({**SMALL, "new_docs_per_entity": 4})
    assert plain["triples"].equals(more["triples"])
    t0, t1 = facts_by_subject(more["triples"], 0), facts_by_subject(more["triples"], 1)
    changed = [e for e in sorted(t0) if t0[e] != t1[e]]
    assert changed
    for eid in changed:
        obj = sorted(o for _, o in t1[eid] - t0[eid])[0]
        for j in range(2):
            plain_text = articles(plain["documents"], 1)[f"{eid}_{j}"]
            assert articles(more_docs, 1)[f"{eid}_{j}"].count(obj) == plain_text.count(obj) + 2


def test_every_kind_has_its_relations_and_tables_have_the_documented_columns(world):
    assert list(world["documents"].columns) == ["doc_id", "snapshot", "title", "text", "kind"]
    assert list(world["triples"].columns) == ["snapshot", "subject_id", "subject", "relation", "object", "object_id"]
    assert list(world["entities"].columns) == ["entity_id", "name", "aliases", "type"]
    for kind, relations in synthetic.SCHEMA.items():
        assert set(synthetic.MUTABLE[kind]) <= set(relations)
        assert all(r in synthetic.RELATIONS and r in synthetic.DOC_TEMPLATES for r in relations)
    docs = world["documents"]
    names = dict(zip(world["entities"]["entity_id"], world["entities"]["name"]))
    assert all(t == names[d.rsplit("_", 1)[0]] for d, t in zip(docs["doc_id"], docs["title"]))
    assert set(docs["kind"]) == {"full"}


@pytest.mark.parametrize("params, message", [
    ({"n_entities": 3}, "n_entities"),
    ({"n_snapshots": 1}, "n_snapshots"),
    ({"update_rate": 1.5}, "update_rate"),
    ({"probe_worded_share": -0.1}, "probe_worded_share"),
    ({"colour": "red"}, r"data\.synthetic: unknown key\(s\) \['colour'\]"),
])
def test_bad_params_are_input_errors(params, message):
    with pytest.raises(InputError, match=message):
        synthetic.generate(params)


def test_default_world_is_quick_and_has_the_configured_size():
    w = synthetic.generate({})
    assert len(w["entities"]) == 240 + 2 * round(0.12 * 240)
    assert len(w["documents"][w["documents"]["snapshot"] == 0]) == 240 * 3 + 120  # articles, infoboxes
