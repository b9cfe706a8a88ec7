"""The report's verdicts (plain pandas): TGL-FP against the layer null, the TGL-ALR
multipliers, and the paper's two claims with their tests.

- The layer null (`train.null_layers`, methods with `layers: subset`): per period, TGL-FP's
  percentile among the null subsets on fact-level uptake (hits@1 on new, on updated, their
  mean, efficacy on updated) and on forgetting (the unchanged hits@1 drop from the base
  model). Percentile = 100 x (nulls TGL-FP beats + half the ties) / n, seed means compared;
  higher is better for every row (on forgetting, beating a null = forgetting less). A null
  subset trained twice (the same blocks) counts once. Written to null.json.
- Claim (a) "localization differs by knowledge type": the profile's permutation test,
  `<profile>/tests.json` key `new_vs_updated` (p_value, permutations, statistic, observed);
  confirmed when p < 0.05, else inconclusive (also without the file or the key).
- Claim (b) "TGL improves uptake and forgetting": TGL-FP minus full (facts.versus_full, all
  periods, 95% cluster-bootstrap intervals over seeds and subjects) on fact uptake and on
  unchanged hits@1 (fact forgetting): refuted when TGL-FP is significantly worse on either;
  confirmed when significantly better on both and, when a null ran, its percentile is >= 95
  on uptake and on forgetting in every period; else inconclusive. Written to claims.json.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..io import InputError, read_json
from . import facts
from .table import ALL_PERIODS, REFERENCE

TGL_FP = "tgl_fp"
ALPHA = 0.05
NULL_LEVEL = 95.0
# (column of facts.add_derived, label); higher is better for each
NULL_METRICS = (("new_hits1", "hits@1 new"), ("updated_hits1", "hits@1 updated"),
                ("uptake_hits1", "hits@1 new+updated (mean)"), ("efficacy_share", "efficacy (updated)"),
                ("unchanged_hits1", "unchanged hits@1 (forgetting)"))
CRITERIA = ("uptake_hits1", "unchanged_hits1")  # claim (b): the null percentile on these


def percentile(value: float, null: list[float]) -> float:
    """100 x (null values below `value` + half those equal) / n; NaN without nulls or value."""
    null = [x for x in null if not math.isnan(x)]
    if not null or math.isnan(value):
        return math.nan
    ties = [math.isclose(x, value, rel_tol=0, abs_tol=1e-12) for x in null]
    below = sum(x < value and not tie for x, tie in zip(null, ties))
    return 100.0 * (below + 0.5 * sum(ties)) / len(null)


def train_methods(trains: list) -> tuple[dict[str, dict], dict[tuple[str, int], tuple]]:
    """({method: method_config}, {(method, period): trained units}) from train metrics.json."""
    configs, units = {}, {}
    for t in trains:
        m = read_json(Path(t) / "metrics.json")
        configs.setdefault(m["method"], m.get("method_config") or {})
        units.setdefault((m["method"], m["period"]), tuple(m.get("trained_units") or [m["method"]]))
    return configs, units


def tgl_fp_name(configs: dict[str, dict]) -> str | None:
    """The method named tgl_fp, else the first whose only part is `layers: tgl_fp`."""
    if configs.get(TGL_FP, {}).get("layers") == "tgl_fp":
        return TGL_FP
    return next((m for m, c in configs.items() if c == {"layers": "tgl_fp"}), None)


def seed_means(evals: list) -> pd.DataFrame:
    """Per method and period, the fact-level metrics averaged over seeds."""
    df = facts.read_facts(evals)
    if df.empty:
        return df
    df = facts.add_derived(df)
    df["uptake_hits1"] = df[["new_hits1", "updated_hits1"]].mean(axis=1)
    cols = [c for c, _ in NULL_METRICS] + ["fact_forgetting"]
    return df.groupby(["method", "period"], sort=False)[cols].mean().reset_index()


def null_comparison(evals: list, trains: list) -> dict:
    """null.json: TGL-FP's percentile among the layer null, per period and metric."""
    configs, units = train_methods(trains)
    tgl = tgl_fp_name(configs)
    nulls = [m for m, c in configs.items() if c.get("layers") == "subset"]
    out = {"tgl_fp": tgl, "methods": nulls, "level": NULL_LEVEL, "periods": {}}
    means = seed_means(evals) if nulls and tgl else pd.DataFrame()
    if means.empty:
        return {**out, "n": 0}
    for period in sorted(means["period"].unique()):
        at = means[means["period"] == period].set_index("method")
        if tgl not in at.index:
            continue
        seen, kept = set(), []
        for m in nulls:  # a subset trained twice counts once
            if m in at.index and units.get((m, period), (m,)) not in seen:
                seen.add(units.get((m, period), (m,)))
                kept.append(m)
        entry = {"n": len(kept), "null_methods": kept, "metrics": {}}
        for col, label in NULL_METRICS:
            null = [float(at.at[m, col]) for m in kept]
            value = float(at.at[tgl, col])
            entry["metrics"][col] = {"label": label, "tgl_fp": value, "null_median": _stat(np.median, null),
                                     "null_min": _stat(np.min, null), "null_max": _stat(np.max, null),
                                     "percentile": percentile(value, null)}
        entry["forgetting"] = {"tgl_fp": float(at.at[tgl, "fact_forgetting"]),
                               "null_median": _stat(np.median, [float(at.at[m, "fact_forgetting"]) for m in kept])}
        out["periods"][str(period)] = entry
    return {**out, "n": min((e["n"] for e in out["periods"].values()), default=0)}


