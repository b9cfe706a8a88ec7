"""The report's figures (the only matplotlib in the report): the gradient-profile
heatmap, uptake vs forgetting, and training curves."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..figures import heatmap, significance  # noqa: E402, F401  (the report draws them too)
from ..io import InputError, read_table, require_finite  # noqa: E402
from .table import ALL_PERIODS, BASE, is_ppl  # noqa: E402


def render_heatmap(profile, path: Path, dpi: int) -> None:
    """Re-render from profile/relative.csv; fall back to copying profile/heatmap.png."""
    profile = Path(profile)
    csv = profile / "relative.csv"
    if csv.exists():
        relative = read_table(csv, columns=["knowledge_type", "granularity", "unit", "layer", "rel"])
        require_finite(relative, ["layer", "rel"], csv)
        heatmap(relative, path, dpi)
    elif (profile / "heatmap.png").exists():
        shutil.copyfile(profile / "heatmap.png", path)
    else:
        raise InputError(f"{profile}: neither relative.csv nor heatmap.png found")


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def method_colors(order: list[str]) -> dict:
    cmap = plt.get_cmap("tab10" if len(order) <= 10 else "tab20")
    return {m: cmap(i % cmap.N) for i, m in enumerate(order)}


def fact_tradeoff(facts: pd.DataFrame, order: list[str], path: Path, dpi: int) -> None:
    """`tradeoff` of the fact-level numbers (report/facts.py): fact forgetting (x) against
    fact uptake (y), in points of hits@1."""
    df = facts.assign(**{f"{a}_{s}": 100 * facts[f"fact_fact_{a}_{s}"] for a in ("uptake", "forgetting")
                         for s in ("mean", "std")})
    tradeoff(df, order, "hits@1", path, dpi, labels=(
        "fact forgetting on unchanged (base − method hits@1, points; ← better)",
        "fact uptake on new + updated (method − base hits@1, points; ↑ better)",
        "Fact-level uptake vs forgetting (error bars: std over seeds)"))


def tradeoff(table: pd.DataFrame, order: list[str], primary: str, path: Path, dpi: int,
             averaged=("new", "updated"), labels: tuple[str, str, str] | None = None) -> None:
    """Forgetting (x) against uptake (y), one point per method and period, error bars =
    seed std; a thin line joins a method's periods in order. `averaged`: the sets in
    uptake, for the axis label; `labels`: (x label, y label, title) instead."""
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
    up = "ln base − ln method" if lower else "method − base"
    xlabel, ylabel, title = labels or (
        f"forgetting on unchanged ({'ln method − ln base' if lower else 'base − method'} {primary}; ← better)",
        f"uptake on {'+'.join(averaged) or 'none'} ({up} {primary}; ↑ better)",
        "Uptake vs forgetting (error bars: std over seeds)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def curves(logs: pd.DataFrame, order: list[str], path: Path, dpi: int) -> None:
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


def localization(paired: pd.DataFrame, correlations: pd.DataFrame, path: Path, dpi: int) -> None:
    """Per layer (block granularity): mask density (left axis) and TGL's relative
    gradient norm (right axis), one panel per knowledge set, rho in the title."""
    blocks = paired[paired["granularity"] == "block"]
    sets = list(dict.fromkeys(blocks["knowledge_set"])) or ["(none)"]
    fig, axes = plt.subplots(1, len(sets), figsize=(4.5 * len(sets), 3.6), squeeze=False)
    for ax, ks in zip(axes[0], sets):
        g = blocks[blocks["knowledge_set"] == ks].sort_values("layer")
        if g.empty:
            ax.text(0.5, 0.5, "no subnetwork / profile pairs", ha="center", va="center")
            ax.set_axis_off()
            continue
        ax.bar(g["layer"], g["density"], color="tab:orange", alpha=0.7, label="mask density")
        ax.set_xlabel("layer (block)")
        ax.set_ylabel("mask density", color="tab:orange")
        twin = ax.twinx()
        twin.plot(g["layer"], g["rel"], color="tab:blue", marker="o", label="relative gradient norm")
        twin.set_ylabel(f"TGL relative norm ({g['knowledge_type'].iat[0]})", color="tab:blue")
        c = correlations[(correlations["knowledge_set"] == ks) & (correlations["granularity"] == "block")]
        rho = f"ρ = {c['spearman'].iat[0]:.2f} [{c['lo'].iat[0]:.2f}, {c['hi'].iat[0]:.2f}]" if len(c) else ""
        ax.set_title(f"{ks}: {rho}", fontsize=9)
    fig.suptitle("Knowledge-critical subnetwork density vs TGL gradient norm, per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def weighting(curve: pd.DataFrame | None, example: dict | None, title: str, path: Path, dpi: int) -> None:
    """Left: the meta-learning curve (training and validation outer loss vs outer step);
    right: one document's tokens as a heat strip of their weights (outlined: entity/object)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1, 2]})
    if curve is not None and not curve.empty:
        left.plot(curve["step"], curve["val_loss"], marker="o", label="validation")
        if curve["train_loss"].notna().any():
            left.plot(curve["step"], curve["train_loss"], marker=".", label="training (mean since last)")
        left.set_xlabel("outer step")
        left.set_ylabel("QA NLL + KL term")
        left.legend(fontsize=7)
        left.grid(alpha=0.3)
        left.set_title("CaMeLS meta-training")
    else:
        left.set_axis_off()
    right.set_axis_off()
    if example:
        toks, w = example["tokens"][:96], np.asarray(example["weights"][:96], dtype=float)
        marked = (example.get("marked") or [0] * len(toks))[:96]
        per_row = 24
        cmap = plt.get_cmap("viridis")
        top = max(float(w.max()), 1e-9)
        for i, (t, x, m) in enumerate(zip(toks, w, marked)):
            r, c = divmod(i, per_row)
            right.add_patch(plt.Rectangle((c, -r), 1, 0.9, color=cmap(x / top), ec="red" if m else "none", lw=1.5))
            right.text(c + 0.5, -r + 0.45, t.replace("\n", " ").strip() or "·", ha="center", va="center", fontsize=6,
                       color="white" if x / top < 0.6 else "black")
        right.set_xlim(0, per_row)
        right.set_ylim(-math.ceil(len(toks) / per_row) + 0.9, 1)
        right.set_title(f"{title}: token weights of one document (max {top:.3g}; red: entity/object)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
