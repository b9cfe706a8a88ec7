"""The report's inputs as DataFrames and every table computation (plain pandas; no
plotting here).

Definitions (also written into table.md, see markdown.py):
- Each eval folder gives, per probe set, the primary metric (object_ppl by default) and
  top1; numbers are mean +- sample std (ddof 1) over seeds, n = number of seeds.
- uptake on new/updated (and `changed`, TemporalWiki's merged set when new and updated
  cannot be told apart): improvement over the base model on the same period's probes,
  ln(base) - ln(method) for perplexities (the drop in mean negative log-likelihood per
  token, in nats: a base model at ppl 10^6 makes raw differences meaningless), method -
  base for top1 (positive = learned).
- forgetting: worsening on unchanged probes relative to the base model, ln(method) -
  ln(base) for perplexities, base - method for top1 (positive = forgot).
Derived numbers are computed per seed and then averaged, so their std is the seed spread.

What was evaluated (method, seed, period) comes from each summary.json and each train
metrics.json, never from folder names.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..core import TGL_TYPE
from ..io import InputError, read_json, read_table, require_finite

log = logging.getLogger(__name__)

SETS = ("unchanged", "updated", "new", "outdated")  # always in the table (empty where absent)
GAIN_SETS = ("new", "updated", "changed")  # sets whose improvement over the base model is uptake
METRICS = ("object_ppl", "statement_ppl", "top1")
BASE = "base"
ALL_PERIODS = "all"  # the period label of the rows averaged over periods
COST_COLUMNS = ("trainable_params", "wall_time_s")  # from train metrics.json
IDENTITY = ("method", "seed", "period")  # what summary.json / metrics.json say was run
NON_SET_KEYS = {*IDENTITY, "heldout_ppl", "facts"}  # facts: fact-level metrics (report/facts.py)


# ----------------------------------------------------------------------------- inputs

def _number(value, where: str) -> float:
    if value is None:
        return math.nan  # e.g. a set with no probes this period
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise InputError(f"{where}: non-finite number {value!r}")
    return float(value)


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_identity(d: dict, path, seed_required: bool) -> tuple[str, int | None, int]:
    """(method, seed, period) as written in a summary.json or train metrics.json."""
    missing = [k for k in IDENTITY if k not in d]
    if missing:
        raise InputError(f"{path}: missing key(s) {missing}; the report takes method, seed and period from "
                         "this file, not from folder names (rerun the stage that wrote it)")
    method, seed, period = (d[k] for k in IDENTITY)
    if not isinstance(method, str) or not method:
        raise InputError(f"{path}: key method must be a non-empty string, got {method!r}")
    if not (_int(seed) or (seed is None and not seed_required)):
        raise InputError(f"{path}: key seed must be an integer{'' if seed_required else ' or null'}, got {seed!r}")
    if not _int(period):
        raise InputError(f"{path}: key period must be an integer, got {period!r}")
    return method, seed, period


def read_object(folder, name: str, kind: str) -> tuple[Path, dict]:
    """(path, content) of the JSON object `name` in a stage folder; a missing file or a
    non-object is an error naming it."""
    path = Path(folder) / name
    if not path.exists():
        raise InputError(f"{path}: file not found ({kind} folder {folder} has no {name})")
    content = read_json(path)
    if not isinstance(content, dict):
        raise InputError(f"{path}: expected a JSON object")
    return path, content


def read_summary(folder) -> dict:
    """One eval folder's summary.json flattened to {"method", "seed", "period",
    "<set>_<metric>": x, "heldout_ppl": x}, for the sets of SETS (NaN where missing: no
    probes of that kind in this period) and any other set the file holds."""
    path, summary = read_object(folder, "summary.json", "eval")
    method, seed, period = read_identity(summary, path, seed_required=False)
    sets = summary.get("sets", summary)  # tolerate the per-set dicts nested under "sets"
    extra = sorted(k for k, v in sets.items() if k not in SETS and k not in NON_SET_KEYS and isinstance(v, dict))
    row = {"method": method, "seed": seed, "period": period}
    for s in (*SETS, *extra):
        entry = sets.get(s, {}) or {}
        if not isinstance(entry, dict):
            raise InputError(f"{path}: key {s!r} must be an object with {list(METRICS)}")
        for m in METRICS:
            row[f"{s}_{m}"] = _number(entry.get(m), f"{path}: key {s}.{m}")
    row["heldout_ppl"] = _number(summary.get("heldout_ppl"), f"{path}: key heldout_ppl")
    return row


def load_evals(evals: list) -> tuple[pd.DataFrame, list[str]]:
    """All eval folders as one frame (method, seed, period, metrics; seed -1 for the base
    model), and the method order: base first, then the order in which methods first
    appear in `evals`."""
    if not evals:
        raise InputError("report: no eval folders given (--evals is empty)")
    rows, order, seen = [], [BASE], set()
    for folder in tqdm(list(evals), desc="read evals", unit="folder", leave=False):
        row = read_summary(folder)
        key = (row["method"], row["seed"], row["period"])
        if key in seen:
            raise InputError(f"{folder}: duplicate eval for method {key[0]}, seed {key[1]}, period {key[2]}")
        seen.add(key)
        if row["method"] not in order:
            order.append(row["method"])
        rows.append({**row, "seed": -1 if row["seed"] is None else row["seed"]})
    df = pd.DataFrame(rows)
    if BASE not in set(df["method"]):
        order.remove(BASE)
    return df, order


def read_trains(trains: list) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every train folder's log.csv stacked (step, loss, method, seed, period), and the
    cost of each run from its metrics.json (method, seed, period, trainable_params,
    wall_time_s; NaN where a cost key is missing)."""
    frames, costs = [], []
    for folder in tqdm(list(trains), desc="read train logs", unit="folder", leave=False):
        path, metrics = read_object(folder, "metrics.json", "train")
        method, seed, period = read_identity(metrics, path, seed_required=True)
        log_path = Path(folder) / "log.csv"
        df = read_table(log_path, columns=["step", "loss"])
        require_finite(df, ["step", "loss"], log_path)
        df = df[["step", "loss"]].apply(pd.to_numeric)
        frames.append(df.assign(method=method, seed=seed, period=period))
        costs.append({"method": method, "seed": seed, "period": period,
                      **{k: _number(metrics.get(k), f"{path}: key {k}") for k in COST_COLUMNS}})
    logs = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["step", "loss", "method", "seed", "period"])
    return logs, pd.DataFrame(costs, columns=["method", "seed", "period", *COST_COLUMNS])


