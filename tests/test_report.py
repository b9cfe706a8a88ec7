"""`gradloc report`: exact table numbers (mean, std, uptake, forgetting) for a hand-made
case, the Markdown, non-blank figures, determinism, method/seed/period from the files
(not folder names), other probe sets (TemporalWiki's `changed`) and errors on bad input."""

import json
import math
import os
import re

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from gradloc import cli, figures, report
from gradloc.io import InputError

SETS = ("unchanged", "updated", "new", "outdated")

# object_ppl per set, top1 per set and heldout_ppl of the base model, per period.
BASE = {
    1: {"ppl": {"unchanged": 10.0, "updated": 40.0, "new": 80.0, "outdated": 20.0},
        "top1": {"unchanged": 0.5, "updated": 0.1, "new": 0.0, "outdated": 0.4}, "heldout": 30.0},
    2: {"ppl": {"unchanged": 11.0, "updated": 44.0, "new": 90.0, "outdated": 22.0},
        "top1": {"unchanged": 0.5, "updated": 0.2, "new": 0.0, "outdated": 0.3}, "heldout": 32.0},
}
# Method values: (method, seed, period) -> (unchanged ppl, updated ppl, new ppl, new top1).
# The other sets are fixed, so only these drive the hand-computed numbers below.
METHOD = {
    ("full", 0, 1): (12.0, 30.0, 50.0, 0.2), ("full", 1, 1): (14.0, 32.0, 54.0, 0.4),
    ("full", 0, 2): (13.0, 34.0, 60.0, 0.3), ("full", 1, 2): (15.0, 36.0, 64.0, 0.5),
    ("tgl_fp+mix_review", 0, 1): (10.5, 35.0, 60.0, 0.1), ("tgl_fp+mix_review", 1, 1): (10.5, 37.0, 62.0, 0.1),
    ("tgl_fp+mix_review", 0, 2): (11.5, 39.0, 70.0, 0.2), ("tgl_fp+mix_review", 1, 2): (11.5, 41.0, 72.0, 0.2),
}


def write_eval(folder, ppl, top1, heldout, method, seed, period, sets=SETS):
    folder.mkdir(parents=True)
    summary = {s: {"object_ppl": ppl[s], "statement_ppl": ppl[s] / 2, "top1": top1[s], "n": 10} for s in sets}
    summary.update(heldout_ppl=heldout, method=method, seed=seed, period=period)
    (folder / "summary.json").write_text(json.dumps(summary))
    # scores.parquet is part of the format; the report reads only the summary.
    pd.DataFrame({"probe_id": ["p0"], "set": ["new"], "object_logprob": [-1.0], "object_tokens": [1],
                  "statement_logprob": [-2.0], "statement_tokens": [3], "top1": [True]}).to_parquet(
        folder / "scores.parquet")


def write_train(folder, method, seed, period):
    folder.mkdir(parents=True)
    steps = np.arange(0, 50, 10)
    loss = 4.0 - 0.02 * steps - 0.1 * seed - 0.3 * period - 0.2 * len(method) / 10
    pd.DataFrame({"step": steps, "epoch": 0, "loss": loss, "lr": 1e-3, "tokens_per_s": 1000.0}).to_csv(
        folder / "log.csv", index=False)
    (folder / "metrics.json").write_text(json.dumps(
        {"method": method, "seed": seed, "period": period, "trainable_params": 1000 * len(method),
         "wall_time_s": 2.0 + seed}))


def write_profile(folder):
    folder.mkdir(parents=True)
    rows = []
    for layer in range(-1, 4):
        unit = "embed" if layer < 0 else f"block.{layer}"
        for i, t in enumerate(("new", "updated", "unchanged", "control")):
            rel = 1.0 if t == "control" else 0.8 + 0.1 * layer + 0.05 * i
            rows.append({"knowledge_type": t, "granularity": "block", "unit": unit, "layer": layer,
                         "rel": rel, "lo": rel - 0.05, "hi": rel + 0.05})
    pd.DataFrame(rows).to_csv(folder / "relative.csv", index=False)


