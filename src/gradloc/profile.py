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
from .io import InputError, NonFiniteError, atomic_output, read_json, read_table, write_parquet
from .models import checkpoint_dir, device, layer_units, load_model, n_blocks, unit_layer
from .pergrad import aggregate_units, per_example_grad_norms, per_example_param_sq_norms  # noqa: F401
from .scoring import pad_batch
from .tokenfiles import load as load_tokens

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


def resolve_control(params: dict, model_dir=None) -> str:
    """The control text actually used: `auto` resolved from the base model's metrics.json
    (source, teach_t0, held-out T0 count)."""
    control = params["control"]
    if control != "auto":
        return control
    metrics = {}
    if model_dir is not None and (Path(model_dir) / "metrics.json").exists():
        metrics = read_json(Path(model_dir) / "metrics.json")
    source = metrics.get("source", "scratch")
    if source != "scratch" and not metrics.get("teach_t0", False):
        return "base"  # a pretrained model never trained on T0 here: T0 is ordinary unseen text
    if metrics.get("heldout_base", 0):
        return "heldout_base"
    # A model trained on all of T0, and (in the synthetic world) no diff sequence is about
    # unchanged entities only: T0 text is what remains, and the model has memorised it.
    log.warning("profile: control auto -> base (T0 text the base model trained on); set "
                "model.pretrain.heldout_fraction > 0 for held-out T0 control text")
    return "base"


def heldout_base_ids(model_dir) -> set[str]:
    path = Path(model_dir) / "heldout_base.txt" if model_dir is not None else None
    if path is None or not path.exists():
        return set()
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def salient_spans(tagged) -> dict[tuple[str, str], list[tuple[int, int]]]:
    """{(seq_id, status): [(start, end)]} and {(seq_id, 'any'): ...} from tagged/mentions.parquet."""
    path = Path(tagged) / "mentions.parquet"
    m = read_table(path, ["seq_id", "start", "end", "status"])
    out: dict = {}
    for sid, st, a, b in zip(m["seq_id"].astype(str), m["status"].astype(str), m["start"], m["end"]):
        out.setdefault((sid, st), []).append((int(a), int(b)))
        out.setdefault((sid, "any"), []).append((int(a), int(b)))
    return out


def token_mask(tokenizer, text: str, spans, lead: int, add_special_tokens=False) -> tuple[list[int], list[int]]:
    """(ids, mask): the text's ids (after `lead` leading special ids when not added by the
    tokenizer) and 1 for each token whose character span overlaps one of `spans`."""
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    mask = [int(any(s < b and a < e and e > s for a, b in spans)) for s, e in enc["offset_mapping"]]
    return list(enc["input_ids"]), [0] * lead + mask


def diagnostic_sequences(params: dict, tokens, probes, tokenizer=None, model_dir=None, tagged=None) -> pd.DataFrame:
    """seq_id, knowledge_type (new/updated/unchanged/control), ids (the tokenizer's
    default encoding: leading special ids + text ids), and with `loss: salient` a
    `mask` (1 on the salient tokens; the loss counts the targets it marks)."""
    toks = load_tokens(tokens, tokenizer)
    docs = toks.docs
    lead = list(toks.meta["leading_special_ids"])
    n, seed, period = params["n_sequences"], params["seed"], int(params["period"])
    control = resolve_control(params, model_dir)
    salient = params["loss"] == "salient"
    if salient and (tokenizer is None or not getattr(tokenizer, "is_fast", False)):
        raise InputError("profile loss 'salient' needs the model's fast tokenizer (character offsets)")
    spans = salient_spans(tagged) if salient and tagged is not None else None
    texts = None
    if salient:
        if tagged is None:
            raise InputError("profile loss 'salient' needs the tagged folder (mentions.parquet)")
        tdf = read_table(Path(tagged) / "sequences.parquet", ["seq_id", "text"])
        texts = dict(zip(tdf["seq_id"].astype(str), tdf["text"].astype(str)))

    def from_tokens(rows: pd.DataFrame, kt: str, status: str) -> pd.DataFrame:
        out = pd.DataFrame({"seq_id": rows["seq_id"].astype(str).to_numpy(), "knowledge_type": kt,
                            "ids": [lead + d.tolist() for d in toks.docs_of(rows)]})
        if salient:
            masks = []
            for sid, ids in zip(out["seq_id"], out["ids"]):
                enc_ids, mask = token_mask(tokenizer, texts.get(sid, ""), spans.get((sid, status), []), len(lead))
                if lead + enc_ids != ids:
                    log.warning("profile: %s re-tokenizes differently from tokens/; salient mask from the re-tokenized text", sid)
                masks.append(mask if len(mask) == len(ids) else [0] * len(ids))
            out["mask"] = masks
        return out

    parts = []
    train = docs[(docs["period"] == period) & (docs["split"] == "train")]
    if params["source"] == "diff":
        for kt in KNOWLEDGE_TYPES:
            parts.append(from_tokens(_sample(train[train["knowledge_type"] == kt], n, seed), kt, kt))
    else:
        parts += probe_sequences(probes, tokenizer, salient, period, n, seed)
    pool, what = control_pool(control, docs, train, parts, params, model_dir)
    parts.append(from_tokens(_sample(pool, n, seed), "control", "any"))
    out = pd.concat(parts, ignore_index=True)
    for kt in (*KNOWLEDGE_TYPES, "control"):
        if not (out["knowledge_type"] == kt).any():
            log.warning("profile: no %s sequences (period %d, source %s)", kt, period, params["source"])
    if not (out["knowledge_type"] == "control").any():
        raise InputError(f"{toks.path}: no {what} for the control")
    log.info("profile: control text %s (%s: %s), loss %s", control, params["control"], what, params["loss"])
    return out


