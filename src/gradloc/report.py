"""Stage 7b: the report. Gathers every evaluation, training log and the gradient profile
into one table (CSV + Markdown) and three figures.

Definitions (also written into table.md):
- Each eval folder gives, per probe set, the primary metric (object_ppl by default) and
  top1; numbers are mean +- sample std (ddof 1) over seeds, n = number of seeds.
- uptake on new/updated: improvement over the base model on the same period's probes,
  ln(base) - ln(method) for perplexities (the drop in mean negative log-likelihood per
  token, in nats: a base model at ppl 10^6 makes raw differences meaningless), method -
  base for top1 (positive = learned).
- forgetting: worsening on unchanged probes relative to the base model, ln(method) -
  ln(base) for perplexities, base - method for top1 (positive = forgot).
Derived numbers are computed per seed and then averaged, so their std is the seed spread.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from tqdm import tqdm  # noqa: E402

from .io import InputError, atomic_output, read_json, read_table  # noqa: E402

log = logging.getLogger(__name__)

DEFAULTS = {"title": "gradloc report", "dpi": 120, "primary_metric": "object_ppl"}
SETS = ("unchanged", "updated", "new", "outdated")
METRICS = ("object_ppl", "statement_ppl", "top1")
BASE = "base"
ALL_PERIODS = "all"  # the period label of the rows averaged over periods
FLOAT_FORMAT = "%.10g"  # enough digits for any ppl, none of the 0.30000000000000004 noise


# ----------------------------------------------------------------------------- inputs

def parse_eval_path(path) -> tuple[str, int | None, int]:
    """`.../eval/<method>/seed<seed>/P<period>` or `.../eval/base/P<period>` ->
    (method, seed or None for the base model, period)."""
    p = Path(path)
    m_period = re.fullmatch(r"P(\d+)", p.name)
    if not m_period:
        raise InputError(f"{path}: eval folder must end in P<period>")
    period = int(m_period.group(1))
    if p.parent.name == BASE:
        return BASE, None, period
    m_seed = re.fullmatch(r"seed(\d+)", p.parent.name)
    if not m_seed or not p.parent.parent.name:
        raise InputError(f"{path}: expected .../eval/<method>/seed<seed>/P<period> or .../eval/base/P<period>")
    return p.parent.parent.name, int(m_seed.group(1)), period


def parse_train_path(path) -> tuple[str, int, int]:
    """`.../train/<method>/seed<seed>/P<period>` -> (method, seed, period)."""
    p = Path(path)
    m_period = re.fullmatch(r"P(\d+)", p.name)
    m_seed = re.fullmatch(r"seed(\d+)", p.parent.name)
    if not (m_period and m_seed and p.parent.parent.name):
        raise InputError(f"{path}: expected .../train/<method>/seed<seed>/P<period>")
    return p.parent.parent.name, int(m_seed.group(1)), int(m_period.group(1))


def _number(value, where: str) -> float:
    if value is None:
        return math.nan  # e.g. a set with no probes this period
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where}: expected a number, got {value!r}")
    return float(value)


def read_summary(folder) -> dict[str, float]:
    """One eval folder's summary.json flattened to {"<set>_<metric>": x, "heldout_ppl": x}.
    A set missing from the file gives NaN (no probes of that kind in this period)."""
    path = Path(folder) / "summary.json"
    if not path.exists():
        raise InputError(f"{path}: file not found (eval folder {folder} has no summary.json)")
    summary = read_json(path)
    if not isinstance(summary, dict):
        raise InputError(f"{path}: expected a JSON object")
    sets = summary.get("sets", summary)  # tolerate the per-set dicts nested under "sets"
    row = {}
    for s in SETS:
        entry = sets.get(s, {}) or {}
        if not isinstance(entry, dict):
            raise InputError(f"{path}: key {s!r} must be an object with {list(METRICS)}")
        for m in METRICS:
            row[f"{s}_{m}"] = _number(entry.get(m), f"{path}: key {s}.{m}")
    row["heldout_ppl"] = _number(summary.get("heldout_ppl"), f"{path}: key heldout_ppl")
    return row


def load_evals(evals: list) -> tuple[pd.DataFrame, list[str]]:
    """All eval folders as one frame (method, seed, period, metrics), and the method
    order: base first, then the order in which methods first appear in `evals`."""
    if not evals:
        raise InputError("report: no eval folders given (--evals is empty)")
    rows, order, seen = [], [BASE], set()
    for folder in tqdm(list(evals), desc="read evals", unit="folder", leave=False):
        method, seed, period = parse_eval_path(folder)
        key = (method, seed, period)
        if key in seen:
            raise InputError(f"{folder}: duplicate eval for method {method}, seed {seed}, period {period}")
        seen.add(key)
        if method not in order:
            order.append(method)
        rows.append({"method": method, "seed": -1 if seed is None else seed, "period": period,
                     **read_summary(folder)})
    df = pd.DataFrame(rows)
    if BASE not in set(df["method"]):
        order.remove(BASE)
    return df, order


COST_COLUMNS = ("trainable_params", "wall_time_s")  # from train metrics.json, when present


def read_trains(trains: list) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every train folder's log.csv stacked (step, loss, method, seed, period), and the
    cost of each run from its metrics.json (method, seed, period, trainable_params,
    wall_time_s; NaN where the file or key is missing)."""
    frames, costs = [], []
    for folder in tqdm(list(trains), desc="read train logs", unit="folder", leave=False):
        method, seed, period = parse_train_path(folder)
        df = read_table(Path(folder) / "log.csv", columns=["step", "loss"])
        df = df[["step", "loss"]].apply(pd.to_numeric, errors="coerce").dropna()
        frames.append(df.assign(method=method, seed=seed, period=period))
        path = Path(folder) / "metrics.json"
        metrics = read_json(path) if path.exists() else {}
        costs.append({"method": method, "seed": seed, "period": period,
                      **{k: _number(metrics.get(k), f"{path}: key {k}") for k in COST_COLUMNS}})
    logs = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["step", "loss", "method", "seed", "period"])
    return logs, pd.DataFrame(costs, columns=["method", "seed", "period", *COST_COLUMNS])


