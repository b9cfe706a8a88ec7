"""Evaluation of checkpoints on their period: probe scores and held-out perplexity.

Inputs: a checkpoint folder (`<dir>/model` if present, else `<dir>` itself: a merged
model for LoRA, so a plain load works; a K-Adapter checkpoint is loaded with its
adapters by `methods.load_checkpoint`), `probes/probes.parquet` (the period's probes,
every set present) and the token files (`gradloc tokens`: the period's held-out split).
Outputs `scores.parquet` and `summary.json` (docs/formats.md), which names what was
evaluated (`method`, `seed`, `period`) so the report never reads it from folder names.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from . import factlevel, schema
from .io import InputError, NonFiniteError, as_list, atomic_output, read_json, read_table, write_json, write_parquet
from .methods import load_checkpoint
from .models import checkpoint_dir, device
from .scoring import PROBE_COLUMNS, fmt_ppl, ids_logprob, perplexity, score_pairs, score_probes, summarize
from .tokenfiles import load as load_tokens

log = logging.getLogger(__name__)

BASE = "base"  # the method name of the base model, which has no seed


def with_defaults(params: dict | None) -> dict:
    """Params validated against the config schema's `evaluate` section, defaults filled."""
    return schema.fill("evaluate", params, where="evaluate params")


def identity(ckpt_folder, method: str | None, seed: int | None) -> tuple[str, int | None]:
    """(method, seed) of a checkpoint: as given, else from the folder's metrics.json
    (train writes `method` and `seed` there), else the base model (`base`, no seed)."""
    if method is not None and seed is not None:
        return method, seed
    path = Path(ckpt_folder) / "metrics.json"
    metrics = read_json(path) if path.exists() else {}
    if not isinstance(metrics, dict):
        raise InputError(f"{path}: expected a JSON object")
    if method is None:
        method = metrics.get("method", BASE)
        if not isinstance(method, str) or not method:
            raise InputError(f"{path}: key method must be a non-empty string, got {method!r}")
    if seed is None:
        seed = metrics.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InputError(f"{path}: key seed must be an integer, got {seed!r}")
    return method, seed


FACT_COLUMNS = ["subject_id", "relation"]  # needed by the fact-level metrics


def all_probes(probes_dir) -> pd.DataFrame:
    """probes.parquet with the columns the fact-level metrics use filled in where an older
    or hand-made file lacks them: `paraphrase` empty, `subject_status` unknown,
    `constant_object` computed (`factlevel.constant_objects`)."""
    path = Path(probes_dir) / "probes.parquet"
    df = read_table(path, ["period", *PROBE_COLUMNS, *FACT_COLUMNS])
    df = df.astype({"subject_id": str, "relation": str, "object": str})
    if "paraphrase" not in df:
        df["paraphrase"] = ""
    if "subject_status" not in df:
        df["subject_status"] = "unknown"
    if "constant_object" not in df:
        df["constant_object"] = factlevel.constant_objects(df)
    return df.assign(paraphrase=df["paraphrase"].fillna("").astype(str), constant_object=df["constant_object"].astype(bool))


def period_probes(probes: pd.DataFrame, period: int, max_per_set: int | None = None) -> pd.DataFrame:
    df = probes[probes["period"] == int(period)]
    if max_per_set:
        # the first n per set in probe_id order: the same probes for every checkpoint
        df = df.sort_values("probe_id").groupby("set", sort=False).head(max_per_set)
    return df.reset_index(drop=True)


def fact_level(model, tokenizer, probes: pd.DataFrame, pool: pd.DataFrame, period: int, k: int, seed: int,
               batch_size: int) -> pd.DataFrame:
    """`factlevel.per_probe` rows of the period's probes: candidates drawn from every
    probe in `pool` (seeded, the same for every checkpoint), specificity against other
    subjects' prefixes, efficacy under the paraphrase where there is one."""
    cands = factlevel.candidates(pool, period, k, seed)
    cands = cands[cands["probe_id"].isin(set(probes["probe_id"]))].reset_index(drop=True)
    prefix = dict(zip(probes["probe_id"], probes["prefix"]))
    obj = dict(zip(probes["probe_id"], probes["object"]))
    # specificity asks whether what the update taught is bound to its subject: the sets the
    # update is about (unchanged facts would triple its cost for little)
    spec = factlevel.other_prefixes(probes[probes["set"].isin(factlevel.SPECIFICITY_SETS)], k, seed)
    para = probes[(probes["set"] == "updated") & (probes["paraphrase"] != "")]
    para_c = cands[cands["probe_id"].isin(set(para["probe_id"])) & cands["kind"].isin(["gold", "pair"])]
    para_prefix = dict(zip(para["probe_id"], para["paraphrase"]))
    prefixes = ([prefix[p] for p in cands["probe_id"]] + spec["prefix"].tolist()
                + [para_prefix[p] for p in para_c["probe_id"]])
    objects = cands["candidate"].tolist() + [obj[p] for p in spec["probe_id"]] + para_c["candidate"].tolist()
    lp, n = score_pairs(model, tokenizer, prefixes, objects, batch_size, desc="fact-level")
    a, b = len(cands), len(cands) + len(spec)
    margins = {}
    if len(para_c):
        pc = para_c.assign(norm=lp[b:] / np.clip(n[b:], 1, None))
        for pid, g in pc.groupby("probe_id"):
            if (~g["gold"]).any():
                margins[pid] = float(g.loc[g["gold"], "norm"].iat[0] - g.loc[~g["gold"], "norm"].max())
    return factlevel.per_probe(probes, cands, lp[:a], n[:a], spec, lp[a:b], n[a:b], margins)


