"""`gradloc download` for the real-data sources (TemporalWiki, ECBD, local files) on
small fixtures written in their published formats, the errors a user can make, and
the atomic output: after any error there is no corpus folder."""

import functools
import http.server
import json
import threading

import pandas as pd
import pytest

from gradloc import cli
from gradloc.data import download
from gradloc.io import InputError


def read(out):
    tables = {p.stem: pd.read_parquet(p) for p in out.glob("*.parquet")}
    return tables, json.loads((out / "manifest.json").read_text())


def assert_nothing_left(parent, name="corpus"):
    assert not (parent / name).exists()
    assert not list(parent.glob(f".{name}.tmp-*"))


# TemporalWiki: tests/test_temporalwiki.py (fixtures in the release's own layouts).


# --- ECBD --------------------------------------------------------------------------------------

def ecbd_record(title, pageid, year, name, sentence, answer, definition, answer_d=True):
    rec = {"ex_id": f"{title}_{pageid}_0_1", "masked_sentence": sentence,
           "answer_str": f"<extra_id_0> {answer} <extra_id_1>", "span_type": "NP-PROPER",
           "definition": definition, "year": str(year), "entity_span_str": name, "entity_span_loc": [0, 1]}
    if answer_d:
        rec["answer_d"] = {"<extra_id_0>": answer}
    return rec


