"""table.md: the definitions of every number, then the table per period and averaged."""

from __future__ import annotations

import math

import pandas as pd

from .table import ALL_PERIODS, SETS, gain_sets, is_ppl

SET_TEXT = {
    "unchanged": "`unchanged` (facts true before and after the update)",
    "updated": "`updated` (changed facts of known entities)",
    "new": "`new` (facts of entities first seen in this period)",
    "outdated": "`outdated` (the replaced old facts)",
    "changed": "`changed` (new and updated facts together, where the corpus does not tell them apart)",
}


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


def _uptake_text(averaged) -> str:
    if list(averaged) == ["new", "updated"]:
        return "mean of uptake new and uptake updated (each kind of knowledge weighs the same)."
    if not averaged:
        return "empty (no `new`, `updated` or `changed` probes were evaluated)."
    if len(averaged) == 1:
        return f"uptake {averaged[0]} (the only such set evaluated)."
    return "mean of " + " and ".join(f"uptake {s}" for s in averaged) + " (each set weighs the same)."


def definitions(primary: str, sets=SETS, averaged=("new", "updated")) -> list[str]:
    """The header text of table.md: what every number means."""
    lower = is_ppl(primary)
    up = f"ln(base {primary}) − ln(method {primary}), in nats per token" if lower else f"method − base {primary}"
    forget = f"ln(method {primary}) − ln(base {primary})" if lower else f"base − method {primary}"
    described = ", ".join(SET_TEXT.get(s, f"`{s}`") for s in sets)
    extra_gains = [s for s in gain_sets(sets) if s not in ("new", "updated")]
    lines = [
        f"Primary metric: `{primary}` ({'lower' if lower else 'higher'} is better). Every cell is the mean ± sample "
        "standard deviation (ddof 1) over training seeds; `n` is the number of seeds (no ± with one seed). "
        f"Probe sets: {described}.",
        "",
        f"- **uptake new / updated** = {up} on that period's `new` / `updated` probes, where *base* is the base "
        "model (before any continual training) evaluated on the same period's probes; positive = learned.",
        *(f"- **uptake {s}** = the same on the `{s}` probes." for s in extra_gains),
        f"- **uptake** = {_uptake_text(list(averaged))}",
        f"- **forgetting** = {forget} on the `unchanged` probes; positive = forgot.",
    ]
    if primary != "top1":
        lines.append("- **top1 gain new / updated** = method − base top1 accuracy on `new` / `updated`; "
                     "**top1 forgetting** = base − method top1 on `unchanged`.")
        lines += [f"- **top1 gain {s}** = the same on `{s}`." for s in extra_gains]
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


def markdown(table: pd.DataFrame, primary: str, title: str, base_metrics: dict, sets=SETS,
             averaged=("new", "updated"), lead: list[str] | None = None) -> str:
    """The whole table.md; `sets` are the table's probe sets, `averaged` those in `uptake`;
    `lead` (the fact-level section) comes first, before the object-perplexity tables."""
    gains = gain_sets(sets)
    main_cols = [(f"{s}_{primary}", f"{s} {primary}") for s in sets] + [
        (f"uptake_{s}", f"uptake {s}") for s in gains] + [
        ("uptake", "uptake"), ("forgetting", "forgetting"), ("heldout_ppl", "held-out ppl")]
    top1_cols = [(f"{s}_top1", f"{s} top1") for s in sets] + [
        (f"top1_gain_{s}", f"top1 gain {s}") for s in gains] + [("top1_forgetting", "top1 forgetting")]
    cost_cols = [("trainable_params", "trainable params"), ("wall_time_s", "wall time (s)")]
    context = base_model_lines(base_metrics)
    lines = [f"# {title}", "", *(lead or [])]
    if lead:
        lines += [f"## Object perplexity ({primary}): not a knowledge metric", "",
                  "The numbers below rise when a model learns that the period's new names exist, whoever they "
                  "belong to; the fact-level section above asks whether the facts were learned.", ""]
    lines += [*definitions(primary, sets, averaged), "", *context, *([""] if context else [])]
    per_period = table[table["period"] != ALL_PERIODS]
    summary = table[table["period"] == ALL_PERIODS]
    for heading, part in (("Per period", per_period), ("Per method, averaged over periods", summary)):
        lines += [f"## {heading}: {primary}", ""] + md_table(part, main_cols) + [""]
        if primary != "top1":
            lines += [f"## {heading}: top1", ""] + md_table(part, top1_cols) + [""]
        lines += [f"## {heading}: training cost", ""] + md_table(part, cost_cols) + [""]
    return "\n".join(lines)


