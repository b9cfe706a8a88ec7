"""The profile's figures, drawn by the profile stage and again by the report: the heatmap of
relative gradient norms and the significance of each layer's difference."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

from .io import InputError  # noqa: E402

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


def significance(relative: pd.DataFrame, path, dpi: int = 120) -> bool:
    """r_l - mean(r) per transformer-block unit with its paired bootstrap 95% interval
    (profile/relative.csv columns d, d_lo, d_hi), one panel per knowledge type, block
    granularity (module where no block rows). A unit is significantly above the mean
    when its interval lies above 0. False (nothing drawn) for a profile without d."""
    if "d" not in relative:
        return False
    rel = relative.assign(**{c: pd.to_numeric(relative[c], errors="coerce") for c in ("d", "d_lo", "d_hi", "layer")})
    rel = rel[rel["d"].notna()]
    if rel.empty:
        return False
    g = "block" if (rel["granularity"] == "block").any() else rel["granularity"].iloc[0]
    rel = rel[rel["granularity"] == g]
    types = [t for t in ("new", "updated", "unchanged") if t in set(rel["knowledge_type"])]
    fig, axes = plt.subplots(1, len(types), figsize=(2 + 2.6 * len(types), 1.5 + 0.3 * rel["unit"].nunique()),
                             squeeze=False, sharey=True)
    for ax, t in zip(axes[0], types):
        sub = rel[rel["knowledge_type"] == t].sort_values(["layer", "unit"], kind="stable")
        y = np.arange(len(sub))
        sig = (sub["d_lo"] > 0).to_numpy()
        err = np.vstack([(sub["d"] - sub["d_lo"]).to_numpy(), (sub["d_hi"] - sub["d"]).to_numpy()])
        ax.errorbar(sub["d"], y, xerr=np.nan_to_num(err), fmt="none", ecolor="grey", capsize=3)
        ax.scatter(sub["d"], y, c=np.where(sig, "tab:red", "tab:blue"), zorder=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(y, sub["unit"].tolist(), fontsize=7)
        ax.set_title(f"{t} ({int(sig.sum())} above mean)")
        ax.set_xlabel("r_l - mean(r), 95% CI")
    fig.suptitle(f"Which layers stand out ({g}; red: interval above 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return True