def probe_sequences(probes, tokenizer, salient: bool, period: int, n: int, seed: int) -> list[pd.DataFrame]:
    """`source: probes`: each knowledge type's sample of the period's probe statements
    (with `loss: salient`, the object's tokens marked: after the prefix and one space)."""
    if tokenizer is None:
        raise InputError("profile source 'probes' needs the model's tokenizer")
    pr = read_table(Path(probes) / "probes.parquet", ["probe_id", "period", "set", "statement"]
                    + (["prefix"] if salient else []))
    pr = pr[pr["period"] == period]
    parts = []
    for kt in KNOWLEDGE_TYPES:
        part = _sample(pr[pr["set"] == kt], n, seed)
        statements = part["statement"].astype(str).tolist()
        ids = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in statements]
        df = pd.DataFrame({"seq_id": part["probe_id"].astype(str).to_numpy(), "knowledge_type": kt, "ids": ids})
        if salient:
            masks = []
            for st, pre, full in zip(statements, part["prefix"].astype(str), ids):
                enc = tokenizer(st, add_special_tokens=True, return_offsets_mapping=True)
                a = len(pre)
                masks.append([int(e > a and e > s) for s, e in enc["offset_mapping"]]
                             if list(enc["input_ids"]) == list(full) else [0] * len(full))
            df["mask"] = masks
        parts.append(df)
    return parts


def control_pool(control: str, docs: pd.DataFrame, train: pd.DataFrame, parts: list, params: dict, model_dir):
    """(the documents the control text is sampled from, what they are in words)."""
    if control == "base":
        return docs[docs["split"] == "base"], "base (split == 'base') sequences"
    if control == "heldout_base":
        held = heldout_base_ids(model_dir)
        if not held:
            raise InputError("profile control 'heldout_base': the base model held out no T0 text "
                             "(set model.pretrain.heldout_fraction > 0, or control unchanged_diff / base)")
        return (docs[(docs["split"] == "base") & docs["seq_id"].astype(str).isin(held)],
                "held-out T0 sequences (base_model/heldout_base.txt)")
    # unchanged_diff: disjoint from the `unchanged` diagnostic sample
    pool = train[train["knowledge_type"] == "unchanged"]
    taken = set(parts[2]["seq_id"]) if params["source"] == "diff" else set()
    return (pool[~pool["seq_id"].astype(str).isin(taken)],
            f"period-{int(params['period'])} diff sequences about unchanged entities (not in the unchanged sample)")