# ----------------------------------------------------------------------------- the table

def is_ppl(metric: str) -> bool:
    return metric.endswith("ppl")


def gain(metric: str, base, method):
    """Improvement of `method` over `base`: for perplexities the drop in mean NLL per
    token, ln(base) - ln(method) nats; for accuracies the difference."""
    return np.log(base) - np.log(method) if is_ppl(metric) else method - base


def value_columns(primary: str) -> list[str]:
    """The per-row numbers of the table, in display order."""
    cols = [f"{s}_{primary}" for s in SETS]
    derived = ["uptake_new", "uptake_updated", "uptake", "forgetting"]
    if primary != "top1":
        cols += [f"{s}_top1" for s in SETS]
        derived += ["top1_gain_new", "top1_gain_updated", "top1_forgetting"]
    return cols + derived + ["heldout_ppl", *COST_COLUMNS]


def add_derived(df: pd.DataFrame, primary: str) -> pd.DataFrame:
    """Per-seed uptake and forgetting against the base model of the same period.
    The base model's own rows get 0 (it is the reference); periods without a base eval
    get NaN."""
    base = df[df["method"] == BASE].set_index("period")
    missing = sorted(set(df["period"]) - set(base.index))
    if missing:
        log.warning("no eval/base for period(s) %s: uptake and forgetting are left empty there", missing)
    out = df.copy()

    def ref(col):  # the base model's value for each row's period
        return out["period"].map(base[col]) if len(base) else pd.Series(np.nan, index=out.index)

    out["uptake_new"] = gain(primary, ref(f"new_{primary}"), out[f"new_{primary}"])
    out["uptake_updated"] = gain(primary, ref(f"updated_{primary}"), out[f"updated_{primary}"])
    # new+updated together: the mean of the two, so each kind of knowledge weighs the same
    out["uptake"] = out[["uptake_new", "uptake_updated"]].mean(axis=1, skipna=False)
    out["forgetting"] = -gain(primary, ref(f"unchanged_{primary}"), out[f"unchanged_{primary}"])
    if primary != "top1":
        out["top1_gain_new"] = out["new_top1"] - ref("new_top1")
        out["top1_gain_updated"] = out["updated_top1"] - ref("updated_top1")
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
    cols = value_columns(primary)
    if costs is None:
        costs = pd.DataFrame(columns=["method", "seed", "period", *COST_COLUMNS])
    costs = costs.astype({"seed": int, "period": int, **{c: float for c in COST_COLUMNS}})
    per_seed = add_derived(evals_df.merge(costs, on=["method", "seed", "period"], how="left"), primary)
    per_seed = per_seed.sort_values(["period", "seed"], kind="stable")
    per_seed["method"] = pd.Categorical(per_seed["method"], categories=order)
    per_seed = per_seed.sort_values("method", kind="stable")
    per_seed["method"] = per_seed["method"].astype(str)
    table = aggregate(per_seed, cols, order)
    return mark_best(table, cols)


