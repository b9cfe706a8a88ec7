"""Stage 7b: the report. Gathers every evaluation, training log and the gradient profile
into one table (CSV + Markdown) and three figures.

- `table`: inputs as DataFrames (method, seed and period from each summary.json and
  train metrics.json) and every table computation, plain pandas; definitions there.
- `markdown`: table.md.
- `figures`: heatmap, uptake vs forgetting, training curves, and (with `subnet`) mask density
  vs gradient norm per layer (the only matplotlib).
- `claims`: TGL-FP against the layer null (null.json), the TGL-ALR multipliers (from
  `selection`) and the claims table (claims.json).
This module reads the inputs, calls those, and writes the outputs atomically.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from .. import schema
from ..io import InputError, atomic_output, read_json, read_table, write_json
from . import claims, facts, markdown, table  # figures (matplotlib) is imported in run() only

log = logging.getLogger(__name__)

FLOAT_FORMAT = "%.10g"  # enough digits for any ppl, none of the 0.30000000000000004 noise


def run(params: dict, evals: list, trains: list, profile, base_model, out, subnet=None, weighting=None,
        selection=None) -> None:
    from . import figures

    params = schema.fill("report", params, where="report params")
    primary = params["primary_metric"]
    dpi = params["dpi"]

    evals_df, order = table.load_evals(evals)
    logs, costs = table.read_trains(trains)
    base_metrics_path = Path(base_model) / "metrics.json"
    base_metrics = read_json(base_metrics_path)
    if not isinstance(base_metrics, dict):
        raise InputError(f"{base_metrics_path}: expected a JSON object")
    sets, averaged = table.probe_sets(evals_df), table.uptake_sets(evals_df)
    result, vs_full, fact_table, fact_vs = results_table(evals, evals_df, order, primary, costs, averaged)
    labels = method_labels(trains)  # the negative control, named so in table.md

    oracle = oracle_labels(subnet, trains)  # subnet.facts: probes: the subnet methods saw the test facts
    if oracle:
        result["method"], logs["method"] = result["method"].replace(oracle), logs["method"].replace(oracle)
        order = [oracle.get(m, m) for m in order]
        vs_full, fact_table, fact_vs = (df.assign(method=df["method"].replace(oracle)) if not df.empty else df
                                        for df in (vs_full, fact_table, fact_vs))

    sub = subnet_comparison(subnet, profile, params["localization_bootstrap"]) if subnet is not None else None

    with atomic_output(out) as tmp:
        # Plain "\n" and a fixed float format: the same inputs give the same bytes.
        result.to_csv(tmp / "table.csv", index=False, float_format=FLOAT_FORMAT, lineterminator="\n")
        lead = markdown.facts_section(fact_table, fact_vs, labels, candidates(evals))
        text = markdown.markdown(result, primary, params["title"], base_metrics, sets, averaged, lead)
        text += markdown.augment_section([read_json(Path(t) / "metrics.json") for t in trains])
        text += weighting_report(trains, weighting, tmp / "weighting.png", dpi)
        if sub is not None:
            text += "\n" + "\n".join(markdown.subnet_section(sub[0], sub[2]))
            sub[2].to_csv(tmp / "localization.csv", index=False, float_format=FLOAT_FORMAT, lineterminator="\n")
            figures.localization(sub[1], sub[2], tmp / "localization.png", dpi)
        extra = table.significance_lines(profile) + table.versus_full_lines(vs_full)
        text += ("\n\n" + "\n".join(extra)) if extra else ""
        figures.significance(pd.read_csv(Path(profile) / "relative.csv"), tmp / "significance.png", dpi) \
            if (Path(profile) / "relative.csv").exists() else None
        verdicts, null, rows = claims.build(evals, trains, profile, selection, fact_vs)
        text += "\n\n" + verdicts
        write_json(null, tmp / "null.json")
        write_json(rows, tmp / "claims.json")
        (tmp / "table.md").write_text(text + "\n")
        figures.render_heatmap(profile, tmp / "heatmap.png", dpi)
        figures.tradeoff(result, order, primary, tmp / "tradeoff.png", dpi, averaged)
        if not fact_table.empty:
            figures.fact_tradeoff(fact_table, order, tmp / "fact_tradeoff.png", dpi)
        figures.curves(logs, order, tmp / "curves.png", dpi)

    n_seeds = evals_df.loc[evals_df["method"] != table.BASE, "seed"].nunique()
    log.info("report: %d methods (incl. base), %d periods, %d seeds, %d eval folders, %d train logs -> %s "
             "(table %d rows, 3 figures)", len(order), evals_df["period"].nunique(), n_seeds, len(evals_df),
             logs.groupby(["method", "seed", "period"]).ngroups if not logs.empty else 0, out, len(result))


def results_table(evals, evals_df, order, primary, costs, averaged):
    """(table.csv's rows: the per-set metrics, the paired comparisons against full and the
    fact-level metrics; the comparisons; the fact-level table; its comparisons)."""
    result = table.build_table(evals_df, order, primary, costs)
    vs_full = table.versus_full(table.probe_scores(evals), order, averaged=averaged)
    if not vs_full.empty:  # method minus full with 95% intervals (issue 11): extra columns
        result = result.merge(vs_full, on=["method", "period"], how="left")
    fact_table = facts.build(evals, order)
    fact_vs = facts.versus_full(facts.probe_rows(evals), order)
    if not fact_table.empty:  # fact-level metrics (issue 20): the table's `fact_*` columns
        result = result.merge(fact_table, on=["method", "period"], how="left")
    if not fact_vs.empty:
        result = result.merge(fact_vs.rename(columns=lambda c: c if c in ("method", "period") else f"fact_{c}"),
                              on=["method", "period"], how="left")
    return result, vs_full, fact_table, fact_vs


def subnet_comparison(subnet, profile, bootstrap: int):
    """Knowledge-critical subnetworks vs the gradient profile: (removal table, paired
    densities and relative norms, their correlations)."""
    removal = table.removal_table(read_table(Path(subnet) / "removal.csv"))
    relative = read_table(Path(profile) / "relative.csv", ["knowledge_type", "granularity", "unit", "rel"])
    paired, correlations = table.localization(read_table(Path(subnet) / "density.csv"), relative, bootstrap)
    return removal, paired, correlations


def method_labels(trains: list) -> dict[str, str]:
    """{method: label} for the tables: the negative control (a `permute_objects` part)."""
    labels = {}
    for t in trains:
        m = read_json(Path(t) / "metrics.json")
        if "permute_objects" in (m.get("method_config") or {}):
            labels[m["method"]] = "negative control"
    return labels


def candidates(evals: list) -> str:
    """The evaluations' number of candidates (`evaluate.candidates`), as text."""
    ks = sorted({(read_json(Path(e) / "summary.json").get("facts") or {}).get("candidates") for e in evals} - {None})
    return " / ".join(map(str, ks)) or "K"