def profile_norms(model, tokenizer, seqs: pd.DataFrame, seq_len: int, batch_size: int) -> pd.DataFrame:
    """Long table: seq_id, knowledge_type, granularity, unit, layer, norm."""
    device = next(model.parameters()).device
    L = n_blocks(model)
    units = {g: layer_units(model, g) for g in ("block", "module")}
    encoded = [list(ids)[:seq_len] for ids in seqs["ids"]]
    masks = [list(m)[:seq_len] for m in seqs["mask"]] if "mask" in seqs else None
    keep = [i for i, ids in enumerate(encoded) if len(ids) >= 2]  # one token has no next-token loss
    if len(keep) < len(encoded):
        log.warning("profile: %d sequence(s) shorter than 2 tokens skipped", len(encoded) - len(keep))
    if masks is not None:  # salient loss: a target token must be marked
        before = len(keep)
        keep = [i for i in keep if any(masks[i][1:])]
        if len(keep) < before:
            log.warning("profile: %d sequence(s) without a salient token (within %d tokens) skipped",
                        before - len(keep), seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = {g: [] for g in units}
    for start in tqdm(range(0, len(keep), batch_size), desc="profile"):
        idx = keep[start:start + batch_size]
        ids, mask = pad_batch([encoded[i] for i in idx], pad_id, device)
        loss_mask = None
        if masks is not None:
            loss_mask, _ = pad_batch([masks[i] for i in idx], 0, device)
        sq = per_example_param_sq_norms(model, ids, mask, loss_mask)
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
    (type and control sequences resampled independently, with replacement).

    Significance of the selection: `d` = rel - mean(rel) over the transformer-block units
    of the granularity (the select stage's candidates), with a paired bootstrap 95%
    interval `d_lo`, `d_hi`: each resample draws type and control *sequences* once and
    recomputes every unit's r from them, so the layers are compared on the same draws.
    `d` is NaN for units that are never selected (embeddings, final norm)."""
    from .core import is_candidate

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
    cols = ["knowledge_type", "granularity", "unit", "layer", "rel", "lo", "hi", "d", "d_lo", "d_hi"]
    res = pd.DataFrame(out, columns=cols[:7])
    res["d"] = res["d_lo"] = res["d_hi"] = np.nan
    rng = np.random.default_rng([seed, 1])
    for g in norms["granularity"].unique():
        sub = norms[(norms["granularity"] == g) & norms["unit"].map(is_candidate)]
        if sub.empty:
            continue
        wide = sub.pivot_table(index=["knowledge_type", "seq_id"], columns="unit", values="norm", sort=False)
        units = list(wide.columns)
        if "control" not in wide.index.get_level_values(0):
            continue
        c = wide.loc["control"].to_numpy()
        for kt in KNOWLEDGE_TYPES:
            if kt not in wide.index.get_level_values(0):
                continue
            x = wide.loc[kt].to_numpy()
            r = x.mean(0) / c.mean(0)
            d = r - r.mean()
            lo = hi = np.full(len(units), np.nan)
            if n_boot > 0:
                ix = rng.integers(0, len(x), (n_boot, len(x)))
                ic = rng.integers(0, len(c), (n_boot, len(c)))
                rb = x[ix].mean(1) / c[ic].mean(1)  # (n_boot, units), one draw for all units
                db = rb - rb.mean(1, keepdims=True)
                lo, hi = np.percentile(db, [2.5, 97.5], axis=0)
            for j, u in enumerate(units):
                at = (res["knowledge_type"] == kt) & (res["granularity"] == g) & (res["unit"] == u)
                res.loc[at, ["d", "d_lo", "d_hi"]] = [d[j], lo[j], hi[j]]
    return res[cols]


def run(params: dict, model, tokens, probes, out, tagged=None) -> None:
    from .figures import heatmap, significance

    params = with_defaults(params)
    torch.manual_seed(params["seed"])
    ckpt = checkpoint_dir(model)
    lm, tokenizer = load_model(ckpt)
    lm.to(device())
    seqs = diagnostic_sequences(params, tokens, probes, tokenizer, model_dir=model, tagged=tagged)
    norms = profile_norms(lm, tokenizer, seqs, params["seq_len"], params["batch_size"])
    relative = relative_norms(norms, params["bootstrap"], params["seed"])
    with atomic_output(out) as tmp:
        write_parquet(norms, tmp / "norms.parquet")
        relative.to_csv(tmp / "relative.csv", index=False)
        heatmap(relative, tmp / "heatmap.png",
                title=f"relative gradient norm, period {params['period']} ({params['source']})")
        significance(relative, tmp / "significance.png")
    counts = seqs["knowledge_type"].value_counts().to_dict()
    log.info("profile: %s sequences profiled, %d units (block), %d units (module)", counts,
             norms.loc[norms["granularity"] == "block", "unit"].nunique(),
             norms.loc[norms["granularity"] == "module", "unit"].nunique())
