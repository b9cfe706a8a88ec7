"""TGL-FP / TGL-ALR rules on a hand-made relative.csv."""

import json

import pytest

from gradloc import select
from gradloc.io import InputError

# block granularity, 4 blocks; module granularity for block 0 and 1 only.
# new:     b0 1.0  b1 2.0  b2 1.2  b3 3.0   mean 1.8 -> {b1, b3}
# updated: b0 1.6  b1 1.0  b2 1.4  b3 1.0   mean 1.25 -> {b0, b2}
ROWS = """knowledge_type,granularity,unit,layer,rel,lo,hi
new,block,embed,-1,9.0,8,10
new,block,block.0,0,1.0,0.9,1.1
new,block,block.1,1,2.0,1.8,2.2
new,block,block.2,2,1.2,1.1,1.3
new,block,block.3,3,3.0,2.5,3.5
new,block,final_norm,4,5.0,4,6
updated,block,embed,-1,0.1,0,1
updated,block,block.0,0,1.6,1.5,1.7
updated,block,block.1,1,1.0,0.9,1.1
updated,block,block.2,2,1.4,1.3,1.5
updated,block,block.3,3,1.0,0.9,1.1
updated,block,final_norm,4,0.1,0,1
unchanged,block,block.0,0,1.0,0.9,1.1
unchanged,block,block.1,1,1.0,0.9,1.1
unchanged,block,block.2,2,1.0,0.9,1.1
unchanged,block,block.3,3,1.0,0.9,1.1
new,module,block.0.attn,0,1.0,1,1
new,module,block.0.mlp,0,3.0,1,1
new,module,block.0.norm,0,1.1,1,1
new,module,block.1.attn,1,2.5,1,1
new,module,block.1.mlp,1,1.0,1,1
new,module,block.1.norm,1,1.0,1,1
"""


@pytest.fixture
def profile_dir(tmp_path):
    (tmp_path / "relative.csv").write_text(ROWS)
    return tmp_path


def run(profile_dir, tmp_path, **params):
    out = tmp_path / "sel" / "selection.json"
    select.run(params, profile=profile_dir, out=out)
    return json.loads(out.read_text())


def test_mean_union(profile_dir, tmp_path):
    s = run(profile_dir, tmp_path)
    assert s["units"] == ["block.0", "block.1", "block.2", "block.3"]
    assert s["n_layers"] == 4 and s["granularity"] == "block" and s["rule"] == "mean"
    assert "embed" not in s["units"] and "final_norm" not in s["units"]
    assert s["reasons"]["block.1"].startswith("new: r=2 > mean 1.8; updated: r=1 <= mean 1.25 -> selected")


def test_mean_single_type_and_intersection(profile_dir, tmp_path):
    assert run(profile_dir, tmp_path, knowledge_types=["new"])["units"] == ["block.1", "block.3"]
    assert run(profile_dir, tmp_path, knowledge_types=["updated"])["units"] == ["block.0", "block.2"]
    # disjoint choices: empty intersection falls back to the highest mean r (b3: (3+1)/2 = 2)
    s = run(profile_dir, tmp_path, combine="intersection")
    assert s["units"] == ["block.3"] and "fallback" in s["reasons"]["block.3"]


def test_equal_r_selects_nothing_above_mean(profile_dir, tmp_path):
    # all r equal: nothing is strictly above the mean, so the fallback picks one unit
    s = run(profile_dir, tmp_path, knowledge_types=["unchanged"])
    assert len(s["units"]) == 1


def test_topk(profile_dir, tmp_path):
    assert run(profile_dir, tmp_path, rule="topk", k=1, knowledge_types=["new"])["units"] == ["block.3"]
    s = run(profile_dir, tmp_path, rule="topk", k=1)
    assert s["units"] == ["block.0", "block.3"]
    assert "in top 1" in s["reasons"]["block.3"]
    # no k: the upper half
    assert run(profile_dir, tmp_path, rule="topk", knowledge_types=["new"])["units"] == ["block.1", "block.3"]