@pytest.fixture
def inputs(tmp_path):
    """Results of 2 methods x 2 seeds x 2 periods plus the base model, as the pipeline
    lays them out; evals in config order (base first, then full, then the combination)."""
    root = tmp_path / "results"
    evals, trains = [], []
    for p, b in BASE.items():
        write_eval(root / "eval" / "base" / f"P{p}", b["ppl"], b["top1"], b["heldout"], "base", None, p)
        evals.append(str(root / "eval" / "base" / f"P{p}"))
    for (method, seed, p), (unch, upd, new, new_top1) in METHOD.items():
        ppl = {"unchanged": unch, "updated": upd, "new": new, "outdated": 25.0}
        top1 = {**BASE[p]["top1"], "new": new_top1}
        folder = root / "eval" / method / f"seed{seed}" / f"P{p}"
        write_eval(folder, ppl, top1, 28.0 + seed, method, seed, p)
        evals.append(str(folder))
        write_train(root / "train" / method / f"seed{seed}" / f"P{p}", method, seed, p)
        trains.append(str(root / "train" / method / f"seed{seed}" / f"P{p}"))
    write_profile(root / "profile")
    (root / "base_model").mkdir()
    (root / "base_model" / "metrics.json").write_text(json.dumps(
        {"steps": 60, "t0_probes": {"unchanged": {"n": 30, "object_ppl": 12.5, "top1": 0.42}}}))
    return {"evals": evals, "trains": trains, "profile": str(root / "profile"),
            "base_model": str(root / "base_model"), "out": str(tmp_path / "report")}


def run_report(inputs, **params):
    report.run({"dpi": 40, **params}, **inputs)
    return pd.read_csv(f"{inputs['out']}/table.csv", keep_default_na=True, dtype={"period": str})


def row(table, method, period):
    sel = table[(table["method"] == method) & (table["period"] == str(period))]
    assert len(sel) == 1
    return sel.iloc[0]


