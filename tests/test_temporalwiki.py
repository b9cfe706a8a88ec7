"""TemporalWiki as released (issue 10): fixtures in the release's own layouts
(tests/twiki_layout.py), unpacked in a local_dir and as the hub's zips (the folder the
hub path resolves after its download), and a test for each way the old adapter
mis-read them: base never found, changed probes mislabelled, first-N instead of a
sample, duplicates kept, titles taken from continuation chunks."""

import json

import pandas as pd
import pytest
import twiki_layout as tw

from gradloc import probes as probes_stage
from gradloc import split as split_stage
from gradloc import tagging as tagging_stage
from gradloc.data import download, temporalwiki
from gradloc.io import InputError


def run(tmp_path, name="corpus", **params):
    out = tmp_path / name
    download.run({"source": "temporalwiki", "temporalwiki": params}, out=str(out))
    tables = {p.stem: pd.read_parquet(p) for p in out.glob("*.parquet")}
    return tables, json.loads((out / "manifest.json").read_text())


@pytest.fixture(params=["unpacked", "zipped"])
def release(request, tmp_path):
    return tw.write_release(tmp_path / request.param, zipped=request.param == "zipped")


def test_layout_resolution_finds_every_file(release):
    layout = temporalwiki.resolve(release, tw.PERIODS)
    for p in tw.PERIODS:
        assert [f.name for f in layout.diffs[p]] == [f"wikipedia_{tw.SHORT[p]}_gpt2.csv"]
        assert {s: [f.name for f in fs] for s, fs in layout.probes[p].items()} == {
            "changed": [f"{p}_changed.csv"], "unchanged": [f"{p}_unchanged.csv"]}
    # The 0801 base only: wikipedia_09_gpt2 is another month's dump.
    assert [str(f).replace("\\", "/").split("Wikipedia_Full")[-1] for f in layout.base] == [
        "/wikipedia_08_gpt2/part1.csv"]
    assert not any(".DS_Store" in str(f) or "__MACOSX" in str(f) for f in layout.files)


def test_without_base_changed_probes_stay_one_set(release, tmp_path):
    t, m = run(tmp_path, local_dir=str(release))
    assert m["base_snapshot"] == "missing" and m["changed_probes"] == "changed"
    assert m["counts"]["documents"]["0"] == 0
    raw = t["probes_raw"]
    assert set(raw["set"]) == {"changed", "unchanged"}  # never guessed new/updated
    assert m["counts"]["probes"]["1/changed"] == 2
    assert [s["label"] for s in m["snapshots"]] == ["0801", *tw.PERIODS]


def test_base_is_found_where_the_release_puts_it(release, tmp_path):
    t, m = run(tmp_path, local_dir=str(release), download_base=True)
    docs = t["documents"]
    assert m["base_snapshot"] == "present"
    base = docs[docs["snapshot"] == 0]
    assert set(base["kind"]) == {"full"} and set(base["title"]) == set(tw.BASE_PAGES)
    assert "Not The Base" not in set(docs["title"])
    assert m["chunks"]["0"]["titles"] == len(tw.BASE_PAGES)
    # With base titles, TemporalWiki's changed set splits as its authors meant it.
    raw = t["probes_raw"]
    assert m["changed_probes"] == "split" and "changed" not in set(raw["set"])
    for k, p in enumerate(tw.PERIODS, 1):
        got = raw[(raw["period"] == k) & (raw["set"] == "new")]["subject"]
        assert set(got) == tw.NEW_SUBJECTS[p], p
        assert set(raw[(raw["period"] == k) & (raw["set"] == "updated")]["subject"]).isdisjoint(tw.NEW_SUBJECTS[p])


def test_titles_from_first_chunks_and_duplicates_dropped(tmp_path):
    root = tw.write_release(tmp_path / "r")
    t, m = run(tmp_path, local_dir=str(root))
    docs = t["documents"]
    p1 = docs[docs["snapshot"] == 1]
    # 2 pages x 3 chunks, 2 of the 8 rows were repeats.
    assert m["chunks"]["1"] == {"rows": 8, "duplicates": 2, "kept": 6, "titles": 2}
    assert not p1["text"].duplicated().any()
    # Continuation chunks (mid-sentence) carry their page's title, never their own head.
    assert p1["title"].tolist() == ["Mara Keller"] * 3 + ["Nova Labs"] * 3
    assert p1["doc_id"].is_unique


def test_page_title_heuristic():
    first, cont, last = tw.page_chunks("Mara Keller")
    assert temporalwiki.page_title(first, None) == "Mara Keller"
    assert temporalwiki.page_title(cont, first) is None          # previous chunk was cut mid-sentence
    assert temporalwiki.page_title("Nova Labs. Nova Labs is a firm.", last) == "Nova Labs"
    assert temporalwiki.page_title("the end of it. More text", "x" * 2000) is None