def heldout_ids(tokens_dir, period: int, max_sequences: int, seed: int = 0, tokenizer=None) -> list[list[int]]:
    """The period's held-out sequences (a seeded sample of at most `max_sequences`, in
    seq_id order) as the tokenizer's default encoding: leading special ids + text ids."""
    toks = load_tokens(tokens_dir, tokenizer)
    df = toks.select(period=int(period), split="heldout")
    if len(df) > max_sequences:
        df = df.sample(n=max_sequences, random_state=seed)
    lead = list(toks.meta["leading_special_ids"])
    return [lead + d.tolist() for d in toks.docs_of(df.sort_values("seq_id"))]


def evaluate_model(model, tokenizer, probes: pd.DataFrame, heldout: list[list[int]], batch_size: int,
                   pool: pd.DataFrame | None = None, period: int | None = None, candidates: int = 10,
                   seed: int = 0, candidate_batch_size: int = 128):
    """(per-probe scores, summary): object/statement scores and held-out perplexity, and
    with `pool` (every probe, for the candidates) the fact-level metrics (`factlevel`)."""
    scores = score_probes(model, tokenizer, probes, batch_size)
    summary = summarize(scores)
    lp, n = ids_logprob(model, tokenizer, heldout, batch_size)
    summary["heldout_ppl"] = perplexity(lp, n)
    if pool is not None and len(probes):
        rows = fact_level(model, tokenizer, probes, pool, period, candidates, seed, candidate_batch_size)
        extra = probes[["probe_id", "subject_id", "relation", "subject_status", "constant_object"]]
        scores = scores.merge(extra, on="probe_id", how="left").merge(rows, on="probe_id", how="left")
        summary["facts"] = {"candidates": candidates, "seed": seed, **factlevel.summarize(probes, rows)}
    return scores, summary


def run(params: dict, model, probes, tokens, out, period=None, method: str | None = None,
        seed: int | None = None) -> None:
    """Evaluate each checkpoint of `model` (one folder or a list) into the matching folder
    of `out`. One process for several checkpoints pays the torch/transformers imports
    once (the workflow evaluates the seeds of a method and period in one job). `period`
    defaults to each checkpoint's metrics.json (train writes it); `method`/`seed` name
    the checkpoint in summary.json and default to the same file (see `identity`)."""
    params = with_defaults(params)
    models, outs = as_list(model), as_list(out)
    if len(models) != len(outs):
        raise InputError(f"evaluate: {len(models)} checkpoint folder(s) but {len(outs)} output folder(s); "
                         "give one --out per --model, in the same order")
    if len(models) > 1 and (method is not None or seed is not None):
        raise InputError("evaluate: --method/--seed name one checkpoint; with several, each checkpoint's "
                         "metrics.json names it")
    for m, o in zip(models, outs):
        if not Path(checkpoint_dir(m)).exists():
            raise InputError(f"{checkpoint_dir(m)}: checkpoint folder not found")
        evaluate_checkpoint(params, m, probes, tokens, checkpoint_period(m) if period is None else int(period),
                            o, *identity(m, method, seed))


def checkpoint_period(folder) -> int:
    """The period a training folder was trained on (its metrics.json); the base model
    has none, so evaluating it needs --period."""
    path = Path(folder) / "metrics.json"
    metrics = read_json(path) if path.exists() else {}
    period = metrics.get("period") if isinstance(metrics, dict) else None
    if isinstance(period, bool) or not isinstance(period, int):
        raise InputError(f"{folder}: no integer 'period' in metrics.json (a base model?); give --period")
    return period


def evaluate_checkpoint(params: dict, model, probes, tokens, period: int, out, method: str,
                        seed: int | None) -> None:
    ckpt = checkpoint_dir(model)
    lm, tokenizer = load_checkpoint(ckpt)
    lm.to(device()).eval()
    pool = all_probes(probes)
    probe_df = period_probes(pool, period, params["max_probes_per_set"])
    texts = heldout_ids(tokens, period, params["heldout_max_sequences"], tokenizer=tokenizer)
    if probe_df.empty:
        log.warning("no probes for period %d in %s", period, probes)
    try:
        scores, summary = evaluate_model(lm, tokenizer, probe_df, texts, params["batch_size"], pool, period,
                                         params["candidates"], params["candidate_seed"],
                                         params["candidate_batch_size"])
    except NonFiniteError as e:  # name the checkpoint: its weights (a diverged run?) give no number
        raise NonFiniteError(f"{ckpt} (period {period}): {e}") from None
    summary = {"method": method, "seed": seed, "period": period, **summary}
    with atomic_output(out) as tmp:
        write_parquet(scores, tmp / "scores.parquet")
        write_json(summary, tmp / "summary.json")
    facts = summary.get("facts", {}).get("sets", {})
    sets = ", ".join(f"{k}: n={v['n']} top1={v['top1']:.3f} obj_ppl={fmt_ppl(v['object_ppl'])}"
                     + (f" hits@1={facts[k]['hits1']:.3f} (chance {facts[k]['chance_hits1']:.3f})"
                        if facts.get(k, {}).get("hits1") is not None else "")
                     for k, v in summary.items() if isinstance(v, dict) and k != "facts")
    log.info("evaluate %s (%s, seed %s) P%d: %d probes (%s); held-out ppl %s on %d sequences",
             ckpt, method, seed, period, len(scores), sets or "none", fmt_ppl(summary["heldout_ppl"]), len(texts))