def test_table_numbers_by_hand(inputs):
    table = run_report(inputs)
    # Row order: base first, then config order; per period, then the averages.
    assert list(zip(table["method"], table["period"])) == [
        ("base", "1"), ("base", "2"), ("full", "1"), ("full", "2"),
        ("tgl_fp+mix_review", "1"), ("tgl_fp+mix_review", "2"),
        ("base", "all"), ("full", "all"), ("tgl_fp+mix_review", "all")]

    full1 = row(table, "full", 1)
    assert full1["n_seeds"] == 2
    assert full1["new_object_ppl_mean"] == pytest.approx(52.0)
    assert full1["new_object_ppl_std"] == pytest.approx(math.sqrt(8))  # (50, 54): sample std
    # Perplexities: ln(base) - ln(method), per seed, then mean and sample std over seeds.
    ln = math.log
    assert full1["uptake_new_mean"] == pytest.approx(ln(80) - (ln(50) + ln(54)) / 2)
    assert full1["uptake_new_std"] == pytest.approx((ln(54) - ln(50)) / math.sqrt(2))
    assert full1["uptake_updated_mean"] == pytest.approx(ln(40) - (ln(30) + ln(32)) / 2)
    assert full1["uptake_mean"] == pytest.approx((full1["uptake_new_mean"] + full1["uptake_updated_mean"]) / 2)
    assert full1["forgetting_mean"] == pytest.approx((ln(12) + ln(14)) / 2 - ln(10))  # positive: forgot
    assert full1["forgetting_std"] == pytest.approx((ln(14) - ln(12)) / math.sqrt(2))
    assert full1["top1_gain_new_mean"] == pytest.approx(0.3)
    assert full1["top1_forgetting_mean"] == pytest.approx(0.0)
    assert full1["heldout_ppl_mean"] == pytest.approx(28.5)
    assert full1["trainable_params_mean"] == 4000 and full1["wall_time_s_mean"] == pytest.approx(2.5)

    combo2 = row(table, "tgl_fp+mix_review", 2)
    assert combo2["forgetting_mean"] == pytest.approx(ln(11.5) - ln(11))
    assert combo2["forgetting_std"] == pytest.approx(0.0)
    assert combo2["uptake_new_mean"] == pytest.approx(ln(90) - (ln(70) + ln(72)) / 2)

    # Averages over periods: per seed over periods, then over seeds.
    full_all = row(table, "full", "all")
    seed0 = ((ln(80) - ln(50)) + (ln(90) - ln(60))) / 2, ((ln(12) - ln(10)) + (ln(13) - ln(11))) / 2
    seed1 = ((ln(80) - ln(54)) + (ln(90) - ln(64))) / 2, ((ln(14) - ln(10)) + (ln(15) - ln(11))) / 2
    assert full_all["uptake_new_mean"] == pytest.approx((seed0[0] + seed1[0]) / 2)
    assert full_all["forgetting_mean"] == pytest.approx((seed0[1] + seed1[1]) / 2)
    assert full_all["forgetting_std"] == pytest.approx(abs(seed1[1] - seed0[1]) / math.sqrt(2))

    base1 = row(table, "base", 1)
    assert base1["unchanged_object_ppl_mean"] == 10.0 and base1["uptake_mean"] == 0.0
    assert math.isnan(base1["unchanged_object_ppl_std"])  # one evaluation, no spread
    assert base1["n_seeds"] == 1

    # Best per column within a period: full learns more, the combination forgets less.
    assert "uptake_new" in full1["best"].split(";")
    assert "forgetting" in row(table, "tgl_fp+mix_review", 1)["best"].split(";")
    assert "forgetting" not in full1["best"].split(";")
    assert isinstance(base1["best"], float) or base1["best"] == ""  # base is never ranked


def test_markdown_and_figures(inputs):
    run_report(inputs, title="My report")
    md = open(f"{inputs['out']}/table.md").read()
    assert md.startswith("# My report")
    for name in ("base", "full", "tgl_fp+mix_review"):
        assert f"| {name} |" in md
    for s in SETS:
        assert f"{s} object_ppl" in md and f"{s} top1" in md
    assert "uptake" in md and "forgetting" in md and "ln(base object_ppl) − ln(method object_ppl)" in md
    ln = math.log
    up, sd = ln(80) - (ln(50) + ln(54)) / 2, (ln(54) - ln(50)) / math.sqrt(2)
    assert f"**{up:.3f} ± {sd:.3f}**" in md  # full's uptake on new in period 1, the best
    assert "t0_probes.unchanged.top1 = 0.420" in md  # base model context, as basemodel writes it
    assert "| full | 1 | 2 | 4,000 ± 0 | 2.500 ± 0.707 |" in md  # training cost
    for fig in ("heatmap", "tradeoff", "curves"):
        img = mpimg.imread(f"{inputs['out']}/{fig}.png")
        assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
        assert img[..., :3].var() > 0


def test_deterministic_csv(inputs, tmp_path):
    run_report(inputs)
    first = open(f"{inputs['out']}/table.csv", "rb").read()
    again = {**inputs, "out": str(tmp_path / "again")}
    report.run({"dpi": 40}, **again)
    assert open(f"{again['out']}/table.csv", "rb").read() == first


def test_top1_primary_metric(inputs):
    table = run_report(inputs, primary_metric="top1")
    full1 = row(table, "full", 1)
    assert full1["uptake_new_mean"] == pytest.approx(0.3)  # method - base for accuracy
    assert full1["forgetting_mean"] == pytest.approx(0.0)
    assert "unchanged_object_ppl_mean" not in table.columns
    assert "top1_gain_new_mean" not in table.columns  # would repeat uptake_new