def probe_sets(evals_df: pd.DataFrame) -> list[str]:
    """The table's probe sets: SETS, then any other set some summary.json holds (sorted)."""
    found = {c[: -len("_top1")] for c in evals_df.columns if c.endswith("_top1")}
    return [*SETS, *sorted(found - set(SETS))]


def gain_sets(sets) -> list[str]:
    """Sets with an uptake column: new and updated always, `changed` where present."""
    return [s for s in GAIN_SETS if s in sets]


def uptake_sets(evals_df: pd.DataFrame) -> list[str]:
    """The sets averaged into `uptake`: those of GAIN_SETS that some evaluation scored
    (new + updated normally; `changed` for TemporalWiki's merged set; just `new` for
    ECBD)."""
    return [s for s in gain_sets(probe_sets(evals_df))
            if evals_df[[f"{s}_{m}" for m in METRICS]].notna().any().any()]


# ----------------------------------------------------------------------------- the table

def is_ppl(metric: str) -> bool:
    return metric.endswith("ppl")


def gain(metric: str, base, method):
    """Improvement of `method` over `base`: for perplexities the drop in mean NLL per
    token, ln(base) - ln(method) nats; for accuracies the difference."""
    return np.log(base) - np.log(method) if is_ppl(metric) else method - base


def value_columns(primary: str, sets=SETS) -> list[str]:
    """The per-row numbers of the table, in display order."""
    gains = gain_sets(sets)
    cols = [f"{s}_{primary}" for s in sets]
    derived = [f"uptake_{s}" for s in gains] + ["uptake", "forgetting"]
    if primary != "top1":
        cols += [f"{s}_top1" for s in sets]
        derived += [f"top1_gain_{s}" for s in gains] + ["top1_forgetting"]
    return cols + derived + ["heldout_ppl", *COST_COLUMNS]