def augment_section(metrics: list[dict]) -> str:
    """Token-dropout methods (an `augment` part): drop rate per copy and whether kept tokens
    are enriched for entity/object tokens, per method and period (mean over seeds);
    each train folder's augment.md shows a document with its dropped tokens."""
    rows = [(m["method"], m["period"], m["augment"]) for m in metrics if isinstance(m.get("augment"), dict)]
    if not rows:
        return ""
    df = pd.DataFrame([{"method": k, "period": p, "kind": a["kind"],
                        "drop": sum(a["drop_rate_per_copy"]) / max(1, len(a["drop_rate_per_copy"])),
                        "copies": a["copies"], "marked": a["keep_rate_marked"], "other": a["keep_rate_other"],
                        "enrichment": a["marked_enrichment"]} for k, p, a in rows])
    df = df.groupby(["method", "period", "kind"], sort=False).mean(numeric_only=True).reset_index()
    lines = ["", "", "## Token dropout", "",
             "Copies per document, mean drop rate of droppable tokens per copy, keep rate of entity/object "
             "tokens vs other tokens, and enrichment (entity/object keep rate / overall keep rate; random "
             "dropout gives ~1). Mean over seeds; `train/<method>/seed<s>/P<p>/augment.md` shows a document.", "",
             "| method | period | kind | copies | drop rate | keep entity/object | keep other | enrichment |",
             "|---|---|---|---|---|---|---|---|"]
    for _, r in df.iterrows():
        lines.append(f"| {r['method']} | {r['period']} | {r['kind']} | {r['copies']:.0f} | {fmt(r['drop'])} | "
                     f"{fmt(r['marked'])} | {fmt(r['other'])} | {fmt(r['enrichment'])} |")
    return "\n".join(lines)


def subnet_section(removal: pd.DataFrame, correlations: pd.DataFrame) -> list[str]:
    """Knowledge-critical subnetworks: removal metrics and localization vs TGL."""
    cols = [("target_top1", "target top1"), ("target_object_ppl", "target object ppl"),
            ("control_top1", "control top1"), ("control_object_ppl", "control object ppl"),
            ("heldout_ppl", "held-out ppl")]
    lines = ["## Knowledge-critical subnetworks", "",
             "A mask over the base model's attention and MLP weights (`gradloc subnet`, Bayazit et al. 2024) "
             "trained so that the model *without* those weights forgets the target facts and keeps the control "
             "facts and base text. Rows: nothing removed (`none`), the subnetwork removed (`subnet`), a random "
             "mask of the same per-tensor density removed (`random`); mean ± std over mask seeds.", "",
             "| knowledge set | mask | n | " + " | ".join(label for _, label in cols) + " |",
             "|" + "---|" * (3 + len(cols))]
    for _, row in removal.iterrows():
        cells = [f"{fmt(row[f'{c}_mean'])}" + ("" if math.isnan(row[f"{c}_std"]) else f" ± {fmt(row[f'{c}_std'])}")
                 for c, _ in cols]
        lines.append(f"| {row['knowledge_set']} | {row['mask']} | {row['n_seeds']} | " + " | ".join(cells) + " |")
    lines += ["", "Localization: Spearman's ρ between the mask density and TGL's relative gradient norm of the "
              "matching knowledge type (outdated facts ↔ `updated`, unchanged ↔ `unchanged`) over units, with a "
              "95% bootstrap interval over units; `densest` / `highest norm`: the unit each method points at.", "",
              "| knowledge set | TGL type | granularity | units | ρ | 95% interval | densest | highest norm |",
              "|---|---|---|---|---|---|---|---|"]
    for _, r in correlations.iterrows():
        lines.append(f"| {r['knowledge_set']} | {r['knowledge_type']} | {r['granularity']} | {r['n_units']} | "
                     f"{fmt(r['spearman'])} | [{fmt(r['lo'])}, {fmt(r['hi'])}] | {r['top_density']} | {r['top_rel']} |")
    return lines + [""]