def test_cli_and_heatmap_fallback(inputs, tmp_path):
    # Without relative.csv the profile's own heatmap.png is copied.
    profile = tmp_path / "profile_png"
    profile.mkdir()
    src = f"{inputs['out']}_src.png"
    figures.heatmap(pd.read_csv(f"{inputs['profile']}/relative.csv"), src, 40)
    (profile / "heatmap.png").write_bytes(open(src, "rb").read())
    argv = ["report", "--params", '{"dpi": 40}', "--evals", *inputs["evals"], "--trains", *inputs["trains"],
            "--profile", str(profile), "--base-model", inputs["base_model"], "--out", inputs["out"]]
    assert cli.main(argv) == 0
    assert open(f"{inputs['out']}/heatmap.png", "rb").read() == open(src, "rb").read()


def test_missing_summary_is_named(inputs):
    folder = next(e for e in inputs["evals"] if e.endswith("full/seed1/P2"))
    os.remove(f"{folder}/summary.json")
    with pytest.raises(InputError, match=r"full/seed1/P2/summary\.json"):
        report.run({}, **inputs)


def test_errors(inputs, tmp_path):
    with pytest.raises(InputError, match="no eval folders"):
        report.run({}, **{**inputs, "evals": []})
    with pytest.raises(InputError, match=r"seed0/summary\.json: file not found"):
        report.run({}, **{**inputs, "evals": [str(tmp_path / "eval" / "full" / "seed0")]})
    with pytest.raises(InputError, match="duplicate"):
        report.run({}, **{**inputs, "evals": inputs["evals"] + inputs["evals"][:1]})
    bad = tmp_path / "eval" / "bad" / "seed0" / "P1"
    bad.mkdir(parents=True)
    (bad / "summary.json").write_text(json.dumps({"method": "bad", "seed": 0, "period": 1,
                                                  "new": {"object_ppl": "high"}}))
    with pytest.raises(InputError, match=r"new\.object_ppl"):
        report.run({}, **{**inputs, "evals": [str(bad)]})
    with pytest.raises(InputError, match="report params.primary_metric"):
        report.run({"primary_metric": "bleu"}, **inputs)
    with pytest.raises(InputError, match="report params.*'titel'"):  # a typo is an error, not ignored
        report.run({"titel": "x"}, **inputs)
    assert not (tmp_path / "report").exists()  # nothing half-written


def test_missing_set_and_nan_stay_empty(inputs):
    # A period without outdated probes (set absent) and no held-out sequences (null, as
    # the evaluate stage writes "nothing measured") give empty cells, not errors.
    for folder in inputs["evals"]:
        path = f"{folder}/summary.json"
        summary = json.load(open(path))
        del summary["outdated"]
        summary["heldout_ppl"] = None
        open(path, "w").write(json.dumps(summary))
    table = run_report(inputs)
    full1 = row(table, "full", 1)
    assert math.isnan(full1["outdated_object_ppl_mean"]) and math.isnan(full1["heldout_ppl_mean"])
    assert full1["uptake_new_mean"] == pytest.approx(math.log(80) - (math.log(50) + math.log(54)) / 2)
    md = open(f"{inputs['out']}/table.md").read()
    assert "| full | 1 | 2 | 13.000 ± 1.414 | 31.000 ± 1.414 | 52.000 ± 2.828 | – |" in md.replace("**", "")


