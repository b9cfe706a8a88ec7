"""The whole DAG on config/test.yaml (one shared run, see conftest.test_run)."""

import json
import math

import pandas as pd
import yaml
from conftest import run_snakemake

from helpers import ROOT

CONFIG = yaml.safe_load((ROOT / "config/test.yaml").read_text())
METHODS = list(CONFIG["train"]["methods"])
PERIODS = [1, 2]


def test_every_stage_produced_its_outputs(test_run):
    seqs = pd.read_parquet(test_run / "tagged/sequences.parquet")
    for p in PERIODS:
        types = seqs[(seqs.period == p) & (seqs.split == "train")].knowledge_type.value_counts()
        assert types.get("new", 0) > 0 and types.get("updated", 0) > 0, (p, types.to_dict())
    probes = pd.read_parquet(test_run / "probes/probes.parquet")
    for p in PERIODS:
        sets = probes[probes.period == p]["set"].value_counts()
        assert all(sets.get(s, 0) > 0 for s in ["unchanged", "updated", "new", "outdated"]), (p, sets.to_dict())
    selection = json.loads((test_run / "select/selection.json").read_text())
    assert selection["units"] and all(u.startswith("block.") for u in selection["units"])


def test_report_has_every_method_and_period_with_finite_numbers(test_run):
    table = pd.read_csv(test_run / "report/table.csv")
    rows = table[table.period.astype(str) != "all"]
    assert set(rows.method) == {"base", *METHODS}
    for m in METHODS:
        assert sorted(rows[rows.method == m].period.astype(int)) == PERIODS
    for s in ["unchanged", "updated", "new"]:
        col = next(c for c in table.columns if c.startswith(s) and "object_ppl" in c and "std" not in c)
        assert table[col].map(lambda v: math.isfinite(float(v)) and float(v) > 1).all(), col
    md = (test_run / "report/table.md").read_text()
    assert all(m in md for m in METHODS)


def test_fact_level_metrics_lead_the_report_and_the_negative_control_is_labelled(test_run):
    summary = json.loads((test_run / "eval/full/seed0/P1/summary.json").read_text())
    facts = summary["facts"]
    assert facts["candidates"] == 10
    for s in ("new", "updated", "unchanged"):
        entry = facts["sets"][s]
        assert entry["n"] + entry["n_constant"] == summary[s]["n"]
        assert 0 <= entry["hits1"] <= 1 and 0 < entry["chance_hits1"] <= 0.5, (s, entry)
    assert facts["efficacy"]["n"] == facts["sets"]["updated"]["n"]
    scores = pd.read_parquet(test_run / "eval/full/seed0/P1/scores.parquet")
    assert scores["n_candidates"].between(2, 10).all() and scores["hits1"].between(0, 1).all()
    control = json.loads((test_run / "train/negative_control/seed0/P1/metrics.json").read_text())
    assert control["permute_objects"]["facts_made_wrong"] > 0 and control["permute_objects"]["replacements"] > 0
    table = pd.read_csv(test_run / "report/table.csv")
    assert table["fact_fact_uptake_mean"].notna().any() and "fact_fuar_mean" in table
    md = (test_run / "report/table.md").read_text()
    assert md.index("## Fact-level results") < md.index("Object perplexity") < md.index("## Per period")
    assert "negative_control (negative control)" in md and "*chance*" in md


def test_training_changed_the_model_and_full_learned_the_diff(test_run):
    base = {p: json.loads((test_run / f"eval/base/P{p}/summary.json").read_text()) for p in PERIODS}
    full = json.loads((test_run / "eval/full/seed0/P1/summary.json").read_text())
    # Training on period 1's diff makes its held-out text more likely.
    assert full["heldout_ppl"] < base[1]["heldout_ppl"]


def test_logs_show_the_command_to_rerun_by_hand(test_run):
    log = (test_run / "logs/train/tgl_fp/P2.log").read_text()  # group_seeds: one log per method and period
    first = next(line for line in log.splitlines() if line.startswith("command: "))
    assert first.startswith("command: gradloc train --params ")
    assert "--init" in first and "/train/tgl_fp/seed0/P1" in first and "--seed 0 " in first
    log = (test_run / "logs/eval/tgl_fp/P2.log").read_text()
    first = next(line for line in log.splitlines() if line.startswith("command: "))
    assert first.startswith("command: gradloc evaluate --params ") and "/train/tgl_fp/seed0/P2" in first


def test_nothing_left_to_do_and_html_report(test_run, tmp_path):
    r = run_snakemake("-n", "--configfile", "config/test.yaml", results=test_run)
    assert "Nothing to be done" in r.stdout + r.stderr
    html = tmp_path / "report.html"
    run_snakemake("--configfile", "config/test.yaml", "--report", str(html), results=test_run)
    text = html.read_text(errors="replace")
    assert len(text) > 100_000 and "tradeoff.png" in text and "heatmap.png" in text and "fact_tradeoff.png" in text