def test_max_docs_is_a_seeded_uniform_sample(tmp_path):
    root = tmp_path / "big"
    tw.write_release(root)
    pages = [f"Page {i}" for i in range(300)]
    rows = tw.rows_of(pages, chunks=1)
    (root / "TWiki_Diffsets" / "wikipedia_0809_gpt2.csv").write_text(tw.text_csv(rows))
    t, m = run(tmp_path, local_dir=str(root), max_docs_per_period=30)
    p1 = t["documents"][t["documents"]["snapshot"] == 1]
    assert len(p1) == 30 and m["chunks"]["1"]["duplicates"] == len(rows) - 300 > 100
    rows = sorted(int(d.split(":")[1]) for d in p1["doc_id"])
    assert rows[-1] > 150, "a sample of the whole file, not its first rows"
    assert p1["title"].str.startswith("Page ").all()
    t2, _ = run(tmp_path, "again", local_dir=str(root), max_docs_per_period=30)
    assert t2["documents"]["doc_id"].tolist() == t["documents"]["doc_id"].tolist()
    t3, _ = run(tmp_path, "seed1", local_dir=str(root), max_docs_per_period=30, seed=1)
    assert t3["documents"]["doc_id"].tolist() != t["documents"]["doc_id"].tolist()


def test_missing_base_when_asked_is_an_error_naming_the_fix(tmp_path):
    root = tw.write_release(tmp_path / "r", base=False)
    with pytest.raises(InputError, match=r"download_base is true but the base snapshot is not there.*"
                                         r"wikipedia_08_gpt2/part\*\.csv.*Fix"):
        run(tmp_path, local_dir=str(root), download_base=True)
    assert not (tmp_path / "corpus").exists()
    with pytest.raises(InputError, match=r"new_vs_updated is 'split'.*Fix"):
        run(tmp_path, local_dir=str(root), new_vs_updated="split")


def test_changed_kept_on_request_even_with_base(tmp_path):
    root = tw.write_release(tmp_path / "r")
    t, m = run(tmp_path, local_dir=str(root), download_base=True, new_vs_updated="changed")
    assert m["base_snapshot"] == "present" and set(t["probes_raw"]["set"]) == {"changed", "unchanged"}


def test_missing_period_lists_the_files_found(tmp_path):
    root = tw.write_release(tmp_path / "r", zipped=True)
    (root / "TWiki_Probes.zip").unlink()
    with pytest.raises(InputError, match=r"no probe .* period 0801-0901.*TWiki_Diffsets\.zip:TWiki_Diffsets/"
                                         r"wikipedia_0809_gpt2\.csv"):
        run(tmp_path, local_dir=str(root))


def test_hub_fetches_only_the_zips_it_needs(monkeypatch, tmp_path):
    """The hub call itself cannot run here (no network); what it asks for can be checked."""
    calls = []
    monkeypatch.setattr(temporalwiki, "_snapshot_download",
                        lambda repo, rev, patterns: calls.append(patterns) or str(tw.write_release(tmp_path / "h", True)))
    temporalwiki.fetch(temporalwiki.with_defaults({}))
    temporalwiki.fetch(temporalwiki.with_defaults({"download_base": True}))
    assert calls == [["TWiki_Diffsets.zip", "TWiki_Probes.zip"],
                     ["TWiki_Diffsets.zip", "TWiki_Probes.zip", "Wikipedia_Full.zip"]]


@pytest.mark.parametrize("change, needs", [
    ({}, "model.source: scratch"),
    ({"model": {"source": "gguf", "teach_t0": True}}, "model.teach_t0"),
    ({"model": {"source": "pretrained"}, "train": {"methods": {"mr": {"replay": {"ratio": 1.0}}}}}, "replay"),
    ({"model": {"source": "pretrained"}, "train": {"methods": {"t": {"layers": "tgl_fp"}}}}, "layer selection"),
])
def test_config_needing_base_without_it_fails_before_any_job(change, needs):
    config = {"data": {"source": "temporalwiki", "temporalwiki": {"download_base": False}},
              "model": {"source": "scratch"}, "train": {"methods": {"full": {}}}, **change}
    with pytest.raises(InputError, match=rf"download_base is false.*{needs}.*Fix: set data\.temporalwiki\."
                                         r"download_base: true"):
        temporalwiki.check_base(config)
    config["data"]["temporalwiki"]["download_base"] = True
    temporalwiki.check_base(config)
    ok = {"data": {"source": "temporalwiki", "temporalwiki": {}}, "model": {"source": "pretrained"},
          "train": {"methods": {"full": {}, "lora": {"lora": {}}}}}
    temporalwiki.check_base(ok)


def test_changed_set_reaches_the_probe_stage(tmp_path):
    """download -> split -> tagging -> probes: TemporalWiki's `changed` set is a probe set."""
    root = tw.write_release(tmp_path / "r")
    run(tmp_path, local_dir=str(root))
    corpus = tmp_path / "corpus"
    split_stage.run({}, str(corpus), str(tmp_path / "split"))
    tagging_stage.run({}, str(corpus), str(tmp_path / "split"), str(tmp_path / "tagged"))
    probes_stage.run({}, str(corpus), str(tmp_path / "tagged"), str(tmp_path / "probes"))
    pr = pd.read_parquet(tmp_path / "probes" / "probes.parquet")
    assert {"changed", "unchanged"} <= set(pr["set"])
    counts = json.loads((tmp_path / "probes" / "manifest.json").read_text())["counts"]
    assert counts["1"]["changed"] == 2
