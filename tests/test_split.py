"""`gradloc split`: T0 base text, per-period diffs (new documents and added sentences),
diff pass-through, deterministic held-out choice, and errors on bad corpora."""

import json

import pandas as pd
import pytest

from gradloc import split
from gradloc.io import InputError


def write_corpus(path, docs, labels=("T0", "T1")):
    """A corpus folder with just what the split reads: documents and the manifest."""
    path.mkdir(parents=True, exist_ok=True)
    rows = [dict(zip(["doc_id", "snapshot", "title", "text", "kind"], d)) for d in docs]
    pd.DataFrame(rows).to_parquet(path / "documents.parquet")
    manifest = {"source": "test", "snapshots": [{"index": i, "label": l} for i, l in enumerate(labels)]}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


ALICE_T0 = "Alice Smith is a chemist. She works at Acme Labs in Paris. She was born in 1970."
ALICE_T1 = ("Alice Smith is a chemist. She works at Beta Institute in Paris. She was born in 1970. "
            "In 2021 she received the Gold Medal of Chemistry.")
BOB = "Bob Jones is a painter. He lives in Rome and paints large murals."
CAROL = "Carol White is a pilot who flies cargo planes across the Atlantic."

TWO_SNAPSHOTS = [
    ("alice", 0, "Alice Smith", ALICE_T0, "full"),
    ("bob", 0, "Bob Jones", BOB, "full"),
    ("alice", 1, "Alice Smith", ALICE_T1, "full"),
    ("bob", 1, "Bob Jones", BOB, "full"),          # identical: contributes nothing
    ("carol", 1, "Carol White", CAROL, "full"),     # new in T1: whole text
]


def run_split(tmp_path, docs, labels=("T0", "T1"), **params):
    corpus = write_corpus(tmp_path / "corpus", docs, labels)
    split.run({"heldout_fraction": 0.0, **params}, corpus=str(corpus), out=str(tmp_path / "split"))
    seqs = pd.read_parquet(tmp_path / "split" / "sequences.parquet")
    manifest = json.loads((tmp_path / "split" / "manifest.json").read_text())
    return seqs, manifest


def test_new_docs_and_added_sentences(tmp_path):
    seqs, manifest = run_split(tmp_path, TWO_SNAPSHOTS)
    base = seqs[seqs["period"] == 0]
    assert sorted(base["text"]) == sorted([ALICE_T0, BOB])
    assert set(base["split"]) == {"base"} and set(base["origin"]) == {"base"}

    p1 = seqs[seqs["period"] == 1].set_index("doc_id")
    assert sorted(p1.index) == ["alice", "carol"]  # bob unchanged -> no sequence
    assert p1.loc["carol", "origin"] == "new_doc" and p1.loc["carol", "text"] == CAROL
    assert p1.loc["alice", "origin"] == "added_sentences"
    # The replaced sentence and the appended one, nothing that was already there.
    assert p1.loc["alice", "text"] == ("She works at Beta Institute in Paris. "
                                       "In 2021 she received the Gold Medal of Chemistry.")
    assert manifest["periods"] == [{"index": 1, "label": "T1"}]
    assert manifest["counts"]["1"]["train"] == {"added_sentences": 1, "new_doc": 1}
    assert seqs["seq_id"].is_unique


def test_short_added_sentences_are_dropped(tmp_path):
    docs = [("a", 0, "A", "Alpha is a town in the north of the land.", "full"),
            ("a", 1, "A", "Alpha is a town in the north of the land. It is cold. "
                          "Its mayor since 2020 is Dana Brook.", "full")]
    seqs, _ = run_split(tmp_path, docs, min_sentence_chars=20)
    assert seqs[seqs["period"] == 1]["text"].tolist() == ["Its mayor since 2020 is Dana Brook."]


def test_diff_documents_pass_through(tmp_path):
    docs = [("a", 0, "A", "Alpha is a town in the north.", "full"),
            ("d1", 1, "D", "Some diff text. Short.", "diff")]
    seqs, manifest = run_split(tmp_path, docs)
    p1 = seqs[seqs["period"] == 1]
    assert p1["origin"].tolist() == ["diff"]
    assert p1["text"].tolist() == ["Some diff text. Short."]  # untouched, even short sentences
    assert manifest["counts"]["1"]["train"] == {"diff": 1}