def weighting_section(metrics: list[dict], meta: dict | None) -> str:
    """Token-weighting methods: mean weight on entity/object tokens vs other tokens per
    knowledge type of the diff document (new / updated / unchanged: the probe sets) and
    their ratio, mean over seeds; the meta-training's stop and validation result."""
    rows = [{"method": m["method"], "period": m["period"], "kind": tw["kind"], "type": t, "fact": v["fact"],
             "other": v["other"], "ratio": v["ratio"]}
            for m in metrics if isinstance(tw := m.get("token_weighting"), dict)
            for t, v in tw.items() if isinstance(v, dict)]
    if not rows and not meta:
        return ""
    lines = ["", "", "## Token weighting", ""]
    if meta:
        ow = meta.get("object_vs_other_weight") or {}
        lines += [f"CaMeLS meta-training: best validation loss {fmt(meta['best_val_loss'])} at outer step "
                  f"{meta['best_step']} ({meta['stop']}; {meta['train_docs']} training / {meta['val_docs']} "
                  f"validation T0 documents, {fmt(meta['time_s'])} s). On the validation documents the weight on "
                  f"probe-object tokens is {fmt(ow.get('fact'))} vs {fmt(ow.get('other'))} on other tokens "
                  f"(ratio {fmt(ow.get('ratio'))}). Curve: `weighting.png` (left), `weighting_model/curve.csv`.", ""]
    if rows:
        df = pd.DataFrame(rows).groupby(["method", "period", "kind", "type"], sort=False).mean(
            numeric_only=True).reset_index()
        lines += ["Mean weight on entity/object tokens vs other tokens of the diff documents, per document "
                  "type (`all`: every document), mean over seeds; `weighting.png` (right) draws one document.", "",
                  "| method | period | kind | documents | entity/object | other | ratio |", "|---|---|---|---|---|---|---|"]
        for _, r in df.iterrows():
            lines.append(f"| {r['method']} | {r['period']} | {r['kind']} | {r['type']} | {fmt(r['fact'])} | "
                         f"{fmt(r['other'])} | {fmt(r['ratio'])} |")
    return "\n".join(lines)


FACT_COLUMNS = [("new_hits1", "new hits@1"), ("updated_hits1", "updated hits@1"),
                ("efficacy_share", "efficacy"), ("unchanged_hits1", "unchanged hits@1"),
                ("unchanged_touched_hits1", "unch. touched"), ("unchanged_untouched_hits1", "unch. untouched"),
                ("fact_uptake", "fact uptake"), ("fact_forgetting", "fact forgetting"), ("fuar", "FUAR"),
                ("new_specificity", "specificity new"), ("updated_specificity", "specificity updated")]
POINTS = {"new_hits1", "updated_hits1", "efficacy_share", "unchanged_hits1", "unchanged_touched_hits1",
          "unchanged_untouched_hits1", "fact_uptake", "fact_forgetting"}


def _fact_cell(row, col: str) -> str:
    mean, std = row.get(f"fact_{col}_mean", math.nan), row.get(f"fact_{col}_std", math.nan)
    scale = 100 if col in POINTS else 1
    if mean is None or math.isnan(mean):
        return "–"
    text = f"{scale * mean:.1f}" if scale == 100 else f"{mean:.2f}"
    if not math.isnan(std):
        text += f" ± {scale * std:.1f}" if scale == 100 else f" ± {std:.2f}"
    return text