def test_identity_comes_from_the_files_not_the_folder_names(inputs, tmp_path):
    run_report(inputs)
    expected = open(f"{inputs['out']}/table.csv", "rb").read()
    # Every folder renamed (in reverse order, so no name hints at its content), and one
    # named as if it held full/seed0/P1 while its summary.json says
    # tgl_fp+mix_review, seed 1, period 2: the table is the same.
    liar = next(e for e in inputs["evals"] if e.endswith("tgl_fp+mix_review/seed1/P2"))
    renamed = {"evals": [], "trains": []}
    for kind in renamed:
        for i, folder in enumerate(inputs[kind]):
            dest = tmp_path / "elsewhere" / kind / f"run-{len(inputs[kind]) - i:02d}"
            if folder == liar:
                dest = tmp_path / "elsewhere" / "eval" / "full" / "seed0" / "P1"
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(folder, dest)
            renamed[kind].append(str(dest))
    out = tmp_path / "renamed"
    report.run({"dpi": 40}, **{**inputs, **renamed, "out": str(out)})
    assert open(out / "table.csv", "rb").read() == expected


@pytest.mark.parametrize("kind,name", [("evals", "summary.json"), ("trains", "metrics.json")])
def test_missing_identity_is_named(inputs, kind, name):
    folder = inputs[kind][3]
    data = json.load(open(f"{folder}/{name}"))
    del data["seed"], data["period"]
    open(f"{folder}/{name}", "w").write(json.dumps(data))
    with pytest.raises(InputError, match=rf"{folder}/{name}: missing key\(s\) \['seed', 'period'\]"):
        report.run({}, **inputs)


def test_changed_set_counts_as_uptake(tmp_path):
    # TemporalWiki without base evidence: one merged `changed` set, no new / updated.
    root, evals = tmp_path / "results", []
    sets = ("unchanged", "changed")
    for method, seed, changed, unch in [("base", None, 50.0, 10.0), ("full", 0, 20.0, 12.0), ("full", 1, 25.0, 11.0)]:
        folder = root / "eval" / f"{method}{seed}"
        write_eval(folder, {"unchanged": unch, "changed": changed}, {"unchanged": 0.5, "changed": 0.1 + (seed or 0)},
                   30.0, method, seed, 1, sets=sets)
        evals.append(str(folder))
    write_profile(root / "profile")
    (root / "base_model").mkdir()
    (root / "base_model" / "metrics.json").write_text("{}")
    inputs = {"evals": evals, "trains": [], "profile": str(root / "profile"), "base_model": str(root / "base_model"),
              "out": str(tmp_path / "report")}
    table = run_report(inputs)
    full1, ln = row(table, "full", 1), math.log
    assert full1["uptake_changed_mean"] == pytest.approx(ln(50) - (ln(20) + ln(25)) / 2)
    assert full1["uptake_mean"] == pytest.approx(full1["uptake_changed_mean"])  # the only uptake set
    assert math.isnan(full1["uptake_new_mean"]) and math.isnan(full1["uptake_updated_mean"])
    assert full1["top1_gain_changed_mean"] == pytest.approx(0.5)
    assert full1["forgetting_mean"] == pytest.approx((ln(12) + ln(11)) / 2 - ln(10))
    md = open(f"{inputs['out']}/table.md").read()
    assert "changed object_ppl" in md and "uptake changed" in md
    assert "**uptake** = uptake changed (the only such set evaluated)" in md


def test_versus_full_by_hand():
    from gradloc.report import table as T

    rows = []
    for seed in (0, 1):
        for i in range(4):
            for method, nll, top in (("full", 2.0, 1.0), ("tgl_fp", 1.5, 1.0)):  # tgl_fp: 0.5 nats better on new
                rows.append({"method": method, "seed": seed, "period": 1, "probe_id": f"n{i}", "set": "new",
                             "nll": nll, "top1": top})
            for method, nll, top in (("full", 1.0, 1.0), ("tgl_fp", 1.2, 0.0 if i == 0 else 1.0)):
                rows.append({"method": method, "seed": seed, "period": 1, "probe_id": f"u{i}", "set": "unchanged",
                             "nll": nll, "top1": top})
    vs = T.versus_full(pd.DataFrame(rows), ["base", "full", "tgl_fp"], n_boot=200)
    r = vs[vs["period"] == T.ALL_PERIODS].iloc[0]
    assert r["method"] == "tgl_fp"
    assert r["uptake_vs_full"] == pytest.approx(0.5) and r["uptake_vs_full_lo"] == pytest.approx(0.5)
    assert r["forgetting_vs_full"] == pytest.approx(0.2)
    assert r["top1_uptake_vs_full"] == 0 and r["top1_forgetting_vs_full"] == pytest.approx(25.0)
    assert r["top1_forgetting_vs_full_lo"] <= 25.0 <= r["top1_forgetting_vs_full_hi"]
    lines = "\n".join(T.versus_full_lines(vs))
    assert "| tgl_fp | +0.5 [+0.5, +0.5] | +0.2" in lines