def add_derived(df: pd.DataFrame, primary: str, sets=SETS, averaged=("new", "updated")) -> pd.DataFrame:
    """Per-seed uptake and forgetting against the base model of the same period.
    The base model's own rows get 0 (it is the reference); periods without a base eval
    get NaN. `uptake` is the mean of the uptake columns of the sets in `averaged`."""
    base = df[df["method"] == BASE].set_index("period")
    missing = sorted(set(df["period"]) - set(base.index))
    if missing:
        log.warning("no eval/base for period(s) %s: uptake and forgetting are left empty there", missing)
    out = df.copy()

    def ref(col):  # the base model's value for each row's period
        return out["period"].map(base[col]) if len(base) else pd.Series(np.nan, index=out.index)

    gains = gain_sets(sets)
    for s in gains:
        out[f"uptake_{s}"] = gain(primary, ref(f"{s}_{primary}"), out[f"{s}_{primary}"])
    # the sets together: their mean, so each kind of knowledge weighs the same
    averaged = [s for s in averaged if s in gains]
    out["uptake"] = (out[[f"uptake_{s}" for s in averaged]].mean(axis=1, skipna=False) if averaged
                     else pd.Series(np.nan, index=out.index))
    out["forgetting"] = -gain(primary, ref(f"unchanged_{primary}"), out[f"unchanged_{primary}"])
    if primary != "top1":
        for s in gains:
            out[f"top1_gain_{s}"] = out[f"{s}_top1"] - ref(f"{s}_top1")
        out["top1_forgetting"] = ref("unchanged_top1") - out["unchanged_top1"]
    return out


def better(col: str) -> str | None:
    """'min' or 'max' for the best value of a column; None where 'best' is ambiguous
    (outdated probes: remembering the old fact is neither clearly good nor bad)."""
    if col.startswith("outdated_"):
        return None
    if col.startswith(("uptake", "top1_gain")):
        return "max"
    if "forgetting" in col or is_ppl(col):
        return "min"
    if col.endswith("top1"):
        return "max"
    return None


def aggregate(per_seed: pd.DataFrame, cols: list[str], order: list[str]) -> pd.DataFrame:
    """Mean, sample std and count over seeds, per method and period, plus rows averaged
    over periods (period 'all': per seed mean over periods, then over seeds)."""
    over_periods = per_seed.groupby(["method", "seed"], sort=False)[cols].mean().reset_index()
    over_periods["period"] = ALL_PERIODS
    rows = []
    for frame in (per_seed, over_periods):
        for (method, period), g in frame.groupby(["method", "period"], sort=False):
            row = {"method": method, "period": period, "n_seeds": len(g)}
            for c in cols:
                row[f"{c}_mean"] = g[c].mean()
                row[f"{c}_std"] = g[c].std(ddof=1) if len(g) > 1 else math.nan
            rows.append(row)
    table = pd.DataFrame(rows)
    # Rows: per period first (method in config order, then period), then the averages.
    table["_m"] = table["method"].map({m: i for i, m in enumerate(order)})
    table["_p"] = table["period"].map(lambda p: math.inf if p == ALL_PERIODS else p)
    table["_all"] = table["period"] == ALL_PERIODS
    table = table.sort_values(["_all", "_m", "_p"], kind="stable").drop(columns=["_m", "_p", "_all"])
    table["period"] = table["period"].astype(str)
    return table.reset_index(drop=True)