def _stat(f, xs) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return float(f(xs)) if xs else math.nan


def null_passed(null: dict) -> bool | None:
    """Whether TGL-FP's percentile is >= 95 on uptake and forgetting in every period; None
    when no null ran."""
    if not null.get("n"):
        return None
    return all(e["metrics"][c]["percentile"] >= NULL_LEVEL for e in null["periods"].values() for c in CRITERIA)


def claim_a(profile) -> dict:
    """Localization differs by knowledge type: the profile's permutation test."""
    row = {"claim": "(a) localization differs by knowledge type",
           "test": "permutation test new vs updated (profile tests.json: new_vs_updated)"}
    path = Path(profile) / "tests.json" if profile is not None else None
    test = read_json(path).get("new_vs_updated") if path is not None and path.exists() else None
    if not isinstance(test, dict):
        return {**row, "numbers": "", "verdict": "inconclusive", "reason": "no permutation test"}
    missing = [k for k in ("p_value", "permutations", "statistic", "observed") if k not in test]
    if missing:
        raise InputError(f"{path}: key new_vs_updated lacks {missing}")
    p = float(test["p_value"])
    numbers = f"{test['statistic']} = {_num(test['observed'])}, p = {p:.3g} ({test['permutations']} permutations)"
    confirmed = p < ALPHA
    return {**row, "numbers": numbers, "p_value": p, "verdict": "confirmed" if confirmed else "inconclusive",
            "reason": f"p {'<' if confirmed else '>='} {ALPHA}"}


def _num(x) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) else str(x)


def verdict_b(uptake: tuple, forgetting: tuple, null_ok: bool | None) -> tuple[str, str]:
    """(verdict, reason) from TGL-FP minus full: uptake (est, lo, hi), positive = learned
    more; forgetting (est, lo, hi), positive = forgot more; null_ok: the null criterion."""
    (_, u_lo, u_hi), (_, f_lo, f_hi) = uptake, forgetting
    if any(math.isnan(x) for x in (u_lo, u_hi, f_lo, f_hi)):
        return "inconclusive", "no interval (one seed and subject, or no fact-level scores)"
    if u_hi < 0 or f_lo > 0:
        return "refuted", "TGL-FP significantly worse than full on " + " and ".join(
            n for n, bad in (("uptake", u_hi < 0), ("forgetting", f_lo > 0)) if bad)
    if not (u_lo > 0 and f_hi < 0):
        return "inconclusive", "TGL-FP not significantly better than full on both uptake and forgetting"
    if null_ok is False:
        return "inconclusive", f"better than full, but not above the layer null's {NULL_LEVEL:g}th percentile"
    return "confirmed", "significantly better than full on both" + (
        f" and >= {NULL_LEVEL:g}th percentile of the layer null" if null_ok else " (no layer null ran)")


def claim_b(fact_vs: pd.DataFrame, null: dict, tgl: str | None) -> dict:
    row = {"claim": "(b) TGL improves uptake and forgetting",
           "test": "TGL-FP - full, fact uptake and unchanged hits@1 drop (points, 95% bootstrap over seeds and "
                   "subjects, all periods)" + ("; layer null percentile >= 95" if null.get("n") else "")}
    at = fact_vs[(fact_vs["method"] == tgl) & (fact_vs["period"] == ALL_PERIODS)] if tgl and not fact_vs.empty \
        else pd.DataFrame()
    if at.empty:
        return {**row, "numbers": "", "verdict": "inconclusive", "reason": f"no TGL-FP and {REFERENCE} fact-level "
                                                                              "scores to compare"}
    r = at.iloc[0]
    u, f = (tuple(float(r[f"{c}_vs_full{x}"]) for x in ("", "_lo", "_hi")) for c in ("fact_uptake",
                                                                                       "fact_forgetting"))
    verdict, reason = verdict_b(u, f, null_passed(null))
    numbers = f"uptake {_ci(u)}; forgetting {_ci(f)}"
    if null.get("n"):
        pcts = [f"P{p}: {e['metrics']['uptake_hits1']['percentile']:.0f}/{e['metrics']['unchanged_hits1']['percentile']:.0f}"
                for p, e in null["periods"].items()]
        numbers += f"; null percentile uptake/forgetting (n={null['n']}) " + ", ".join(pcts)
    return {**row, "numbers": numbers, "uptake": list(u), "forgetting": list(f), "verdict": verdict,
            "reason": reason}


