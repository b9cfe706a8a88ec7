"""Fact-level metrics: was the fact learned, not merely the new names made likely.

Object perplexity rises when a model learns that the period's new names exist, whoever
they belong to; these metrics ask about the fact (subject, relation, object) instead.

- *Candidate ranking*: each probe's gold object is ranked against `K - 1` other objects of
  the same relation under the probe's prefix. Candidates are drawn once, seeded, from the
  objects of that relation in every probe of every period (the same for every checkpoint,
  see `candidates`): for `updated` the replaced (outdated) object is always among them,
  for `outdated` the current one; for `new` and `updated` up to half are objects of the
  same set and period (other new entities' objects), so knowing which names are new does
  not help. A candidate's score is its mean log-prob per token (`norm`) or its summed
  log-prob (`sum`); hits@1 and the reciprocal rank of the gold object (ties share the
  rank: hits@1 = 1/(1 + ties)). Chance: 1/n and H_n/n for n candidates.
- *Efficacy*: the share of `updated` probes whose new object beats the replaced one under
  the same prefix (mean log-prob per token), the mean margin in nats per token; the same
  under the second probe wording (`paraphrase`) where the world has one.
- *Subject specificity* (sets `new`, `updated`, `changed`, `outdated`): the gold object's
  mean log-prob per token under its own prefix minus its mean under up to `K - 1` other
  subjects' prefixes of the same relation, set and period (0: the object is likely
  whatever the subject).
- *Shortcuts*: probes whose object is the same for every subject of their period, set and
  relation (`constant_objects`) are left out of the fact-level numbers and counted.
- The majority-object baseline: per relation, a constant guess of the most common gold
  object of the set's other probes (leave-one-out, so it never sees the answer).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pandas as pd

CURRENT_SETS = ("unchanged", "updated", "new", "changed")  # sets that hold in the period
SPECIFICITY_SETS = ("new", "updated", "changed", "outdated")  # the sets the update is about


def constant_objects(probes: pd.DataFrame) -> pd.Series:
    """True for probes whose (period, set, relation) group has at least two probes, all with
    one object: a constant guess answers them."""
    key = [probes["period"], probes["set"], probes["relation"]]
    g = probes.groupby(key, sort=False)["object"]
    return ((g.transform("size") >= 2) & (g.transform("nunique") == 1)).astype(bool)


def _order(seed: int, probe_id: str, values) -> list[str]:
    """`values` in a fixed pseudo-random order: a stable hash of (seed, probe, value)."""
    return sorted(values, key=lambda v: hashlib.sha1(f"{seed}\x1f{probe_id}\x1f{v}".encode()).hexdigest())


def candidates(all_probes: pd.DataFrame, period: int, k: int, seed: int = 0) -> pd.DataFrame:
    """One row per (probe of `period`, candidate object): probe_id, candidate, gold (bool),
    kind (`gold`, `pair`: the replaced / current object of an updated / outdated probe,
    `same_set`: an object of the same set and period, `pool`: another object of the
    relation). Distractors are never a true object of the probe's (subject, relation)."""
    probes = all_probes[all_probes["period"] == period]
    pool = {r: sorted(set(g)) for r, g in all_probes.groupby("relation")["object"]}
    key = ["subject_id", "relation"]
    current = probes[probes["set"].isin(CURRENT_SETS)]
    truths = current.groupby(key)["object"].agg(set).to_dict()
    old = probes[probes["set"] == "outdated"].groupby(key)["object"].agg(set).to_dict()
    same_set = probes.groupby(["set", "relation"])["object"].agg(lambda x: sorted(set(x))).to_dict()
    rows = []
    for pid, name, sid, rel, obj in probes[["probe_id", "set", "subject_id", "relation", "object"]].itertuples(
            index=False):
        true = truths.get((sid, rel), set()) | {obj}
        if name == "outdated":
            true = (old.get((sid, rel), set()) | {obj})  # the current object is a distractor here
            pair = sorted(truths.get((sid, rel), set()) - {obj})
        else:
            pair = sorted(old.get((sid, rel), set()) - true) if name == "updated" else []
        picked = [("gold", obj)] + [("pair", o) for o in pair][:k - 1]
        chosen = {obj, *pair}
        if name in ("new", "updated", "changed"):
            mates = [o for o in _order(seed, pid, same_set.get((name, rel), [])) if o not in true | chosen]
            n_mates = max(0, (k - 1) // 2 - len(pair))
            picked += [("same_set", o) for o in mates[:n_mates]]
            chosen |= set(mates[:n_mates])
        rest = [o for o in _order(seed, pid, pool.get(rel, [])) if o not in true | chosen]
        picked += [("pool", o) for o in rest[:max(0, k - len(picked))]]
        rows.extend((pid, o, kind == "gold", kind) for kind, o in picked)
    return pd.DataFrame(rows, columns=["probe_id", "candidate", "gold", "kind"])


def other_prefixes(probes: pd.DataFrame, k: int, seed: int = 0) -> pd.DataFrame:
    """For subject specificity: per probe, up to `k - 1` prefixes of other subjects' probes
    of the same relation and set in the period (probe_id, prefix)."""
    by = probes.groupby(["set", "relation"])
    rows = []
    for (name, rel), g in by:
        items = list(zip(g["subject_id"], g["prefix"]))
        for pid, sid in zip(g["probe_id"], g["subject_id"]):
            others = sorted({p for s, p in items if s != sid})
            rows.extend((pid, p) for p in _order(seed, pid, others)[:k - 1])
    return pd.DataFrame(rows, columns=["probe_id", "prefix"])


def rank_gold(scores: np.ndarray, gold: int) -> tuple[float, float]:
    """(hits@1, reciprocal rank) of index `gold` in `scores`; ties share the rank."""
    better = int((scores > scores[gold]).sum())
    ties = int((scores == scores[gold]).sum()) - 1
    hits = 1.0 / (1 + ties) if better == 0 else 0.0
    return hits, 1.0 / (1 + better + ties / 2)


def chance(n: int) -> tuple[float, float]:
    """(hits@1, MRR) of a random ranking of n candidates."""
    return (1.0 / n, sum(1.0 / i for i in range(1, n + 1)) / n) if n else (math.nan, math.nan)


def per_probe(probes: pd.DataFrame, cands: pd.DataFrame, cand_lp: np.ndarray, cand_n: np.ndarray,
              spec: pd.DataFrame | None = None, spec_lp: np.ndarray | None = None,
              spec_n: np.ndarray | None = None, para: dict | None = None) -> pd.DataFrame:
    """One row per probe: hits1/rr (mean log-prob per token), hits1_sum/rr_sum (summed),
    n_candidates, chance_hits1, chance_mrr, gold_score, margin (updated: new minus replaced
    object, nats per token; outdated: replaced minus current), efficacy (updated: margin > 0),
    para_margin / para_efficacy (second wording), specificity."""
    c = cands.assign(lp=cand_lp, n=cand_n)
    c["norm"] = c["lp"] / c["n"].clip(lower=1)
    out = []
    groups = dict(tuple(c.groupby("probe_id", sort=False)))
    spec_by = {}
    if spec is not None and len(spec):
        s = spec.assign(norm=np.asarray(spec_lp) / np.clip(spec_n, 1, None))
        spec_by = s.groupby("probe_id")["norm"].mean().to_dict()
    for pid, name in zip(probes["probe_id"], probes["set"]):
        g = groups[pid]
        gold = int(np.flatnonzero(g["gold"].to_numpy())[0])
        h, rr = rank_gold(g["norm"].to_numpy(), gold)
        hs, rrs = rank_gold(g["lp"].to_numpy(), gold)
        ch, cm = chance(len(g))
        pair = g[g["kind"] == "pair"]
        margin = float(g["norm"].iat[gold] - pair["norm"].max()) if len(pair) else math.nan
        row = {"probe_id": pid, "hits1": h, "rr": rr, "hits1_sum": hs, "rr_sum": rrs, "n_candidates": len(g),
               "chance_hits1": ch, "chance_mrr": cm, "gold_score": float(g["norm"].iat[gold]),
               "margin": margin, "efficacy": (margin > 0) if name == "updated" and not math.isnan(margin) else None,
               "para_margin": math.nan, "para_efficacy": None,
               "specificity": float(g["norm"].iat[gold] - spec_by[pid]) if pid in spec_by else math.nan}
        if para and pid in para:
            row["para_margin"] = para[pid]
            row["para_efficacy"] = para[pid] > 0
        out.append(row)
    return pd.DataFrame(out)


def loo_guess(counts: dict, obj: str) -> str | None:
    """The most common object of a relation's probes (`counts`: object -> number of
    probes) other than this one (ties: the first in sorted order), or None when the probe
    is the relation's only one."""
    left = {**counts, obj: counts[obj] - 1}
    top = max(left.values())
    return min(str(o) for o, n in left.items() if n == top) if top > 0 else None


def _mean(x) -> float | None:
    x = pd.Series(x, dtype=float).dropna()
    return float(x.mean()) if len(x) else None


def summarize(probes: pd.DataFrame, rows: pd.DataFrame) -> dict:
    """summary.json's `facts`: per set (and `unchanged` split into `unchanged_touched`,
    subjects new or updated in the period, and `unchanged_untouched`) the mean hits1, mrr,
    hits1_sum, mrr_sum, chance_hits1, chance_mrr, specificity over the probes without a
    constant object, their count `n`, `n_constant` left out, and per relation the
    majority-object baseline; `efficacy` of the updated probes."""
    df = probes.merge(rows, on="probe_id")
    status = df["subject_status"] if "subject_status" in df else pd.Series("unknown", index=df.index)
    groups = {name: df[df["set"] == name] for name in sorted(df["set"].unique())}
    if "unchanged" in groups:
        u = df["set"] == "unchanged"
        groups["unchanged_touched"] = df[u & status.isin(["new", "updated"])]
        groups["unchanged_untouched"] = df[u & (status == "unchanged")]
    sets = {}
    for name, g in groups.items():
        kept = g[~g["constant_object"]]
        entry = {m: _mean(kept[m]) for m in ("hits1", "rr", "hits1_sum", "rr_sum", "chance_hits1", "chance_mrr",
                                             "specificity")}
        entry["mrr"], entry["mrr_sum"] = entry.pop("rr"), entry.pop("rr_sum")
        majority, loo_hits = {}, 0
        for rel, r in kept.groupby("relation"):
            counts = r["object"].value_counts()
            majority[str(rel)] = {"n": int(len(r)), "object": str(counts.index[0]),
                                  "share": float(counts.iat[0] / len(r))}
            by_object = counts.to_dict()
            loo_hits += sum(loo_guess(by_object, o) == o for o in r["object"])
        # a constant guess per relation that never sees the probe it answers (leave-one-out)
        entry["majority_hits1"] = float(loo_hits / len(kept)) if len(kept) else None
        sets[name] = {**entry, "n": int(len(kept)), "n_constant": int(g["constant_object"].sum()),
                      "majority": majority}
    up = df[(df["set"] == "updated") & ~df["constant_object"] & df["margin"].notna()]
    para = up[up["para_margin"].notna()]
    efficacy = {"share": _mean(up["margin"] > 0) if len(up) else None, "margin": _mean(up["margin"]), "n": int(len(up)),
                "paraphrase_share": _mean(para["para_margin"] > 0) if len(para) else None,
                "paraphrase_margin": _mean(para["para_margin"]), "paraphrase_n": int(len(para))}
    return {"sets": sets, "efficacy": efficacy}