@pytest.mark.parametrize("where", ["summary", "metrics", "log", "relative"])
def test_non_finite_inputs_are_refused_naming_the_file(inputs, where, capsys):
    """NaN never becomes a table cell: a non-finite number in any input is an error (exit 2)
    naming the file, and no report is written."""
    folder = next(e for e in inputs["evals"] if e.endswith("full/seed1/P2"))
    train = next(t for t in inputs["trains"] if t.endswith("full/seed1/P2"))
    if where == "summary":
        path = f"{folder}/summary.json"
        summary = json.load(open(path))
        summary["new"]["object_ppl"] = float("nan")
        open(path, "w").write(json.dumps(summary))  # Python writes the bare token NaN
    elif where == "metrics":
        path = f"{train}/metrics.json"
        text = open(path).read()
        assert '"wall_time_s": 3.0' in text
        open(path, "w").write(text.replace('"wall_time_s": 3.0', '"wall_time_s": Infinity'))
    elif where == "log":
        path = f"{train}/log.csv"
        df = pd.read_csv(path)
        df.loc[3, "loss"] = float("nan")
        df.to_csv(path, index=False)
    else:
        path = f"{inputs['profile']}/relative.csv"
        df = pd.read_csv(path)
        df.loc[2, "rel"] = float("inf")
        df.to_csv(path, index=False)
    argv = ["report", "--params", '{"dpi": 40}', "--evals", *inputs["evals"], "--trains", *inputs["trains"],
            "--profile", inputs["profile"], "--base-model", inputs["base_model"], "--out", inputs["out"]]
    assert cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gradloc report: error:")]
    assert len(err) == 1 and path in err[0] and "non-finite" in err[0], err
    assert not os.path.exists(inputs["out"])


def test_permutation_p_value_beside_the_profile(inputs):
    """profile/tests.json's new-vs-updated p-value is one line of table.md (issue #24)."""
    test = {"available": True, "reason": None, "test": "label permutation", "granularity": "block",
            "units": ["block.0"], "statistic": "max_u |r_new - r_updated|", "observed": 0.25, "p_value": 0.0123,
            "shape_statistic": "shape", "shape_observed": 0.1, "shape_p_value": 0.5, "permutations": 999,
            "seed": 0, "exchange_unit": "entity", "n_sequences": {"new": 5, "updated": 5},
            "n_clusters": {"new": 3, "updated": 3}}
    path = os.path.join(inputs["profile"], "tests.json")
    open(path, "w").write(json.dumps({"new_vs_updated": test}))
    run_report(inputs)
    md = open(f"{inputs['out']}/table.md").read()
    line = next(x for x in md.splitlines() if "new vs updated" in x)
    assert "p = 0.0123" in line and "999 permutations exchanging entities" in line and "max_u |r_new - r_updated| = 0.25" in line
    open(path, "w").write(json.dumps({"new_vs_updated": {**test, "available": False, "reason": "no new sequences profiled"}}))
    run_report(inputs)
    assert "no permutation test (no new sequences profiled)" in open(f"{inputs['out']}/table.md").read()


# --- claims.py: the layer null, the TGL-ALR multipliers, the claims table -------------------