ECBD = [
    ecbd_record("Old_Thing", 1, 2017, "Old Thing", "Old Thing was built by <extra_id_0> in Ohio.", "Acme Corp",
                ["[ENT_START]Old Thing[ENT_END] ([ENT_START]OT[ENT_END]) is a bridge.", "It spans a river."]),
    ecbd_record("GPT-2", 66045029, 2019, "GPT-2", "The GPT-2 model has <extra_id_0>, and was trained.",
                "1.5 billion parameters",
                ["[ENT_START]Generative Pre-trained Transformer 2[ENT_END] ([ENT_START]GPT-2[ENT_END]) is a model."],
                answer_d=False),
    ecbd_record("GPT-2", 66045029, 2019, "GPT-2", "GPT-2 was created by <MASK>.", "OpenAI", ["ignored, seen before"]),
    ecbd_record("Vaccine_X", 7, 2020, "Vaccine X", "Vaccine X was approved in <extra_id_0>.", "Valdoria",
                "[ENT_START]Vaccine X[ENT_END] is a vaccine."),
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_ecbd_years_become_snapshots(tmp_path):
    path = write_jsonl(tmp_path / "ecbd.json", ECBD)
    out = tmp_path / "corpus"
    download.run({"source": "ecbd", "ecbd": {"path": str(path)}}, out=str(out))
    t, m = read(out)
    assert [s["label"] for s in m["snapshots"]] == ["<=2017", "2019", "2020"]
    docs = t["documents"]
    # An entity's article exists from its year on.
    assert sorted(docs[docs["doc_id"] == "GPT-2_66045029"]["snapshot"]) == [1, 2]
    assert sorted(docs[docs["doc_id"] == "Old_Thing_1"]["snapshot"]) == [0, 1, 2]
    gpt = docs[docs["doc_id"] == "GPT-2_66045029"]["text"].iloc[0]
    assert gpt == "Generative Pre-trained Transformer 2 (GPT-2) is a model."
    assert set(docs["kind"]) == {"full"}
    ent = t["entities"].set_index("entity_id")
    assert list(ent.loc["GPT-2_66045029", "aliases"]) == ["Generative Pre-trained Transformer 2"]
    assert list(ent.loc["Old_Thing_1", "aliases"]) == ["OT"]
    p = t["probes_raw"].set_index("object")
    assert p.loc["1.5 billion parameters", "prefix"] == "The GPT-2 model has"
    assert p.loc["OpenAI", "prefix"] == "GPT-2 was created by"
    assert (p.loc["OpenAI", "period"], p.loc["OpenAI", "set"]) == (1, "new")
    assert (p.loc["Acme Corp", "period"], p.loc["Acme Corp", "set"]) == (0, "unchanged")
    assert p.loc["Valdoria", "period"] == 2
    assert t["triples"].empty and str(t["triples"]["snapshot"].dtype) == "int64"


def test_ecbd_base_year_and_url(tmp_path):
    """Download over http (a server on localhost), years <= base_year in T0."""
    write_jsonl(tmp_path / "ecbd.json", ECBD)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/ecbd.json"
        out = tmp_path / "out" / "corpus"
        download.run({"source": "ecbd", "ecbd": {"path": url, "base_year": 2019}}, out=str(out))
        with pytest.raises(InputError, match="download failed"):
            download.run({"source": "ecbd", "ecbd": {"path": url.replace("ecbd.json", "nope.json")}},
                         out=str(tmp_path / "out" / "corpus2"))
    finally:
        server.shutdown()
    t, m = read(out)
    assert [s["label"] for s in m["snapshots"]] == ["<=2019", "2020"]
    assert not list(out.rglob("ecbd.json"))
    assert_nothing_left(tmp_path / "out", "corpus2")


def ecbd_release(root, construction=True):
    """ECBD as released: one file per subset and split, {2017..2021,popular}/
    {np,random}_spans_{dev,test}.json; records as ECBD's construction scripts write them
    (no year, entity_span_str, entity_span_loc) when `construction`."""
    def bare(rec):
        return {k: v for k, v in rec.items() if k not in ("year", "entity_span_str", "entity_span_loc")}
    layout = {"popular": [ECBD[0]], "2019": ECBD[1:3], "2020": [ECBD[3]]}
    for folder, recs in layout.items():
        (root / folder).mkdir(parents=True)
        write_jsonl(root / folder / "np_spans_dev.json", [bare(r) if construction else r for r in recs])
        write_jsonl(root / folder / "random_spans_test.json", [])
    (root / ".DS_Store").write_bytes(b"\x00")
    return root


@pytest.mark.parametrize("how", ["folder", "glob", "list"])
def test_ecbd_as_released(tmp_path, how):
    root = ecbd_release(tmp_path / "ecbd")
    path = {"folder": str(root), "glob": str(root / "*" / "np_spans_*.json"),
            "list": [str(root / "popular"), str(root / "2019" / "np_spans_dev.json"),
                     str(root / "2020" / "np_spans_dev.json")]}[how]
    out = tmp_path / "corpus"
    download.run({"source": "ecbd", "ecbd": {"path": path}}, out=str(out))
    t, m = read(out)
    # Year from the subset folder; popular entities are known at T0.
    assert [s["label"] for s in m["snapshots"]] == ["<=2018", "2019", "2020"]
    docs = t["documents"]
    assert docs[docs["snapshot"] == 0]["title"].tolist() == ["Old Thing"]
    pr = t["probes_raw"].set_index("object")
    assert pr.loc["Acme Corp", "set"] == "unchanged" and pr.loc["Acme Corp", "period"] == 0
    assert pr.loc["OpenAI", "set"] == "new" and pr.loc["OpenAI", "period"] == 1
    # The name comes from ex_id when entity_span_str is missing.
    assert pr.loc["Valdoria", "subject"] == "Vaccine X"


def test_ecbd_one_real_file_works(tmp_path):
    """The old adapter needed two years in one file: every released file failed."""
    root = ecbd_release(tmp_path / "ecbd")
    out = tmp_path / "corpus"
    download.run({"source": "ecbd", "ecbd": {"path": str(root / "2019" / "np_spans_dev.json")}}, out=str(out))
    t, m = read(out)
    assert [s["label"] for s in m["snapshots"]] == ["<=2018", "2019"] and m["base_snapshot"] == "missing"
    assert set(t["probes_raw"]["set"]) == {"new"}


def test_ecbd_record_without_year_names_the_file(tmp_path):
    (tmp_path / "mine").mkdir()
    path = write_jsonl(tmp_path / "mine" / "np_spans_dev.json", [{k: v for k, v in r.items() if k != "year"} for r in ECBD])
    with pytest.raises(InputError, match=r"mine/np_spans_dev\.json: record 'Old_Thing_1_0_1' has no usable year"):
        download.run({"source": "ecbd", "ecbd": {"path": str(path)}}, out=str(tmp_path / "corpus"))
    assert_nothing_left(tmp_path)


def test_ecbd_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "ecbd.jsonl"
    path.write_text(json.dumps(ECBD[0]) + "\n" + '{"ex_id": "broken",\n')
    with pytest.raises(InputError, match=r"ecbd\.jsonl:2: malformed JSON"):
        download.run({"source": "ecbd", "ecbd": {"path": str(path)}}, out=str(tmp_path / "corpus"))
    assert_nothing_left(tmp_path)


# --- local -------------------------------------------------------------------------------------

LOCAL_DOCS = [
    {"id": "a", "title": "Mara Keller", "snapshot": "2020", "body": "Mara Keller works for Nova Labs."},
    {"id": "b", "title": "Nova Labs", "snapshot": "2020", "body": "Nova Labs is based in Osterby."},
    {"id": "a", "title": "Mara Keller", "snapshot": "2021", "body": "Mara Keller works for Acme."},
    {"id": "b", "title": "Nova Labs", "snapshot": "2021", "body": "Nova Labs is based in Osterby."},
    {"id": "c", "title": "Acme", "snapshot": "2021", "body": "Acme hired Mara Keller."},
]
LOCAL = {"text_field": "body", "id_field": "id", "title_field": "title"}


def test_local_jsonl_with_labels_triples_and_inventory(tmp_path):
    docs = write_jsonl(tmp_path / "docs.jsonl", LOCAL_DOCS)
    pd.DataFrame({"snapshot": ["2020", "2021", "2020", "2021"], "subject": ["Mara Keller"] * 2 + ["Nova Labs"] * 2,
                  "relation": ["employer", "employer", "headquarters", "headquarters"],
                  "object": ["Nova Labs", "Acme", "Osterby", "Osterby"]}).to_csv(tmp_path / "triples.csv", index=False)
    pd.DataFrame({"entity_id": ["Q1", "Q2", "Q3", "Q4"], "name": ["Mara Keller", "Nova Labs", "Acme", "Osterby"],
                  "aliases": ["Keller|M. Keller", "NL", "", "Osterby Town"]}).to_csv(tmp_path / "ent.csv", index=False)
    out = tmp_path / "corpus"
    download.run({"source": "local", "local": {**LOCAL, "documents": str(docs), "triples": str(tmp_path / "triples.csv"),
                                               "entities": str(tmp_path / "ent.csv")}}, out=str(out))
    t, m = read(out)
    assert [s["label"] for s in m["snapshots"]] == ["2020", "2021"]
    d = t["documents"]
    assert d.groupby("snapshot").size().to_dict() == {0: 2, 1: 3}
    assert d[(d["doc_id"] == "a") & (d["snapshot"] == 1)]["text"].item() == "Mara Keller works for Acme."
    assert d[d["doc_id"] == "c"]["title"].item() == "Acme"
    ent = t["entities"].set_index("entity_id")
    assert list(ent.loc["Q1", "aliases"]) == ["Keller", "M. Keller"] and list(ent.loc["Q3", "aliases"]) == []
    tr = t["triples"]
    assert set(tr["subject_id"]) == {"Q1", "Q2"} and set(tr["object_id"]) == {"Q2", "Q3", "Q4"}
    assert m["counts"]["entity_changes"]["1"] == {"new": 0, "updated": 1, "unchanged": 1}


def test_local_csv_timestamps_cut_by_boundaries(tmp_path):
    rows = [{"when": "2020-03-01", "text": "Early text about Mara Keller."},
            {"when": "2020-12-31T23:00:00", "text": "Late 2020 text."},
            {"when": "2021-01-01", "text": "Text of 2021 (on the boundary)."},
            {"when": "2021-07-01", "text": "Summer 2021 text."},
            {"when": "2022-02-01", "text": "Text of 2022."}]
    pd.DataFrame(rows).to_csv(tmp_path / "docs.csv", index=False)
    pd.DataFrame({"snapshot": ["T0", "2021-06-01"], "subject": ["Mara Keller", "Mara Keller"],
                  "relation": ["employer", "employer"], "object": ["Nova Labs", "Acme"]}
                 ).to_parquet(tmp_path / "triples.parquet")
    out = tmp_path / "corpus"
    download.run({"source": "local", "local": {"documents": str(tmp_path / "docs.csv"), "time_field": "when",
                                               "boundaries": ["2021-01-01", "2022-01-01"],
                                               "triples": str(tmp_path / "triples.parquet")}}, out=str(out))
    t, m = read(out)
    assert [s["label"] for s in m["snapshots"]] == ["T0", "2021-01-01", "2022-01-01"]
    assert list(t["documents"].sort_values("doc_id")["snapshot"]) == [0, 0, 1, 1, 2]
    assert list(t["triples"]["snapshot"]) == [0, 1]
    # Without an inventory: subjects and entity-like objects, entity_id = name.
    assert sorted(t["entities"]["entity_id"]) == ["Acme", "Mara Keller", "Nova Labs"]


def test_local_parquet_with_integer_snapshots(tmp_path):
    pd.DataFrame({"snapshot": [3, 1, 1, 3], "doc": ["x", "x", "y", "y"],
                  "text": ["X later.", "X first.", "Y first.", "Y first."]}).to_parquet(tmp_path / "d.parquet")
    out = tmp_path / "corpus"
    download.run({"source": "local", "local": {"documents": str(tmp_path / "d.parquet"), "id_field": "doc"}},
                 out=str(out))
    t, m = read(out)
    assert [s["label"] for s in m["snapshots"]] == ["1", "3"]
    assert t["documents"].groupby("snapshot").size().to_dict() == {0: 2, 1: 2}
    assert t["entities"].empty and list(t["entities"].columns) == ["entity_id", "name", "aliases", "type"]


# --- errors ------------------------------------------------------------------------------------

def error_cases(tmp_path):
    docs = write_jsonl(tmp_path / "docs.jsonl", LOCAL_DOCS)
    empty = tmp_path / "empty.csv"
    empty.write_text("text,snapshot\n")
    ts = tmp_path / "ts.csv"
    pd.DataFrame({"snapshot": ["2020-01-01", "2022-06-01"], "text": ["a", "b"]}).to_csv(ts, index=False)
    no_text = write_jsonl(tmp_path / "no_definitions.jsonl", [{**r, "definition": ""} for r in ECBD])
    return [
        ({"source": "wikipedia"}, r"data\.source: 'wikipedia' is not one of"),
        ({"source": "ecbd", "ecbd": {"path": str(no_text)}}, "empty corpus: no documents at all"),
        ({"source": "synthetic", "synthetic": {"n_entitys": 5}}, r"data\.synthetic: unknown key\(s\) \['n_entitys'\]"),
        ({"source": "local", "local": {**LOCAL, "text_field": "content", "documents": str(docs)}},
         r"docs\.jsonl: missing column\(s\) \['content'\]"),
        ({"source": "local", "local": {"documents": str(tmp_path / "nope.jsonl")}}, r"nope\.jsonl: file not found"),
        ({"source": "local", "local": {"documents": str(empty)}}, "no documents"),
        ({"source": "local", "local": {"documents": str(ts), "boundaries": ["2021-01-01", "2022-01-01"]}},
         r"snapshot 1 \(2021-01-01\) has no documents"),
        ({"source": "local", "local": {**LOCAL, "documents": str(docs), "id_field": "snapshot"}}, "appears twice"),
        ({"source": "local", "local": {}}, "data.local.documents"),
        ({"source": "ecbd", "ecbd": {}}, "data.ecbd.path"),
        ({"source": "temporalwiki", "temporalwiki": {"local_dir": str(tmp_path / "nowhere")}}, "file not found"),
    ]


def test_errors_leave_no_corpus(tmp_path):
    for i, (params, message) in enumerate(error_cases(tmp_path)):
        with pytest.raises(InputError, match=message):
            download.run(params, out=str(tmp_path / "corpus"))
        assert_nothing_left(tmp_path)


def test_cli_download_and_error_exit(tmp_path, capsys):
    out = tmp_path / "corpus"
    params = json.dumps({"source": "synthetic", "synthetic": {"n_entities": 20, "docs_per_entity": 1}})
    assert cli.main(["download", "--params", params, "--out", str(out)]) == 0
    t, m = read(out)
    # One article per entity and snapshot (20, 22, 24 entities), plus the infoboxes of
    # the probe-worded half (10 of T0's entities, 1 of each period's 2 new ones).
    assert m["source"] == "synthetic" and len(t["documents"]) == (20 + 22 + 24) + (10 + 11 + 12)
    assert cli.main(["download", "--params", '{"source": "nope"}', "--out", str(tmp_path / "c2")]) == 2
    assert "data.source: 'nope' is not one of" in capsys.readouterr().err
    assert_nothing_left(tmp_path, "c2")