# ----------------------------------------------------------------------------- markdown

def fmt(x: float, integer: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if integer:
        return f"{x:,.0f}"
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:.3f}"


def cell(row, col: str) -> str:
    integer = col == "trainable_params"
    text = fmt(row[f"{col}_mean"], integer)
    if not math.isnan(row[f"{col}_std"]):
        text += f" ± {fmt(row[f'{col}_std'], integer)}"
    return f"**{text}**" if col in row["best"].split(";") else text


def md_table(table: pd.DataFrame, columns: list[tuple[str, str]]) -> list[str]:
    head = ["method", "period", "n"] + [label for _, label in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, row in table.iterrows():
        cells = [row["method"], row["period"], str(row["n_seeds"])] + [cell(row, c) for c, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def definitions(primary: str) -> list[str]:
    """The header text of table.md: what every number means."""
    lower = is_ppl(primary)
    up = f"ln(base {primary}) − ln(method {primary}), in nats per token" if lower else f"method − base {primary}"
    forget = f"ln(method {primary}) − ln(base {primary})" if lower else f"base − method {primary}"
    lines = [
        f"Primary metric: `{primary}` ({'lower' if lower else 'higher'} is better). Every cell is the mean ± sample "
        "standard deviation (ddof 1) over training seeds; `n` is the number of seeds (no ± with one seed). "
        "Probe sets: `unchanged` (facts true before and after the update), `updated` (changed facts of known "
        "entities), `new` (facts of entities first seen in this period), `outdated` (the replaced old facts).",
        "",
        f"- **uptake new / updated** = {up} on that period's `new` / `updated` probes, where *base* is the base "
        "model (before any continual training) evaluated on the same period's probes; positive = learned.",
        "- **uptake** = mean of uptake new and uptake updated (each kind of knowledge weighs the same).",
        f"- **forgetting** = {forget} on the `unchanged` probes; positive = forgot.",
    ]
    if primary != "top1":
        lines.append("- **top1 gain new / updated** = method − base top1 accuracy on `new` / `updated`; "
                     "**top1 forgetting** = base − method top1 on `unchanged`.")
    return lines + [
        "- **held-out ppl**: perplexity on the period's held-out diff sequences.",
        "- **trainable params**, **wall time (s)**: from each training run's `metrics.json` (not ranked).",
        "- Derived numbers are computed per seed, then averaged; period `all` rows average each seed over the "
        "periods first, then over seeds. The base model's derived numbers are 0 by definition.",
        "- **Bold**: the best method of that period in that column (the base model is not ranked; the `outdated` "
        "columns are not ranked, since keeping an old fact is neither clearly good nor bad).",
    ]


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dicts as dotted keys: {"t0_probes": {"unchanged": {"top1": x}}} -> {"t0_probes.unchanged.top1": x}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def base_model_lines(metrics: dict) -> list[str]:
    """Scalar entries of base_model/metrics.json (its T0 probe accuracy among them), for context."""
    items = [(k, v) for k, v in sorted(flatten(metrics).items())
             if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    if not items:
        return []
    return ["Base model (`base_model/metrics.json`): " + ", ".join(
        f"{k} = {fmt(v) if isinstance(v, float) else v}" for k, v in items) + "."]


def markdown(table: pd.DataFrame, primary: str, title: str, base_metrics: dict) -> str:
    main_cols = [(f"{s}_{primary}", f"{s} {primary}") for s in SETS] + [
        ("uptake_new", "uptake new"), ("uptake_updated", "uptake updated"), ("uptake", "uptake"),
        ("forgetting", "forgetting"), ("heldout_ppl", "held-out ppl")]
    top1_cols = [(f"{s}_top1", f"{s} top1") for s in SETS] + [
        ("top1_gain_new", "top1 gain new"), ("top1_gain_updated", "top1 gain updated"),
        ("top1_forgetting", "top1 forgetting")]
    cost_cols = [("trainable_params", "trainable params"), ("wall_time_s", "wall time (s)")]
    context = base_model_lines(base_metrics)
    lines = [f"# {title}", "", *definitions(primary), "", *context, *([""] if context else [])]
    per_period = table[table["period"] != ALL_PERIODS]
    summary = table[table["period"] == ALL_PERIODS]
    for heading, part in (("Per period", per_period), ("Per method, averaged over periods", summary)):
        lines += [f"## {heading}: {primary}", ""] + md_table(part, main_cols) + [""]
        if primary != "top1":
            lines += [f"## {heading}: top1", ""] + md_table(part, top1_cols) + [""]
        lines += [f"## {heading}: training cost", ""] + md_table(part, cost_cols) + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures

def plot_heatmap(relative: pd.DataFrame, path: Path, dpi: int) -> None:
    """Relative gradient norm per unit (rows, bottom-up) and knowledge type (columns);
    one panel per granularity present."""
    relative = relative.assign(rel=pd.to_numeric(relative["rel"], errors="coerce"),
                               layer=pd.to_numeric(relative["layer"], errors="coerce"))
    grans = [g for g in ("block", "module") if g in set(relative["granularity"])]
    grans += sorted(set(relative["granularity"]) - set(grans))
    types = [t for t in ("new", "updated", "unchanged") if t in set(relative["knowledge_type"])]
    types += sorted(set(relative["knowledge_type"]) - set(types) - {"control"})  # control/control = 1
    if not types:
        raise InputError("profile/relative.csv: no knowledge_type other than control")
    heights = [relative[relative["granularity"] == g]["unit"].nunique() for g in grans]
    fig, axes = plt.subplots(1, len(grans), figsize=(2.5 + 1.3 * len(types) * len(grans), 1.5 + 0.35 * max(heights)),
                             squeeze=False)
    for ax, g in zip(axes[0], grans):
        sub = relative[relative["granularity"] == g]
        units = sub[["unit", "layer"]].drop_duplicates().sort_values(["layer", "unit"], kind="stable")["unit"].tolist()
        grid = sub.pivot_table(index="unit", columns="knowledge_type", values="rel", aggfunc="mean")
        grid = grid.reindex(index=units, columns=types)
        values = grid.to_numpy(dtype=float)
        lo, hi = np.nanmin(values), np.nanmax(values)
        # Centre the colours at r = 1 (same gradient norm as control text).
        norm = TwoSlopeNorm(vcenter=1.0, vmin=min(lo, 1 - 1e-6), vmax=max(hi, 1 + 1e-6))
        im = ax.imshow(values, origin="lower", aspect="auto", cmap="RdBu_r", norm=norm)
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                if not math.isnan(values[i, j]):
                    ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(types)), types)
        ax.set_yticks(range(len(units)), units, fontsize=7)
        ax.set_xlabel("knowledge type")
        ax.set_title(f"{g} granularity")
        fig.colorbar(im, ax=ax, label="relative gradient norm (type / control)")
    fig.suptitle("Where updates land: relative gradient norm per layer (bottom = input)")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def render_heatmap(profile, path: Path, dpi: int) -> None:
    """Re-render from profile/relative.csv; fall back to copying profile/heatmap.png."""
    profile = Path(profile)
    csv = profile / "relative.csv"
    if csv.exists():
        plot_heatmap(read_table(csv, columns=["knowledge_type", "granularity", "unit", "layer", "rel"]), path, dpi)
    elif (profile / "heatmap.png").exists():
        shutil.copyfile(profile / "heatmap.png", path)
    else:
        raise InputError(f"{profile}: neither relative.csv nor heatmap.png found")


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def method_colors(order: list[str]) -> dict:
    cmap = plt.get_cmap("tab10" if len(order) <= 10 else "tab20")
    return {m: cmap(i % cmap.N) for i, m in enumerate(order)}


def plot_tradeoff(table: pd.DataFrame, order: list[str], primary: str, path: Path, dpi: int) -> None:
    """Forgetting (x) against uptake (y), one point per method and period, error bars =
    seed std; a thin line joins a method's periods in order."""
    colors = method_colors(order)
    per_period = table[(table["period"] != ALL_PERIODS) & (table["method"] != BASE)]
    periods = sorted({int(p) for p in per_period["period"]})
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.axhline(0, color="0.6", lw=0.8)
    ax.axvline(0, color="0.6", lw=0.8)
    ax.plot([0], [0], marker="*", ms=12, color="k", ls="none", label="base model")
    for method in [m for m in order if m != BASE]:
        g = per_period[per_period["method"] == method]
        if g.empty:
            continue
        g = g.assign(_p=g["period"].astype(int)).sort_values("_p")
        ax.plot(g["forgetting_mean"], g["uptake_mean"], color=colors[method], lw=0.8, alpha=0.6)
        for _, row in g.iterrows():
            ax.errorbar(row["forgetting_mean"], row["uptake_mean"],
                        xerr=np.nan_to_num(row["forgetting_std"]), yerr=np.nan_to_num(row["uptake_std"]),
                        color=colors[method], marker=MARKERS[periods.index(row["_p"]) % len(MARKERS)],
                        ms=7, capsize=3, ls="none")
        ax.plot([], [], color=colors[method], marker="o", ls="-", label=method)
    for p in periods:
        ax.plot([], [], color="0.4", marker=MARKERS[periods.index(p) % len(MARKERS)], ls="none", label=f"period {p}")
    lower = is_ppl(primary)
    ax.set_xlabel(f"forgetting on unchanged ({'ln method − ln base' if lower else 'base − method'} {primary}; "
                  "← better)")
    ax.set_ylabel(f"uptake on new+updated ({'ln base − ln method' if lower else 'method − base'} {primary}; "
                  "↑ better)")
    ax.set_title("Uptake vs forgetting (error bars: std over seeds)")
    ax.legend(fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_curves(logs: pd.DataFrame, order: list[str], path: Path, dpi: int) -> None:
    """Training loss vs step, mean over seeds (band: min..max over seeds), one panel per
    period."""
    if logs.empty:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.text(0.5, 0.5, "no training logs given", ha="center", va="center")
        ax.set_axis_off()
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        return
    methods = [m for m in order if m in set(logs["method"])] + sorted(set(logs["method"]) - set(order))
    colors = method_colors([BASE] + methods)  # same colours as the trade-off plot
    periods = sorted(set(logs["period"]))
    fig, axes = plt.subplots(1, len(periods), figsize=(4.5 * len(periods), 3.8), squeeze=False, sharey=True)
    for ax, p in zip(axes[0], periods):
        for method in methods:
            g = logs[(logs["period"] == p) & (logs["method"] == method)]
            if g.empty:
                continue
            stats = g.groupby("step")["loss"].agg(["mean", "min", "max"]).sort_index()
            ax.plot(stats.index, stats["mean"], color=colors[method], lw=1.2, label=method)
            if g["seed"].nunique() > 1:
                ax.fill_between(stats.index, stats["min"], stats["max"], color=colors[method], alpha=0.15, lw=0)
        ax.set_title(f"period {p}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss (mean over seeds)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


# ----------------------------------------------------------------------------- stage

def run(params: dict, evals: list, trains: list, profile, base_model, out) -> None:
    params = {**DEFAULTS, **(params or {})}
    primary = params["primary_metric"]
    if primary not in METRICS:
        raise InputError(f"params: primary_metric must be one of {list(METRICS)}, got {primary!r}")
    dpi = int(params["dpi"])

    evals_df, order = load_evals(evals)
    logs, costs = read_trains(trains)
    base_metrics_path = Path(base_model) / "metrics.json"
    base_metrics = read_json(base_metrics_path)
    if not isinstance(base_metrics, dict):
        raise InputError(f"{base_metrics_path}: expected a JSON object")
    table = build_table(evals_df, order, primary, costs)

    with atomic_output(out) as tmp:
        # Plain "\n" and a fixed float format: the same inputs give the same bytes.
        table.to_csv(tmp / "table.csv", index=False, float_format=FLOAT_FORMAT, lineterminator="\n")
        (tmp / "table.md").write_text(markdown(table, primary, params["title"], base_metrics) + "\n")
        render_heatmap(profile, tmp / "heatmap.png", dpi)
        plot_tradeoff(table, order, primary, tmp / "tradeoff.png", dpi)
        plot_curves(logs, order, tmp / "curves.png", dpi)

    n_seeds = evals_df.loc[evals_df["method"] != BASE, "seed"].nunique()
    log.info("report: %d methods (incl. base), %d periods, %d seeds, %d eval folders, %d train logs -> %s "
             "(table %d rows, 3 figures)", len(order), evals_df["period"].nunique(), n_seeds, len(evals_df),
             logs.groupby(["method", "seed", "period"]).ngroups if not logs.empty else 0, out, len(table))