def facts_section(ft: pd.DataFrame, vs: pd.DataFrame, labels: dict[str, str], candidates) -> list[str]:
    """table.md's first section: fact-level metrics per method and period, chance and the
    majority-object baseline beside them, then each method against `full` with intervals."""
    if ft.empty:
        return []
    base = ft[ft["method"] == "base"]
    lines = ["## Fact-level results", "",
             f"Was the fact learned? Each probe's gold object is ranked among {candidates} same-relation "
             "candidates by mean log-prob per token under the probe's prefix (`gradloc.factlevel`; for `updated` "
             "the replaced object is always a candidate, for `new` other new entities' objects are). "
             "**hits@1** in % (mean ± std over seeds); **efficacy**: % of `updated` probes whose new object beats "
             "the replaced one; **unch. touched / untouched**: unchanged facts of subjects that the period "
             "updated or that are new, and of the others; **fact uptake** = method − base hits@1 on new and "
             "updated (their mean, points); **fact forgetting** = base − method hits@1 on unchanged (points); "
             "**FUAR** = unchanged facts forgotten / new and updated facts gained (net counts; lower is better, "
             "empty when nothing was gained); **specificity**: nats per token of the gold object under its own "
             "subject's prefix minus under other subjects' (0: the object is likely whoever the subject is). "
             "Probes whose object is the same for every subject of their set and relation (a constant guess "
             "answers them) are left out; object perplexity, the older 'uptake in nats', is further down and "
             "rises when a model merely learns that new names exist.", ""]
    head = ["method", "period"] + [label for _, label in FACT_COLUMNS]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, b in base.iterrows():
        chance = [f"{100 * b[f'fact_{s}_chance_hits1_mean']:.1f}" if not math.isnan(b[f"fact_{s}_chance_hits1_mean"])
                  else "–" for s in ("new", "updated")]
        majority = [f"{100 * b[f'fact_{s}_majority_hits1_mean']:.1f}"
                    if not math.isnan(b[f"fact_{s}_majority_hits1_mean"]) else "–"
                    for s in ("new", "updated", "unchanged")]
        unch = b["fact_unchanged_chance_hits1_mean"]
        lines.append(f"| *chance* | {b['period']} | {chance[0]} | {chance[1]} | 50.0 | "
                     f"{'–' if math.isnan(unch) else f'{100 * unch:.1f}'} | | | 0 | 0 | | 0 | 0 |")
        lines.append(f"| *majority object* | {b['period']} | {majority[0]} | {majority[1]} | | {majority[2]} "
                     "| | | | | | | |")
    for _, row in ft.iterrows():
        name = row["method"] + (f" ({labels[row['method']]})" if row["method"] in labels else "")
        lines.append(f"| {name} | {row['period']} | " + " | ".join(_fact_cell(row, c) for c, _ in FACT_COLUMNS)
                     + " |")
    lines.append("")
    if not vs.empty:
        lines += ["## Each method against `full`, fact-level", "",
                  "Method minus `full` in points, paired by seed, period and probe, over both periods; mean with "
                  "a 95% bootstrap interval resampling seeds and then entities (all probes of a subject move "
                  "together). Fact uptake: hits@1 on new and updated (positive: learned more than full); fact "
                  "forgetting: lost hits@1 on unchanged (positive: forgot more); efficacy: on updated. An "
                  "interval containing 0 is no difference.", "",
                  "| method | fact uptake (pts) | fact forgetting (pts) | efficacy (pts) |", "|---|---|---|---|"]
        for r in vs[vs["period"] == ALL_PERIODS].to_dict("records"):
            cells = [f"{r[f'{c}_vs_full']:+.1f} [{r[f'{c}_vs_full_lo']:+.1f}, {r[f'{c}_vs_full_hi']:+.1f}]"
                     if not math.isnan(r[f"{c}_vs_full"]) else "–"
                     for c in ("fact_uptake", "fact_forgetting", "efficacy")]
            name = r["method"] + (f" ({labels[r['method']]})" if r["method"] in labels else "")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines
