"""The report's fact-level part (plain pandas): was the fact learned (`gradloc.factlevel`).

- Per seed, from each summary.json's `facts`: hits@1 / MRR among the candidates per set
  (with chance and the majority-object baseline beside them), efficacy, specificity; and
  against the base model of the same period: *fact uptake* = method - base hits@1 on
  `new` and `updated` (their mean: `fact_uptake`), *fact forgetting* = base - method
  hits@1 on `unchanged`, and FUAR (Jang et al. 2022) = unchanged facts forgotten / new and
  updated facts gained (net counts of hits@1; empty when nothing was gained).
- Each method against `full`, paired by seed, period and probe, with 95% intervals from a
  bootstrap over seeds and entities (a subject's probes move together).
Numbers are fractions here (hits@1 0.42); the Markdown prints points (42.0).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..io import InputError, read_table
from .table import ALL_PERIODS, BASE, REFERENCE, aggregate, read_identity, read_object

SETS = ("new", "updated", "unchanged", "unchanged_touched", "unchanged_untouched", "outdated", "changed")
METRICS = ("hits1", "mrr", "hits1_sum", "mrr_sum", "chance_hits1", "chance_mrr", "specificity", "majority_hits1",
           "n", "n_constant")
EFFICACY = ("share", "margin", "n", "paraphrase_share", "paraphrase_margin", "paraphrase_n")
GAINED = ("new", "updated", "changed")


def _num(v) -> float:
    return math.nan if v is None else float(v)


def read_facts(evals: list) -> pd.DataFrame:
    """One row per eval folder with fact-level metrics: method, seed (-1: base), period,
    `<set>_<metric>` and `efficacy_<key>`. Folders whose summary.json predates them are
    left out (an older run: its table keeps the perplexity columns only)."""
    rows = []
    for folder in evals:
        path, summary = read_object(folder, "summary.json", "eval")
        facts = summary.get("facts")
        if facts is None:
            continue
        if not isinstance(facts, dict) or not isinstance(facts.get("sets"), dict):
            raise InputError(f"{path}: key facts must be an object with 'sets' and 'efficacy'")
        method, seed, period = read_identity(summary, path, seed_required=False)
        row = {"method": method, "seed": -1 if seed is None else seed, "period": period}
        for s in SETS:
            entry = facts["sets"].get(s) or {}
            row.update({f"{s}_{m}": _num(entry.get(m)) for m in METRICS})
        row.update({f"efficacy_{k}": _num((facts.get("efficacy") or {}).get(k)) for k in EFFICACY})
        rows.append(row)
    return pd.DataFrame(rows)


def add_derived(df: pd.DataFrame) -> pd.DataFrame:
    """Per-seed fact uptake / forgetting / FUAR against the base model of the period."""
    base = df[df["method"] == BASE].set_index("period")
    out = df.copy()

    def ref(col):
        return out["period"].map(base[col]) if len(base) else pd.Series(np.nan, index=out.index)

    gained = []
    for s in GAINED:
        out[f"fact_uptake_{s}"] = out[f"{s}_hits1"] - ref(f"{s}_hits1")
        gained.append(out[f"fact_uptake_{s}"] * out[f"{s}_n"])
    present = [f"fact_uptake_{s}" for s in ("new", "updated") if out[f"fact_uptake_{s}"].notna().any()] or [
        "fact_uptake_changed"]
    out["fact_uptake"] = out[present].mean(axis=1, skipna=False)
    out["fact_forgetting"] = ref("unchanged_hits1") - out["unchanged_hits1"]
    out["efficacy_gain"] = out["efficacy_share"] - ref("efficacy_share")
    # counts of facts (hits@1 x probes): rounded, so float noise is never "a fact gained"
    forgot = (out["fact_forgetting"] * out["unchanged_n"]).round(6)
    gain = pd.concat(gained, axis=1).sum(axis=1, min_count=1).round(6)
    out["facts_forgotten"], out["facts_gained"] = forgot, gain
    out["fuar"] = np.where(gain > 0, forgot / gain.where(gain > 0), np.nan)
    return out


def value_columns() -> list[str]:
    cols = [f"{s}_{m}" for s in SETS for m in METRICS if m not in ("n", "n_constant")]
    return cols + [f"efficacy_{k}" for k in EFFICACY if not k.endswith("n")] + [
        *(f"fact_uptake_{s}" for s in GAINED), "fact_uptake", "fact_forgetting", "efficacy_gain",
        "facts_forgotten", "facts_gained", "fuar"]


def build(evals: list, order: list[str]) -> pd.DataFrame:
    """The fact-level table: `fact_<col>_mean/_std` per method and period (and `all`)."""
    df = read_facts(evals)
    if df.empty:
        return pd.DataFrame(columns=["method", "period"])
    per_seed = add_derived(df)
    per_seed["method"] = pd.Categorical(per_seed["method"], categories=order)
    per_seed = per_seed.sort_values(["method", "period", "seed"], kind="stable")
    per_seed["method"] = per_seed["method"].astype(str)
    cols = value_columns()
    table = aggregate(per_seed, cols, order).drop(columns="n_seeds")
    return table.rename(columns={c: f"fact_{c}" for c in table.columns if c not in ("method", "period")})


# ------------------------------------------------------------------- each method against full

VS_FULL = ("fact_uptake", "fact_forgetting", "efficacy")


def probe_rows(evals: list) -> pd.DataFrame:
    """method, seed, period, probe_id, set, subject_id, hits1, efficacy (updated only) of
    every probe without a constant object, from each eval's scores.parquet."""
    frames = []
    for folder in evals:
        path = Path(folder) / "scores.parquet"
        if not path.exists():
            continue
        _, summary = read_object(folder, "summary.json", "eval")
        if "facts" not in summary:
            continue
        method, seed, period = read_identity(summary, path, seed_required=False)
        s = read_table(path, ["probe_id", "set", "subject_id", "hits1", "efficacy", "constant_object"])
        s = s[~s["constant_object"].astype(bool)]
        frames.append(pd.DataFrame({"method": method, "seed": -1 if seed is None else seed, "period": period,
                                    "probe_id": s["probe_id"].astype(str), "set": s["set"].astype(str),
                                    "subject_id": s["subject_id"].astype(str), "hits1": s["hits1"].astype(float),
                                    "efficacy": s["efficacy"].astype(float)}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def cluster_bootstrap(d: pd.DataFrame, col: str, rng, n_boot: int) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of `col` over rows, with a 95% interval resampling seeds,
    then subjects within each seed (all of a subject's probes together)."""
    d = d[d[col].notna()]
    if d.empty:
        return math.nan, math.nan, math.nan
    per = d.groupby(["seed", "subject_id"])[col].agg(["sum", "count"])
    seeds = [(g["sum"].to_numpy(), g["count"].to_numpy()) for _, g in per.groupby(level=0)]
    est = float(d[col].mean())
    if n_boot == 0:
        return est, math.nan, math.nan
    boots = np.empty(n_boot)
    for b in range(n_boot):
        total = count = 0.0
        for i in rng.integers(0, len(seeds), len(seeds)):
            s, c = seeds[i]
            pick = rng.integers(0, len(s), len(s))
            total += s[pick].sum()
            count += c[pick].sum()
        boots[b] = total / count
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return est, float(lo), float(hi)


def versus_full(rows: pd.DataFrame, order: list[str], n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per method and period (and `all`), paired by seed, period and probe, in points:
    fact uptake = method - full hits@1 on new and updated (positive: learned more than
    full), fact forgetting = full - method hits@1 on unchanged (positive: forgot more),
    efficacy = method - full on updated; 95% cluster-bootstrap intervals."""
    cols = ["method", "period"] + [f"{c}_vs_full{x}" for c in VS_FULL for x in ("", "_lo", "_hi")]
    if rows.empty or REFERENCE not in set(rows["method"]):
        return pd.DataFrame(columns=cols)
    rng = np.random.default_rng(seed)
    key = ["seed", "period", "probe_id"]
    full = rows[rows["method"] == REFERENCE][key + ["hits1", "efficacy"]]
    out = []
    for m in [m for m in order if m not in (BASE, REFERENCE)]:
        both = rows[rows["method"] == m].merge(full, on=key, suffixes=("", "_full"))
        if both.empty:
            continue
        gained = both["set"].isin(GAINED)
        both["fact_uptake"] = np.where(gained, 100 * (both["hits1"] - both["hits1_full"]), np.nan)
        both["fact_forgetting"] = np.where(both["set"] == "unchanged", 100 * (both["hits1_full"] - both["hits1"]),
                                           np.nan)
        both["efficacy"] = np.where(both["set"] == "updated", 100 * (both["efficacy"] - both["efficacy_full"]),
                                    np.nan)
        for period in [*sorted(both["period"].unique()), ALL_PERIODS]:
            sub = both if period == ALL_PERIODS else both[both["period"] == period]
            row = {"method": m, "period": str(period)}
            for c in VS_FULL:
                est, lo, hi = cluster_bootstrap(sub, c, rng, n_boot)
                row.update({f"{c}_vs_full": est, f"{c}_vs_full_lo": lo, f"{c}_vs_full_hi": hi})
            out.append(row)
    return pd.DataFrame(out, columns=cols)