def write_fact_eval(folder, method, seed, period, hits, efficacy):
    """An eval folder with fact-level metrics only: hits = {set: hits@1}."""
    folder.mkdir(parents=True)
    sets = {s: {"hits1": h, "n": 4} for s, h in hits.items()}
    (folder / "summary.json").write_text(json.dumps({
        "method": method, "seed": seed, "period": period,
        "facts": {"candidates": 10, "sets": sets, "efficacy": {"share": efficacy, "n": 4}}}))


def write_null_train(folder, method, seed, period, layers, units, subset=None):
    folder.mkdir(parents=True)
    config = {"layers": layers, **({"subset": subset} if subset else {})}
    (folder / "metrics.json").write_text(json.dumps(
        {"method": method, "seed": seed, "period": period, "method_config": config, "trained_units": units}))


def null_results(root):
    """base, tgl_fp and 5 null runs (null_4 trains null_0's blocks again), 2 seeds, 1 period.
    tgl_fp: new hits@1 0.6; nulls 0.2, 0.4, 0.6, 0.8 (+ the repeat 0.2): percentile (1 + 0.5) / 4."""
    evals, trains = [], []
    write_fact_eval(root / "eval/base/P1", "base", None, 1, {"new": 0.0, "updated": 0.0, "unchanged": 0.9}, 0.0)
    evals.append(str(root / "eval/base/P1"))
    runs = [("tgl_fp", "tgl_fp", ["block.1"], 0.6, 0.8)] + [
        (f"null_{i}", "subset", [f"block.{b}"], new, unch)
        for i, (b, new, unch) in enumerate([(0, 0.2, 0.7), (2, 0.4, 0.9), (3, 0.6, 0.6), (4, 0.8, 0.5), (0, 0.2, 0.7)])]
    for method, layers, units, new, unch in runs:
        for seed in (0, 1):
            e = root / f"eval/{method}/seed{seed}/P1"
            write_fact_eval(e, method, seed, 1, {"new": new, "updated": new / 2, "unchanged": unch}, new)
            t = root / f"train/{method}/seed{seed}/P1"
            write_null_train(t, method, seed, 1, layers, units, {"index": 0} if layers == "subset" else None)
            evals.append(str(e))
            trains.append(str(t))
    return evals, trains


def test_percentile_counts_ties_half():
    from gradloc.report.claims import percentile

    assert percentile(0.6, [0.2, 0.4, 0.6, 0.8]) == pytest.approx(62.5)
    assert percentile(1.0, [0.2, 0.4]) == 100.0 and percentile(0.0, [0.2, 0.4]) == 0.0
    assert math.isnan(percentile(0.5, [])) and math.isnan(percentile(math.nan, [0.1]))


def test_null_comparison_ranks_tgl_fp_among_distinct_null_subsets(tmp_path):
    from gradloc.report import claims

    evals, trains = null_results(tmp_path)
    null = claims.null_comparison(evals, trains)
    assert null["tgl_fp"] == "tgl_fp" and null["n"] == 4  # null_4 repeats null_0's blocks
    p1 = null["periods"]["1"]
    assert p1["null_methods"] == ["null_0", "null_1", "null_2", "null_3"]
    assert p1["metrics"]["new_hits1"]["percentile"] == pytest.approx(62.5)
    assert p1["metrics"]["efficacy_share"]["percentile"] == pytest.approx(62.5)
    # unchanged hits@1 0.8 beats 0.7, 0.6, 0.5 and loses to 0.9: forgets less than 3 of 4
    assert p1["metrics"]["unchanged_hits1"]["percentile"] == pytest.approx(75.0)
    assert p1["forgetting"]["tgl_fp"] == pytest.approx(0.1)  # base 0.9 - 0.8
    assert claims.null_passed(null) is False
    text, null_json, rows = claims.build(evals, trains, None, None, pd.DataFrame())
    assert "| 1 | 4 | hits@1 new | 60.0 | 50.0 [20.0, 80.0] | 62 |" in text
    assert rows[1]["verdict"] == "inconclusive"


