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
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

from ..io import InputError, read_table, require_finite  # noqa: E402
from .table import ALL_PERIODS, BASE, is_ppl  # noqa: E402

HEATMAP_TITLE = "Where updates land: relative gradient norm per layer (bottom = input)"


def heatmap(relative: pd.DataFrame, path, dpi: int = 120, title: str = HEATMAP_TITLE) -> None:
    """Relative gradient norm (profile/relative.csv) per unit (rows, bottom-up) and
    knowledge type (columns), coloured around 1 (= control); one panel per granularity
    present. The one heatmap of the package (the profile stage draws with it too)."""
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
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


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


def tradeoff(table: pd.DataFrame, order: list[str], primary: str, path: Path, dpi: int,
             averaged=("new", "updated")) -> None:
    """Forgetting (x) against uptake (y), one point per method and period, error bars =
    seed std; a thin line joins a method's periods in order. `averaged`: the sets in
    uptake, for the axis label."""
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
    up = "ln base − ln method" if lower else "method − base"
    ax.set_ylabel(f"uptake on {'+'.join(averaged) or 'none'} ({up} {primary}; ↑ better)")
    ax.set_title("Uptake vs forgetting (error bars: std over seeds)")
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