def test_long_documents_are_chunked_at_sentences(tmp_path):
    sentence = "Gamma is a long river that crosses many valleys and towns. "
    long_text = (sentence * 60).strip()
    docs = [("g", 0, "Gamma", long_text, "full"), ("h", 1, "H", "Hotel is new here today.", "full")]
    seqs, _ = run_split(tmp_path, docs)
    base = seqs[seqs["period"] == 0]
    assert len(base) > 1
    assert (base["text"].str.len() < split.MAX_SEQ_CHARS).all()
    assert all(t.endswith(".") for t in base["text"])  # cut between sentences, not inside
    assert " ".join(base["text"]) == long_text


def test_heldout_is_deterministic_and_sized(tmp_path):
    docs = [("base", 0, "B", "Base document text is here.", "full")]
    docs += [(f"n{i}", 1, f"N{i}", f"New document number {i} is here.", "full") for i in range(40)]
    corpus = write_corpus(tmp_path / "corpus", docs)
    chosen = []
    for run_id, seed in [("a", 0), ("b", 0), ("c", 1)]:
        out = tmp_path / f"split_{run_id}"
        split.run({"heldout_fraction": 0.25, "seed": seed}, corpus=str(corpus), out=str(out))
        seqs = pd.read_parquet(out / "sequences.parquet")
        chosen.append(set(seqs.loc[seqs["split"] == "heldout", "seq_id"]))
    assert chosen[0] == chosen[1]  # same seed, same choice
    assert len(chosen[0]) == 10  # exactly round(0.25 * 40)
    assert chosen[2] != chosen[0]  # the seed matters
    # Row order of the corpus does not change the choice.
    shuffled = write_corpus(tmp_path / "corpus2", docs[:1] + docs[:0:-1])
    split.run({"heldout_fraction": 0.25, "seed": 0}, corpus=str(shuffled), out=str(tmp_path / "s2"))
    seqs = pd.read_parquet(tmp_path / "s2" / "sequences.parquet")
    assert set(seqs.loc[seqs["split"] == "heldout", "seq_id"]) == chosen[0]


def test_stable_unit_is_not_pythons_hash():
    # A fixed value: it must not change between processes or machines.
    assert split.stable_unit("P1:x:0|0") == split.stable_unit("P1:x:0|0")
    assert 0 <= split.stable_unit("abc") < 1
    assert round(split.stable_unit("abc"), 6) == round(int("ba7816bf8f01cfea", 16) / 2**64, 6)


def test_empty_period_is_an_error(tmp_path):
    docs = [("a", 0, "A", "Alpha is a town.", "full"), ("a", 1, "A", "Alpha is a town.", "full")]
    with pytest.raises(InputError, match="period 1"):
        run_split(tmp_path, docs)


def test_missing_files_are_named(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", TWO_SNAPSHOTS)
    (corpus / "manifest.json").unlink()
    with pytest.raises(InputError, match="manifest.json"):
        split.run({}, corpus=str(corpus), out=str(tmp_path / "split"))
    with pytest.raises(InputError, match="documents.parquet"):
        split.run({}, corpus=str(tmp_path / "nowhere"), out=str(tmp_path / "split"))
    assert not (tmp_path / "split").exists()  # nothing half-written


def test_bad_kind_and_unknown_snapshot(tmp_path):
    with pytest.raises(InputError, match="kind"):
        run_split(tmp_path / "a", [("a", 0, "A", "x", "patch"), ("a", 1, "A", "y", "full")])
    with pytest.raises(InputError, match=r"snapshot\(s\) \[2\]"):
        run_split(tmp_path / "b", [("a", 0, "A", "x", "full"), ("a", 2, "A", "y", "full")])


def test_base_may_be_missing_only_when_the_corpus_says_so(tmp_path):
    docs = [("d1", 1, "D", "Some diff text about a thing.", "diff")]
    with pytest.raises(InputError, match="snapshot 0"):
        run_split(tmp_path / "a", docs)
    corpus = write_corpus(tmp_path / "b" / "corpus", docs)
    manifest = json.loads((corpus / "manifest.json").read_text())
    (corpus / "manifest.json").write_text(json.dumps({**manifest, "base_snapshot": "missing"}))
    split.run({}, corpus=str(corpus), out=str(tmp_path / "b" / "split"))
    seqs = pd.read_parquet(tmp_path / "b" / "split" / "sequences.parquet")
    assert seqs["period"].tolist() == [1]
    assert json.loads((tmp_path / "b" / "split" / "manifest.json").read_text())["base_missing"] is True