def test_alr_multipliers(profile_dir, tmp_path):
    s = run(profile_dir, tmp_path)
    # r averaged over new and updated: b0 1.3, b1 1.5, b2 1.3, b3 2.0; mean 1.525
    expect = {"block.0": 1.3, "block.1": 1.5, "block.2": 1.3, "block.3": 2.0}
    for u, r in expect.items():
        assert s["relative"][u] == pytest.approx(r)
        assert s["lr_multipliers"][u] == pytest.approx(r / 1.525)
    assert s["lr_multipliers"]["embed"] == 1.0 and s["lr_multipliers"]["final_norm"] == 1.0
    m = run(profile_dir, tmp_path, alr_normalise="max")["lr_multipliers"]
    assert m["block.3"] == pytest.approx(1.0) and m["block.0"] == pytest.approx(0.65)


def test_module_granularity(profile_dir, tmp_path):
    s = run(profile_dir, tmp_path, granularity="module", knowledge_types=["new"])
    # mean over the six module units = 9.6 / 6 = 1.6
    assert s["units"] == ["block.0.mlp", "block.1.attn"]
    assert s["n_layers"] == 2


def test_bad_input(profile_dir, tmp_path):
    with pytest.raises(InputError, match="rule"):
        run(profile_dir, tmp_path, rule="median")
    with pytest.raises(InputError, match="unknown key"):
        run(profile_dir, tmp_path, treshold=1)
    (profile_dir / "relative.csv").write_text("knowledge_type,granularity,unit,layer\nnew,block,block.0,0\n")
    with pytest.raises(InputError, match="rel"):
        run(profile_dir, tmp_path)


def test_significance_recorded_and_logged(profile_dir, tmp_path, caplog):
    # a profile written before the intervals existed: selection as before, significance unavailable
    sel = run(profile_dir, tmp_path)
    assert sel["significance"]["available"] is False and sel["units"] == ["block.0", "block.1", "block.2", "block.3"]
    # with d intervals: new block.3 stands out, block.1 (above the mean) does not; updated: none
    import pandas as pd

    rel = pd.read_csv(profile_dir / "relative.csv")
    rel["d"], rel["d_lo"], rel["d_hi"] = 0.0, -1.0, 1.0
    rel.loc[(rel["knowledge_type"] == "new") & (rel["unit"] == "block.3"), ["d", "d_lo", "d_hi"]] = [1.2, 0.4, 2.0]
    rel.to_csv(profile_dir / "relative.csv", index=False)
    with caplog.at_level("INFO"):
        sel = run(profile_dir, tmp_path)
    sig = sel["significance"]
    assert sig["available"] and sig["above_mean"] == {"new": ["block.3"], "updated": []}
    assert sig["selected_significant"] == ["block.3"]
    assert sig["selected_not_significant"] == ["block.0", "block.1", "block.2"]
    assert sig["per_type"]["new"]["block.3"] == {"d": 1.2, "lo": 0.4, "hi": 2.0}
    assert "significantly above the mean for new" in sel["reasons"]["block.3"]
    assert "not significantly above the mean" in sel["reasons"]["block.1"]
    assert "selected and significant: block.3" in caplog.text
    # nothing significant: said plainly
    rel.loc[:, ["d_lo"]] = -1.0
    rel.to_csv(profile_dir / "relative.csv", index=False)
    sel = run(profile_dir, tmp_path)
    assert "NO layer is significantly above the mean" in select.significance_line(sel)