def test_claim_a_reads_the_profiles_permutation_test(tmp_path):
    from gradloc.report.claims import claim_a

    assert claim_a(tmp_path)["verdict"] == "inconclusive" and claim_a(tmp_path)["reason"] == "no permutation test"
    test = {"p_value": 0.01, "permutations": 1000, "statistic": "L1 distance of the profiles", "observed": 0.42}
    (tmp_path / "tests.json").write_text(json.dumps({"new_vs_updated": test}))
    a = claim_a(tmp_path)
    assert a["verdict"] == "confirmed" and "p = 0.01 (1000 permutations)" in a["numbers"]
    (tmp_path / "tests.json").write_text(json.dumps({"new_vs_updated": {**test, "p_value": 0.05}}))
    assert claim_a(tmp_path)["verdict"] == "inconclusive"
    (tmp_path / "tests.json").write_text(json.dumps({"other": test}))
    assert claim_a(tmp_path)["reason"] == "no permutation test"
    (tmp_path / "tests.json").write_text(json.dumps({"new_vs_updated": {"p_value": 0.01}}))
    with pytest.raises(InputError, match="new_vs_updated lacks"):
        claim_a(tmp_path)


def test_claim_b_verdicts():
    from gradloc.report.claims import verdict_b

    better, worse, unclear = (2.0, 1.0, 3.0), (-2.0, -3.0, -1.0), (0.0, -1.0, 1.0)
    # uptake: positive = learned more; forgetting: positive = forgot more
    assert verdict_b(better, worse, None)[0] == "confirmed"
    assert verdict_b(better, worse, True)[0] == "confirmed"
    assert verdict_b(better, worse, False)[0] == "inconclusive"  # the null is not beaten
    assert verdict_b(worse, worse, None)[0] == "refuted"  # worse uptake
    assert verdict_b(better, better, True)[0] == "refuted"  # forgets more
    assert verdict_b(unclear, worse, None)[0] == "inconclusive"
    assert verdict_b((1.0, math.nan, math.nan), worse, None)[0] == "inconclusive"


def test_report_renders_the_null_alr_and_claims_sections(inputs, tmp_path):
    selection = tmp_path / "selection.json"
    selection.write_text(json.dumps({"granularity": "block", "units": ["block.2", "block.3"],
                                     "knowledge_types": ["new", "updated"], "alr_normalise": "mean",
                                     "lr_multipliers": {"embed": 1.0, "block.0": 0.5, "block.2": 1.25}}))
    (tmp_path / "results" / "profile" / "tests.json").write_text(json.dumps({"new_vs_updated": {
        "p_value": 0.002, "permutations": 500, "statistic": "max |r_new - r_updated|", "observed": 0.3}}))
    report.run({"dpi": 40}, **inputs, selection=str(selection))
    md = open(f"{inputs['out']}/table.md").read()
    for heading in ("## TGL-FP against the layer null", "## TGL-ALR learning-rate multipliers", "## Claims"):
        assert heading in md
    assert "No layer null ran" in md
    assert "| block.0 | 0.5 | frozen |" in md and "| block.2 | 1.25 | trained |" in md
    rows = json.load(open(f"{inputs['out']}/claims.json"))
    assert [r["verdict"] for r in rows] == ["confirmed", "inconclusive"]  # no fact-level scores for (b)
    assert "**confirmed** (p < 0.05)" in md
    # the statistic's "|" is escaped, so the claims row keeps its 4 cells
    row = next(x for x in md.splitlines() if x.startswith("| (a)"))
    assert "max \\|r_new - r_updated\\|" in row and len(re.split(r"(?<!\\)\|", row)) == 6
    assert json.load(open(f"{inputs['out']}/null.json"))["n"] == 0