def oracle_labels(subnet, trains: list) -> dict[str, str]:
    """{method: "method (oracle)"} for the methods that train by the subnetwork (`layers`
    or `mask: subnet`) when its masks were trained on the evaluation probes
    (`subnet/metrics.json` says `oracle: true`); else {}."""
    path = Path(subnet) / "metrics.json" if subnet is not None else None
    if path is None or not path.exists() or not read_json(path).get("oracle"):
        return {}
    out = {}
    for t in trains:
        m = read_json(Path(t) / "metrics.json")
        c = m.get("method_config") or {}
        if "subnet" in (c.get("layers"), c.get("mask")):
            out[m["method"]] = f"{m['method']} (oracle)"
    return out


def weighting_report(trains: list, weighting, path: Path, dpi: int) -> str:
    """The token-weighting section and `weighting.png` (curve + one document's weights;
    CaMeLS's document when there is one) when a method weights tokens or `weighting` is given."""
    from . import figures

    meta = read_json(Path(weighting) / "metrics.json") if weighting else None
    curve = pd.read_csv(Path(weighting) / "curve.csv") if weighting else None
    examples = [(read_json(Path(t) / "metrics.json")["method"], read_json(Path(t) / "weights.json"))
                for t in trains if (Path(t) / "weights.json").exists()]
    text = markdown.weighting_section([read_json(Path(t) / "metrics.json") for t in trains], meta)
    if examples or meta:
        name, ex = next(((m, e) for m, e in examples if e.get("kind") == "camels"), examples[0] if examples else
                        (None, None))
        figures.weighting(curve, (ex or {}).get("example"), name or "", path, dpi)
    return text
