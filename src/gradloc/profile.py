"""Gradient profile: per-example, per-unit gradient norms of the LM loss (TGL, methods §1).

For each knowledge type (new / updated / unchanged) and for control text (the base
snapshot), we measure ||dL_x/dθ_u|| for every sequence x and unit u (a block, or a
block's attention / MLP / norms), then the relative norm r_u = mean norm(type) / mean
norm(control) with a bootstrap interval.

The norms come from `gradloc.pergrad` (one batched backward per batch).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import schema
from .io import InputError, NonFiniteError, atomic_output, read_table, write_parquet
from .pergrad import aggregate_units, per_example_grad_norms, per_example_param_sq_norms  # noqa: F401
from .models import checkpoint_dir, device, layer_units, load_model, n_blocks, unit_layer
from .scoring import pad_batch
from .tokens import load as load_tokens

log = logging.getLogger(__name__)

KNOWLEDGE_TYPES = ("new", "updated", "unchanged")

# ---------------------------------------------------------------------------------
# the profile stage


def with_defaults(params: dict | None) -> dict:
    return schema.fill("profile", params, where="profile")


def _sample(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    if len(df) > n:
        df = df.sample(n=n, random_state=seed)
    return df


def diagnostic_sequences(params: dict, tokens, probes, tokenizer=None) -> pd.DataFrame:
    """seq_id, knowledge_type (new/updated/unchanged/control), ids (the tokenizer's
    default encoding: leading special ids + text ids)."""
    toks = load_tokens(tokens, tokenizer)
    docs = toks.docs
    lead = list(toks.meta["leading_special_ids"])
    n, seed, period = params["n_sequences"], params["seed"], int(params["period"])

    def from_tokens(rows: pd.DataFrame, kt: str) -> pd.DataFrame:
        return pd.DataFrame({"seq_id": rows["seq_id"].astype(str).to_numpy(), "knowledge_type": kt,
                             "ids": [lead + d.tolist() for d in toks.docs_of(rows)]})

    parts = []
    if params["source"] == "diff":
        train = docs[(docs["period"] == period) & (docs["split"] == "train")]
        for kt in KNOWLEDGE_TYPES:
            parts.append(from_tokens(_sample(train[train["knowledge_type"] == kt], n, seed), kt))
    else:
        if tokenizer is None:
            raise InputError("profile source 'probes' needs the model's tokenizer")
        probe_path = Path(probes) / "probes.parquet"
        pr = read_table(probe_path, ["probe_id", "period", "set", "statement"])
        pr = pr[pr["period"] == period]
        for kt in KNOWLEDGE_TYPES:
            part = _sample(pr[pr["set"] == kt], n, seed)
            ids = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in part["statement"].astype(str)]
            parts.append(pd.DataFrame({"seq_id": part["probe_id"].astype(str).to_numpy(), "knowledge_type": kt,
                                       "ids": ids}))
    parts.append(from_tokens(_sample(docs[docs["split"] == "base"], n, seed), "control"))
    out = pd.concat(parts, ignore_index=True)
    for kt in (*KNOWLEDGE_TYPES, "control"):
        if not (out["knowledge_type"] == kt).any():
            log.warning("profile: no %s sequences (period %d, source %s)", kt, period, params["source"])
    if not (out["knowledge_type"] == "control").any():
        raise InputError(f"{toks.path}: no base (split == 'base') sequences for the control")
    return out


def profile_norms(model, tokenizer, seqs: pd.DataFrame, seq_len: int, batch_size: int) -> pd.DataFrame:
    """Long table: seq_id, knowledge_type, granularity, unit, layer, norm."""
    device = next(model.parameters()).device
    L = n_blocks(model)
    units = {g: layer_units(model, g) for g in ("block", "module")}
    encoded = [list(ids)[:seq_len] for ids in seqs["ids"]]
    keep = [i for i, ids in enumerate(encoded) if len(ids) >= 2]  # one token has no next-token loss
    if len(keep) < len(encoded):
        log.warning("profile: %d sequence(s) shorter than 2 tokens skipped", len(encoded) - len(keep))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = {g: [] for g in units}
    for start in tqdm(range(0, len(keep), batch_size), desc="profile"):
        idx = keep[start:start + batch_size]
        ids, mask = pad_batch([encoded[i] for i in idx], pad_id, device)
        sq = per_example_param_sq_norms(model, ids, mask)
        for g, u in units.items():
            norms = aggregate_units(sq, u).double().cpu().numpy()
            if not np.isfinite(norms).all():
                r, c = (int(x[0]) for x in np.nonzero(~np.isfinite(norms)))
                seq = seqs.iloc[idx[r]]
                raise NonFiniteError(
                    f"profile: non-finite gradient norm {norms[r, c]} of unit {list(u)[c]} for sequence "
                    f"{seq['seq_id']} ({seq['knowledge_type']}); the model's weights or loss overflow")
            rows[g].append(norms)
    frames = []
    meta = seqs.iloc[keep][["seq_id", "knowledge_type"]].reset_index(drop=True)
    for g, u in units.items():
        norms = np.concatenate(rows[g]) if rows[g] else np.zeros((0, len(u)))
        wide = pd.DataFrame(norms, columns=list(u))
        long = pd.concat([meta, wide], axis=1).melt(["seq_id", "knowledge_type"], var_name="unit",
                                                    value_name="norm")
        long.insert(2, "granularity", g)
        long.insert(4, "layer", [unit_layer(x, L) for x in long["unit"]])
        frames.append(long)
    return pd.concat(frames, ignore_index=True)


def relative_norms(norms: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """rel = mean norm(type) / mean norm(control) per unit, with a bootstrap 95% interval
    (type and control sequences resampled independently, with replacement)."""
    rng = np.random.default_rng(seed)
    out = []
    for (g, unit), grp in norms.groupby(["granularity", "unit"], sort=False):
        control = grp.loc[grp["knowledge_type"] == "control", "norm"].to_numpy()
        layer = int(grp["layer"].iloc[0])
        for kt in KNOWLEDGE_TYPES:
            x = grp.loc[grp["knowledge_type"] == kt, "norm"].to_numpy()
            if len(x) == 0 or len(control) == 0:
                continue
            rel = x.mean() / control.mean()
            if not np.isfinite(rel):
                raise NonFiniteError(f"profile: relative norm of {unit} ({kt}) is {rel}: mean {kt} norm "
                                     f"{x.mean()}, mean control norm {control.mean()}")
            lo = hi = float("nan")
            if n_boot > 0:
                bx = x[rng.integers(0, len(x), (n_boot, len(x)))].mean(1)
                bc = control[rng.integers(0, len(control), (n_boot, len(control)))].mean(1)
                lo, hi = np.percentile(bx / bc, [2.5, 97.5])
            out.append({"knowledge_type": kt, "granularity": g, "unit": unit, "layer": layer,
                        "rel": float(rel), "lo": float(lo), "hi": float(hi)})
    return pd.DataFrame(out, columns=["knowledge_type", "granularity", "unit", "layer", "rel", "lo", "hi"])


def run(params: dict, model, tokens, probes, out) -> None:
    from .report.figures import heatmap

    params = with_defaults(params)
    torch.manual_seed(params["seed"])
    ckpt = checkpoint_dir(model)
    lm, tokenizer = load_model(ckpt)
    lm.to(device())
    seqs = diagnostic_sequences(params, tokens, probes, tokenizer)
    norms = profile_norms(lm, tokenizer, seqs, params["seq_len"], params["batch_size"])
    relative = relative_norms(norms, params["bootstrap"], params["seed"])
    with atomic_output(out) as tmp:
        write_parquet(norms, tmp / "norms.parquet")
        relative.to_csv(tmp / "relative.csv", index=False)
        heatmap(relative, tmp / "heatmap.png",
                title=f"relative gradient norm, period {params['period']} ({params['source']})")
    counts = seqs["knowledge_type"].value_counts().to_dict()
    log.info("profile: %s sequences profiled, %d units (block), %d units (module)", counts,
             norms.loc[norms["granularity"] == "block", "unit"].nunique(),
             norms.loc[norms["granularity"] == "module", "unit"].nunique())