def _ci(t) -> str:
    return f"{t[0]:+.1f} [{t[1]:+.1f}, {t[2]:+.1f}]"


# ----------------------------------------------------------------------------- markdown

def null_section(null: dict) -> list[str]:
    lines = ["## TGL-FP against the layer null", ""]
    if not null.get("n"):
        return lines + ["No layer null ran (enable it with `train: {null_layers: {count: 20, seed: 0}}`)" + (
            "" if null.get("tgl_fp") else "; no TGL-FP method either") + ".", ""]
    lines += [f"TGL-FP (`{null['tgl_fp']}`) among {null['n']} random subsets of as many blocks (layers: subset, "
              "distinct subsets only). Percentile: share of the null subsets TGL-FP beats (ties half; seed means; "
              "forgetting: beating = forgetting less). Values in points.", "",
              "| period | n | metric | TGL-FP | null median [min, max] | percentile |", "|---|---|---|---|---|---|"]
    for p, e in null["periods"].items():
        for col, m in e["metrics"].items():
            lines.append(f"| {p} | {e['n']} | {m['label']} | {100 * m['tgl_fp']:.1f} | {100 * m['null_median']:.1f} "
                         f"[{100 * m['null_min']:.1f}, {100 * m['null_max']:.1f}] | {m['percentile']:.0f} |")
        f = e["forgetting"]
        lines.append(f"| {p} | {e['n']} | unchanged hits@1 drop | {100 * f['tgl_fp']:.1f} | "
                     f"{100 * f['null_median']:.1f} | (as unchanged hits@1) |")
    return lines + [""]


def alr_section(selection) -> list[str]:
    lines = ["## TGL-ALR learning-rate multipliers", ""]
    if selection is None:
        return lines + ["No selection file given (--selection).", ""]
    sel = read_json(selection)
    mults = sel.get("lr_multipliers")
    if not isinstance(mults, dict):
        raise InputError(f"{selection}: missing key 'lr_multipliers'")
    chosen = set(sel.get("units") or [])
    lines += [f"From {Path(selection).name} (r averaged over {'/'.join(sel.get('knowledge_types') or [])}, "
              f"normalised by the {sel.get('alr_normalise', 'mean')} over blocks; non-block units keep 1.0).", "",
              "| unit | lr multiplier | TGL-FP |", "|---|---|---|"]
    lines += [f"| {u} | {float(x):.3g} | {'trained' if u in chosen else 'frozen'} |" for u, x in mults.items()]
    return lines + [""]


def cell(text) -> str:
    """A markdown table cell: a "|" inside it (as in "max_u |r_new - r_updated|") would split it."""
    return str(text).replace("|", "\\|")


def claims_section(rows: list[dict]) -> list[str]:
    lines = ["## Claims", "", "| claim | test | numbers (95% intervals) | verdict |", "|---|---|---|---|"]
    lines += [f"| {cell(r['claim'])} | {cell(r['test'])} | {cell(r['numbers'] or '-')} | "
              f"**{r['verdict']}** ({cell(r['reason'])}) |" for r in rows]
    return lines + [""]


def build(evals: list, trains: list, profile, selection, fact_vs: pd.DataFrame) -> tuple[str, dict, list[dict]]:
    """(the three sections as Markdown, null.json, claims.json rows)."""
    null = null_comparison(evals, trains)
    tgl = null["tgl_fp"] or tgl_fp_name(train_methods(trains)[0])
    rows = [claim_a(profile), claim_b(fact_vs if fact_vs is not None else pd.DataFrame(), null, tgl)]
    text = "\n".join(null_section(null) + alr_section(selection) + claims_section(rows))
    return text, strict(null), strict(rows)


def strict(obj):
    """NaN (nothing measured) as null, for strict JSON."""
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return None if isinstance(obj, float) and math.isnan(obj) else obj