def mark_best(table: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """Column `best`: the value columns in which this row is the best method of its
    period (ties for best all marked, a column where all are tied not at all; the base
    model and single-method periods are not ranked)."""
    best = {i: [] for i in table.index}
    for _, g in table[table["method"] != BASE].groupby("period", sort=False):
        if len(g) < 2:
            continue
        for c in cols:
            direction = better(c)
            values = g[f"{c}_mean"]
            if direction is None or values.isna().all():
                continue
            if np.isclose(values.min(), values.max(), rtol=0, atol=1e-12):
                continue  # all tied: nobody is best
            target = values.min() if direction == "min" else values.max()
            for i in values.index[np.isclose(values, target, rtol=0, atol=1e-12)]:
                best[i].append(c)
    return table.assign(best=[";".join(best[i]) for i in table.index])


def build_table(evals_df: pd.DataFrame, order: list[str], primary: str, costs: pd.DataFrame | None = None
                ) -> pd.DataFrame:
    """The whole table: one row per method and period, then per method over periods."""
    sets = probe_sets(evals_df)
    cols = value_columns(primary, sets)
    if costs is None:
        costs = pd.DataFrame(columns=["method", "seed", "period", *COST_COLUMNS])
    costs = costs.astype({"seed": int, "period": int, **{c: float for c in COST_COLUMNS}})
    per_seed = add_derived(evals_df.merge(costs, on=["method", "seed", "period"], how="left"), primary,
                           sets, uptake_sets(evals_df))
    per_seed = per_seed.sort_values(["period", "seed"], kind="stable")
    per_seed["method"] = pd.Categorical(per_seed["method"], categories=order)
    per_seed = per_seed.sort_values("method", kind="stable")
    per_seed["method"] = per_seed["method"].astype(str)
    table = aggregate(per_seed, cols, order)
    return mark_best(table, cols)


# ----------------------------------------------------------------------------- subnetworks

REMOVAL_COLUMNS = ("target_top1", "target_object_ppl", "control_top1", "control_object_ppl", "heldout_ppl")


def removal_table(removal: pd.DataFrame) -> pd.DataFrame:
    """subnet/removal.csv as mean and std over seeds per knowledge set and mask
    (none / subnet / random)."""
    g = removal.groupby(["knowledge_set", "mask"], sort=False)[list(REMOVAL_COLUMNS)]
    out = g.mean().add_suffix("_mean").join(g.std(ddof=1).add_suffix("_std")).join(g.size().rename("n_seeds"))
    return out.reset_index()


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def localization(density: pd.DataFrame, relative: pd.DataFrame, n_boot: int = 1000, seed: int = 0):
    """(paired, correlations). `paired`: per knowledge set, granularity and unit the mask
    density (mean over seeds) next to TGL's relative gradient norm for the matching
    knowledge type (outdated facts <-> `updated`, unchanged <-> `unchanged`).
    `correlations`: Spearman's rho over the units, with a 95% bootstrap interval over
    units (pairs resampled with replacement)."""
    d = density.groupby(["knowledge_set", "kind", "granularity", "unit", "layer"], as_index=False, sort=False)[
        "density"].mean()
    d["knowledge_type"] = d["kind"].map(TGL_TYPE)
    paired = d.merge(relative[["knowledge_type", "granularity", "unit", "rel"]],
                     on=["knowledge_type", "granularity", "unit"], how="inner")
    rng = np.random.default_rng(seed)
    rows = []
    for (ks, kt, g), grp in paired.groupby(["knowledge_set", "knowledge_type", "granularity"], sort=False):
        x, y = grp["density"].to_numpy(), grp["rel"].to_numpy()
        boots = [_spearman(x[i], y[i]) for i in rng.integers(0, len(x), (n_boot, len(x)))]
        boots = np.asarray([b for b in boots if not math.isnan(b)])
        lo, hi = np.percentile(boots, [2.5, 97.5]) if len(boots) else (math.nan, math.nan)
        rows.append({"knowledge_set": ks, "knowledge_type": kt, "granularity": g, "n_units": len(x),
                     "spearman": _spearman(x, y), "lo": float(lo), "hi": float(hi),
                     "top_density": grp.loc[grp["density"].idxmax(), "unit"],
                     "top_rel": grp.loc[grp["rel"].idxmax(), "unit"]})
    return paired, pd.DataFrame(rows)


# ------------------------------------------------------------ each method against `full`

REFERENCE = "full"
VS_FULL = ("uptake", "forgetting", "top1_uptake", "top1_forgetting")


def probe_scores(evals: list) -> pd.DataFrame:
    """method, seed (-1: base), period, probe_id, set, nll (object nats per token), top1,
    from every eval folder's scores.parquet (folders without one are skipped)."""
    frames = []
    for folder in evals:
        path = Path(folder) / "scores.parquet"
        if not path.exists():
            continue
        method, seed, period = read_identity(read_json(Path(folder) / "summary.json"), path, seed_required=False)
        s = read_table(path, ["probe_id", "set", "object_logprob", "object_tokens", "top1"])
        frames.append(pd.DataFrame({"method": method, "seed": -1 if seed is None else seed, "period": period,
                                    "probe_id": s["probe_id"].astype(str), "set": s["set"].astype(str),
                                    "nll": -s["object_logprob"].astype(float) / s["object_tokens"].clip(lower=1),
                                    "top1": s["top1"].astype(float)}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def versus_full(scores: pd.DataFrame, order: list[str], n_boot: int = 1000, seed: int = 0,
                averaged=("new", "updated")) -> pd.DataFrame:
    """Per method (not base, not full) and period (and 'all'): method minus `full`, paired
    by seed, period and probe, for uptake (nats per object token on the `averaged` sets;
    positive: the method took up more than full), forgetting (nats on unchanged; positive:
    forgot more) and the same in top-1 points; mean over seeds and probes with a 95%
    bootstrap interval (seeds and probes resampled, two-level)."""
    cols = ["method", "period"] + [f"{c}_vs_full{x}" for c in VS_FULL for x in ("", "_lo", "_hi")]
    if scores.empty or REFERENCE not in set(scores["method"]):
        return pd.DataFrame(columns=cols)
    rng = np.random.default_rng(seed)
    key = ["seed", "period", "probe_id"]
    full = scores[scores["method"] == REFERENCE].set_index(key)
    rows = []
    for m in [m for m in order if m not in (BASE, REFERENCE)]:
        own = scores[scores["method"] == m].set_index(key)
        both = own.reset_index().merge(full.reset_index()[key + ["nll", "top1"]], on=key, suffixes=("", "_full"))
        if both.empty:
            continue
        gain_set = both["set"].isin(averaged)
        kept = both["set"] == "unchanged"
        both["uptake"] = np.where(gain_set, both["nll_full"] - both["nll"], np.nan)
        both["forgetting"] = np.where(kept, both["nll"] - both["nll_full"], np.nan)
        both["top1_uptake"] = np.where(gain_set, 100 * (both["top1"] - both["top1_full"]), np.nan)
        both["top1_forgetting"] = np.where(kept, 100 * (both["top1_full"] - both["top1"]), np.nan)
        for period in [*sorted(both["period"].unique()), ALL_PERIODS]:
            sub = both if period == ALL_PERIODS else both[both["period"] == period]
            row = {"method": m, "period": str(period)}
            for c in VS_FULL:
                d = sub[sub[c].notna()]
                by_seed = [g[c].to_numpy() for _, g in d.groupby("seed")]
                if not by_seed:
                    row.update({f"{c}_vs_full": math.nan, f"{c}_vs_full_lo": math.nan, f"{c}_vs_full_hi": math.nan})
                    continue
                est = float(np.mean(np.concatenate(by_seed)))
                boots = []
                for _ in range(n_boot):
                    picked = [by_seed[i] for i in rng.integers(0, len(by_seed), len(by_seed))]
                    boots.append(np.mean(np.concatenate([v[rng.integers(0, len(v), len(v))] for v in picked])))
                lo, hi = np.percentile(boots, [2.5, 97.5]) if n_boot else (math.nan, math.nan)
                row.update({f"{c}_vs_full": est, f"{c}_vs_full_lo": float(lo), f"{c}_vs_full_hi": float(hi)})
            rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def versus_full_lines(vs: pd.DataFrame) -> list[str]:
    """table.md section: each method minus full over periods, with 95% intervals."""
    if vs.empty:
        return []
    out = ["## Each method against `full`", "",
           "Method minus `full`, paired by seed, period and probe; mean over seeds and probes with a "
           "95% bootstrap interval (seeds and probes resampled). Uptake: positive = took up more than "
           "full (nats per object token on new/updated probes; top-1 in points). Forgetting: positive = "
           "forgot more than full (unchanged probes). An interval that contains 0 is no difference.", "",
           "| method | uptake (nats) | forgetting (nats) | top-1 uptake (pts) | top-1 forgetting (pts) |",
           "|---|---|---|---|---|"]
    for r in vs[vs["period"] == ALL_PERIODS].itertuples(index=False):
        r = r._asdict()
        cells = [f"{r[f'{c}_vs_full']:+.3g} [{r[f'{c}_vs_full_lo']:+.3g}, {r[f'{c}_vs_full_hi']:+.3g}]"
                 if not math.isnan(r[f"{c}_vs_full"]) else "-" for c in VS_FULL]
        out.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return out + [""]


def significance_lines(profile) -> list[str]:
    """table.md: which transformer blocks the profile finds significantly above the mean
    (the simultaneous band of r_l - mean(r) over layers above 0, or the older per-unit
    interval), said plainly when none; and the new-vs-updated permutation test
    (profile/tests.json) when the profile has one."""
    path = Path(profile) / "relative.csv"
    if not path.exists():
        return []
    out = permutation_lines(profile)
    rel = pd.read_csv(path)
    lo = "d_slo" if "d_slo" in rel and rel["d_slo"].notna().any() else "d_lo"
    how = "95% simultaneous bootstrap band over layers" if lo == "d_slo" else "95% paired bootstrap"
    if lo not in rel or rel[lo].isna().all():
        return ["Layer selection: the profile has no significance test (bootstrap 0 or an older profile).", ""] + out
    rel = rel[rel[lo].notna()]
    g = "block" if (rel["granularity"] == "block").any() else rel["granularity"].iloc[0]
    rel = rel[rel["granularity"] == g]
    parts = [f"{t}: {', '.join(sub.loc[sub[lo] > 0, 'unit']) or 'none'}"
             for t, sub in rel.groupby("knowledge_type", sort=False)]
    if not (rel[lo] > 0).any():
        return [f"Layer selection: **no {g} is significantly above the mean** of r for any knowledge type "
                f"({how} of r_l - mean(r)); the TGL selection is within noise.", ""] + out
    return [f"Layer selection: {g}s significantly above the mean of r ({how} of "
            f"r_l - mean(r)): {'; '.join(parts)}.", ""] + out


def permutation_lines(profile) -> list[str]:
    """One line: the new-vs-updated label-permutation p-value beside the profile."""
    path = Path(profile) / "tests.json"
    if not path.exists():
        return []
    t = read_json(path).get("new_vs_updated", {})
    if not t.get("available"):
        return [f"Gradient profile, new vs updated: no permutation test ({t.get('reason') or 'not available'}).", ""]
    moved = {"entity": "entities"}.get(t.get("exchange_unit"), "sequences")
    return [f"Gradient profile, new vs updated ({t['test']}, {t['permutations']} permutations exchanging "
            f"{moved}): {t['statistic']} = {t['observed']:.3g}, "
            f"p = {t['p_value']:.3g}; shape p = {t.get('shape_p_value', float('nan')):.3g}.", ""]
