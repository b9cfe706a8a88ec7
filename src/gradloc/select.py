"""Layer selection from the gradient profile (TGL, methods §1).

TGL-FP: per knowledge type, the units whose relative gradient norm r is above the mean
of r over units (`rule: mean`, the paper's), the units significantly above it
(`rule: mean_significant`, ours: the 95% interval of d = r - mean(r) lies wholly above 0;
the simultaneous interval `d_slo`/`d_shi` when the profile has it, else the per-unit
`d_lo`/`d_hi`; `mean` with a warning where no unit is), or the k largest (`rule: topk`);
the types' choices are combined by union or intersection. The rest is frozen during training.
TGL-ALR: each unit's learning rate is multiplied by r (averaged over the chosen
types) normalised by the mean (or max) over units.

Only transformer-block units are candidates: the paper selects transformer layers, and
the embeddings / final norm / lm_head are shared by every input (their gradient scale
says little about where a fact is stored). They stay frozen under TGL-FP and keep
multiplier 1.0 under TGL-ALR.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from . import schema
from .core import is_candidate
from .io import InputError, atomic_output, read_table, require_finite, write_json

log = logging.getLogger(__name__)

def with_defaults(params: dict | None) -> dict:
    return schema.fill("select", params, where="select")


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def choose(r: pd.Series, rule: str, k: int | None, lower: pd.Series | None = None) -> tuple[set[str], str]:
    """Units chosen for one knowledge type, and the threshold in words. `lower`: the lower
    end of each unit's interval of d = r - mean(r) (rule mean_significant)."""
    if rule == "mean_significant":
        lo = pd.Series(float("nan"), index=r.index) if lower is None else lower.reindex(r.index)
        sig = set(lo.index[lo.gt(0)])
        if sig:
            return sig, f"mean {_fmt(r.mean())} (significantly above)"
        rule = "mean"
    if rule == "mean":
        mean = r.mean()
        return set(r.index[r > mean]), f"mean {_fmt(mean)}"
    k = k if k is not None else max(1, len(r) // 2)  # no k given: the upper half
    top = r.sort_values(ascending=False, kind="stable").index[:k]
    return set(top), f"top {k}"


def select(relative: pd.DataFrame, params: dict) -> dict:
    """The selection JSON (docs/formats.md) from a relative.csv table."""
    params = with_defaults(params)
    g = params["granularity"]
    rel, wide, order, candidates, types = profiled(relative, params)
    picked, why, fell_back = {}, {u: [] for u in candidates}, []
    for t in types:
        r = wide.loc[candidates, t].dropna()
        lower = lower_ends(rel, t) if params["rule"] == "mean_significant" else None
        chosen, threshold = choose(r, params["rule"], params["k"], lower)
        if params["rule"] == "mean_significant" and "significantly" not in threshold:
            fell_back.append(t)
            log.warning("select: rule mean_significant: no %s unit is significantly above the mean "
                        "(interval of d wholly above 0)%s; falling back to rule mean for %s", t,
                        "" if lower is not None else " (the profile has no interval of d)", t)
        picked[t] = chosen
        for u in r.index:
            if threshold.startswith("mean") and "significantly" not in threshold:
                op = ">" if u in chosen else "<="
            else:
                op = "in" if u in chosen else "not in"
            why[u].append(f"{t}: r={_fmt(r[u])} {op} {threshold}")
    sets = list(picked.values())
    units = set.union(*sets) if params["combine"] == "union" else set.intersection(*sets)
    fallback = False
    if not units:
        # an empty intersection would train nothing: keep the single strongest unit
        mean_r = wide.loc[candidates, types].mean(axis=1)
        units = {mean_r.idxmax()}
        fallback = True
        log.warning("select: empty %s, falling back to %s", params["combine"], units)
    selected = [u for u in candidates if u in units]

    # TGL-ALR: r averaged over the chosen types, normalised over the candidate units
    r_mean = wide[types].mean(axis=1)
    norm = r_mean[candidates].mean() if params["alr_normalise"] == "mean" else r_mean[candidates].max()
    multipliers = {u: (float(r_mean[u] / norm) if is_candidate(u) else 1.0) for u in order}
    significance = significance_of(rel, candidates, types, selected)
    return {
        "granularity": g,
        "rule": params["rule"],
        "k": params["k"],
        # rule mean_significant: the types where no unit was significant and `mean` chose
        "fallback_to_mean": fell_back,
        "knowledge_types": types,
        "combine": params["combine"],
        "alr_normalise": params["alr_normalise"],
        "n_layers": int(rel.loc[rel["unit"].map(is_candidate), "layer"].max()) + 1,
        "units": selected,
        "lr_multipliers": multipliers,
        "reasons": reasons_of(order, types, why, units, fallback, multipliers, significance, params["combine"]),
        # null: a unit with no relative norm for the chosen types ("nothing measured")
        "relative": {u: (float(r_mean[u]) if pd.notna(r_mean[u]) else None) for u in order},
        "significance": significance,
    }


def profiled(relative: pd.DataFrame, params: dict):
    """(rows of the granularity, unit x knowledge type table bottom to top, units in order,
    candidate units, the knowledge types profiled), each missing piece named."""
    g = params["granularity"]
    rel = relative[relative["granularity"] == g]
    if rel.empty:
        raise InputError(f"relative.csv: no rows with granularity {g!r}")
    wide = rel.pivot_table(index="unit", columns="knowledge_type", values="rel", sort=False)
    layer = rel.drop_duplicates("unit").set_index("unit")["layer"]
    order = layer.sort_values(kind="stable").index.tolist()  # bottom to top
    wide = wide.reindex(order)
    candidates = [u for u in order if is_candidate(u)]
    if not candidates:
        raise InputError(f"relative.csv: no transformer-block units at granularity {g!r}")
    types = [t for t in params["knowledge_types"] if t in wide.columns and wide.loc[candidates, t].notna().any()]
    if not types:
        raise InputError(f"relative.csv: none of the knowledge types {params['knowledge_types']} was profiled "
                         f"(found {sorted(wide.columns)})")
    missing = sorted(set(params["knowledge_types"]) - set(types))
    if missing:
        log.warning("select: knowledge type(s) %s not in the profile, using %s", missing, types)
    return rel, wide, order, candidates, types


def lower_ends(rel: pd.DataFrame, t: str) -> pd.Series | None:
    """Per unit of knowledge type `t`: the lower end of the interval of d = r - mean(r),
    from the simultaneous interval `d_slo` when the profile has it, else `d_lo`; None
    where the profile has neither (or only empty values)."""
    sub = rel[rel["knowledge_type"] == t].set_index("unit")
    lo_col = BANDS[band_of(rel)][0]
    lo = pd.to_numeric(sub[lo_col], errors="coerce") if lo_col in sub.columns else None
    return lo if lo is not None and lo.notna().any() else None


def reasons_of(order, types, why, units, fallback, multipliers, significance, combine) -> dict[str, str]:
    """Why each unit was selected or frozen, and its lr multiplier, in words."""
    reasons = {}
    for u in order:
        if not is_candidate(u):
            reasons[u] = "not a transformer block: never selected, lr x1.0"
            continue
        verdict = "selected" if u in units else "frozen"
        if fallback and u in units:
            verdict = f"selected (fallback: empty {combine}, highest mean r)"
        elif len(types) > 1:
            verdict += f" ({combine})"
        reasons[u] = "; ".join(why[u]) + f" -> {verdict}; lr x{multipliers[u]:.3g}"
        sig = [t for t in types if u in significance.get("above_mean", {}).get(t, [])]
        if significance["available"]:
            reasons[u] += "; significantly above the mean for " + "/".join(sig) if sig else \
                "; not significantly above the mean"
    return reasons


BANDS = {"simultaneous": ("d_slo", "d_shi", "simultaneous 95% bootstrap band (max-|t| over block units)"),
         "pointwise": ("d_lo", "d_hi", "paired bootstrap 95% interval per unit")}


def band_of(rel: pd.DataFrame) -> str:
    """The interval of d the profile has: the simultaneous band where its columns hold
    values, else the per-unit one."""
    return next((b for b, (lo, hi, _) in BANDS.items() if {lo, hi} <= set(rel.columns)
                 and pd.to_numeric(rel[lo], errors="coerce").notna().any()), "pointwise")


def significance_of(rel: pd.DataFrame, candidates: list[str], types: list[str], selected: list[str]) -> dict:
    """Per knowledge type and candidate unit: d = r_l - mean(r) and its 95% bootstrap band
    (from the profile): the simultaneous band over the units (d_slo, d_shi: max-|t|, so
    that "some layer above the mean" holds at 95% for all layers together) where the
    profile has it, else the older per-unit interval (d_lo, d_hi); a unit is significantly
    above the mean when the band's lower end is above 0. `band` says which. `available`
    is false for a profile without either (bootstrap 0, or written before the columns)."""
    band = band_of(rel)
    lo_col, hi_col, words = BANDS[band]
    has = {"d", lo_col, hi_col} <= set(rel.columns)
    out = {"available": False, "band": band, "test": f"{words} of r_l - mean(r) over block units, lower end > 0",
           "per_type": {}, "above_mean": {},
           "selected_significant": [], "selected_not_significant": list(selected), "any_significant": False}
    if not has:
        return out
    rel = rel.assign(**{c: pd.to_numeric(rel[c], errors="coerce") for c in ("d", lo_col, hi_col)})
    ok = False
    for t in types:
        sub = rel[(rel["knowledge_type"] == t) & rel["unit"].isin(candidates)].set_index("unit")
        if sub.empty or sub[lo_col].isna().all():
            continue
        ok = True
        out["per_type"][t] = {u: {"d": float(sub.at[u, "d"]), "lo": float(sub.at[u, lo_col]),
                                  "hi": float(sub.at[u, hi_col])} for u in candidates if u in sub.index}
        out["above_mean"][t] = [u for u in candidates if u in sub.index and sub.at[u, lo_col] > 0]
    if not ok:
        return out
    sig = {u for us in out["above_mean"].values() for u in us}
    out.update(available=True, any_significant=bool(sig),
               selected_significant=[u for u in selected if u in sig],
               selected_not_significant=[u for u in selected if u not in sig])
    return out


def significance_line(selection: dict) -> str:
    """One plain sentence on whether the selection stands out from noise."""
    sig = selection.get("significance") or {}
    if not sig.get("available"):
        return "significance: not computed (profile without bootstrap intervals of r_l - mean(r))"
    how = ("95% simultaneous bootstrap band over layers" if sig.get("band") == "simultaneous"
           else "95% paired bootstrap")
    if not sig["any_significant"]:
        return (f"significance: NO layer is significantly above the mean ({how}); "
                "the selection is within noise")
    parts = [f"{t}: {', '.join(us) or 'none'}" for t, us in sig["above_mean"].items()]
    return (f"significance: layers significantly above the mean ({how}): {'; '.join(parts)}; "
            f"selected and significant: {', '.join(sig['selected_significant']) or 'none'}; "
            f"selected but not significant: {', '.join(sig['selected_not_significant']) or 'none'}")


def run(params: dict, profile, out) -> None:
    params = with_defaults(params)
    path = Path(profile) / "relative.csv"
    relative = read_table(path, ["knowledge_type", "granularity", "unit", "layer", "rel"])
    try:
        relative["rel"] = pd.to_numeric(relative["rel"])
        relative["layer"] = pd.to_numeric(relative["layer"]).astype(int)
    except (ValueError, TypeError) as e:
        raise InputError(f"{path}: columns rel and layer must be numeric ({e})") from None
    require_finite(relative, ["rel"], path)
    selection = select(relative, params)
    with atomic_output(out, is_dir=False) as tmp:
        write_json(selection, tmp)
    log.info("select: %d of %d %s units selected (%s, %s of %s): %s", len(selection["units"]),
             sum(map(is_candidate, selection["relative"])), selection["granularity"], selection["rule"],
             selection["combine"], "/".join(selection["knowledge_types"]), ", ".join(selection["units"]))
    line = significance_line(selection)
    (log.warning if not selection["significance"].get("any_significant") else log.info)("select: %s", line)