def test_significance_uses_the_simultaneous_band(profile_dir, tmp_path):
    """With d_slo/d_shi (issue #24) a layer is significant only when the band over all
    layers clears 0: block.3's per-unit interval does, its simultaneous band does not."""
    import pandas as pd

    rel = pd.read_csv(profile_dir / "relative.csv")
    rel["d"], rel["d_lo"], rel["d_hi"], rel["d_slo"], rel["d_shi"] = 0.0, -1.0, 1.0, -1.5, 1.5
    at = (rel["knowledge_type"] == "new") & (rel["unit"] == "block.3")
    rel.loc[at, ["d", "d_lo", "d_hi", "d_slo", "d_shi"]] = [1.2, 0.4, 2.0, -0.1, 2.5]
    rel.to_csv(profile_dir / "relative.csv", index=False)
    sig = run(profile_dir, tmp_path)["significance"]
    assert sig["band"] == "simultaneous" and "simultaneous" in sig["test"]
    assert sig["available"] and not sig["any_significant"]
    assert sig["per_type"]["new"]["block.3"] == {"d": 1.2, "lo": -0.1, "hi": 2.5}
    # an older profile without the band: the per-unit interval, as before
    rel.drop(columns=["d_slo", "d_shi"]).to_csv(profile_dir / "relative.csv", index=False)
    sel = run(profile_dir, tmp_path)
    assert sel["significance"]["band"] == "pointwise" and sel["significance"]["above_mean"]["new"] == ["block.3"]
    assert "95% paired bootstrap" in select.significance_line(sel)


def with_intervals(profile_dir, lower: dict, column="d_lo"):
    """relative.csv with the interval of d: lower end -1 everywhere but `lower` ((type, unit): value)."""
    import pandas as pd

    rel = pd.read_csv(profile_dir / "relative.csv")
    rel["d"], rel["d_lo"], rel["d_hi"] = 0.0, -1.0, 1.0
    if column != "d_lo":
        rel[column], rel[column.replace("lo", "hi")] = -1.0, 1.0
    for (t, u), v in lower.items():
        rel.loc[(rel["knowledge_type"] == t) & (rel["unit"] == u), column] = v
    rel.to_csv(profile_dir / "relative.csv", index=False)


def test_mean_significant_picks_only_significant_units(profile_dir, tmp_path, caplog):
    # new: block.1 and block.3 are above the mean (1.8), only block.3's interval is above 0;
    # updated: block.0's interval is above 0 (block.2, above the mean too, is not)
    with_intervals(profile_dir, {("new", "block.3"): 0.4, ("updated", "block.0"): 0.1})
    s = run(profile_dir, tmp_path, rule="mean_significant")
    assert s["units"] == ["block.0", "block.3"] and s["fallback_to_mean"] == []
    assert s["rule"] == "mean_significant"
    assert "new: r=3 in mean 1.8 (significantly above)" in s["reasons"]["block.3"]
    # a lower end exactly 0 is not wholly above 0; no updated unit significant: mean for updated, warned
    with_intervals(profile_dir, {("new", "block.3"): 0.4, ("updated", "block.0"): 0.0})
    with caplog.at_level("WARNING"):
        s = run(profile_dir, tmp_path, rule="mean_significant")
    assert s["units"] == ["block.0", "block.2", "block.3"] and s["fallback_to_mean"] == ["updated"]
    assert "falling back to rule mean for updated" in caplog.text
    # the plain mean rule on the same profile still takes every unit above the mean
    assert run(profile_dir, tmp_path)["units"] == ["block.0", "block.1", "block.2", "block.3"]


def test_mean_significant_prefers_the_simultaneous_interval(profile_dir, tmp_path):
    # per-unit d_lo says block.1 is significant (new); the simultaneous d_slo says block.3 only
    with_intervals(profile_dir, {("new", "block.3"): 0.2}, column="d_slo")
    import pandas as pd

    rel = pd.read_csv(profile_dir / "relative.csv")
    rel.loc[(rel["knowledge_type"] == "new") & (rel["unit"] == "block.1"), "d_lo"] = 0.5
    rel.to_csv(profile_dir / "relative.csv", index=False)
    s = run(profile_dir, tmp_path, rule="mean_significant", knowledge_types=["new"])
    assert s["units"] == ["block.3"]
    # without the simultaneous columns the per-unit interval decides
    rel.drop(columns=["d_slo", "d_shi"]).to_csv(profile_dir / "relative.csv", index=False)
    assert run(profile_dir, tmp_path, rule="mean_significant", knowledge_types=["new"])["units"] == ["block.1"]


def test_mean_significant_without_intervals_is_the_mean_rule(profile_dir, tmp_path):
    s = run(profile_dir, tmp_path, rule="mean_significant", knowledge_types=["new"])
    assert s["units"] == ["block.1", "block.3"] and s["fallback_to_mean"] == ["new"]
