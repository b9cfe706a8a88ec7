"""Gradient profile: per-example, per-unit gradient norms of the LM loss (TGL, methods §1).

For each knowledge type (new / updated / unchanged) and for control text (the base
snapshot), we measure ||dL_x/dθ_u|| for every sequence x and unit u (a block, or a
block's attention / MLP / norms), then the relative norm r_u = mean norm(type) / mean
norm(control) with a bootstrap interval (resampling entities or sequences), a
simultaneous band over the units for d_u = r_u - mean(r), and a label-permutation test of
new vs updated (profile/tests.json).

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
from .io import InputError, NonFiniteError, atomic_output, read_json, read_table, write_json, write_parquet
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


INFOBOX_SUFFIX = "_facts"  # the synthetic world's infobox documents (docs/formats.md)


def is_infobox(doc_id) -> bool:
    """An infobox document: `<entity_id>_facts`, one fact per line in probe wording."""
    return str(doc_id).endswith(INFOBOX_SUFFIX)


def document_entities(corpus) -> dict[str, str]:
    """{doc_id: entity id}: the entity a document is about, its title being the entity's
    name or alias (corpus/entities.parquet) or a triple subject's name (names first)."""
    from .facts import read_triples, title_owners

    path = Path(corpus) / "documents.parquet"
    if not path.exists():
        raise InputError(f"{path}: file not found (the profile's sequence entities come from the titles)")
    docs = pd.read_parquet(path, columns=["doc_id", "title"]).drop_duplicates("doc_id", keep="last")
    ents_path = Path(corpus) / "entities.parquet"
    ents = read_table(ents_path, ["entity_id", "name"]) if ents_path.exists() else None
    owner = title_owners(ents, read_triples(corpus))
    return {str(d): owner[str(t)] for d, t in zip(docs["doc_id"], docs["title"]) if str(t) in owner}


def sequence_info(tagged, corpus, need_corpus: bool) -> pd.DataFrame:
    """Per seq_id: doc_id, text, entity (the entity its document is about; else the doc_id:
    a document of no known entity is its own cluster), infobox (bool)."""
    if tagged is None:
        raise InputError("profile: needs the tagged folder (--tagged: the sequences' documents) for "
                         "new_pool: subject, infoboxes: exclude, bootstrap_unit: entity or salient: object")
    info = read_table(Path(tagged) / "sequences.parquet", ["seq_id", "doc_id", "text"])
    info = info.astype({"seq_id": str, "doc_id": str, "text": str}).set_index("seq_id")
    if corpus is None and need_corpus:
        raise InputError("profile: new_pool 'subject' and salient 'object' need the corpus folder (--corpus: "
                         "document titles, entities, triples); or set profile.new_pool: any, salient: subject")
    owner = document_entities(corpus) if corpus is not None else {}
    info["entity"] = [owner.get(d, d) for d in info["doc_id"]]
    info["infobox"] = info["doc_id"].map(is_infobox)
    return info


def find_all(text: str, needle: str) -> list[tuple[int, int]]:
    """Every occurrence of `needle` in `text` that cuts no word."""
    from .core import on_word_boundary

    out, start = [], text.find(needle) if needle else -1
    while start >= 0:
        if on_word_boundary(text, start, start + len(needle)):
            out.append((start, start + len(needle)))
        start = text.find(needle, start + 1)
    return out


def object_spans(texts: dict[str, str], entities: dict[str, list[str]], objects: dict[str, list[str]]) -> dict:
    """{seq_id: [(start, end)]}: occurrences in the sequence's text of the objects (`objects`:
    {entity: updated objects}) of its entities; sequences with none are left out."""
    out = {}
    for sid, ents in entities.items():
        sp = sorted({s for e in ents for o in objects.get(e, []) for s in find_all(texts.get(sid, ""), o)})
        if sp:
            out[sid] = sp
    return out


def updated_objects(corpus, period: int) -> dict[str, list[str]] | None:
    """{subject_id: objects of its updated facts in `period`} from corpus/triples.parquet
    (never the evaluation probes); None for a corpus that made its triples from shipped
    probes (probes_raw.parquet)."""
    from .facts import fact_sets, read_triples

    if (Path(corpus) / "probes_raw.parquet").exists():
        return None
    upd = fact_sets(read_triples(corpus), int(period))["updated"]
    return {str(e): sorted(set(g)) for e, g in upd.groupby("subject_id")["object"]}


def diagnostic_sequences(params: dict, tokens, probes, tokenizer=None, model_dir=None, tagged=None,
                         corpus=None) -> pd.DataFrame:
    """seq_id, knowledge_type (new/updated/unchanged/control), entity (the bootstrap's
    cluster), ids (the tokenizer's default encoding: leading special ids + text ids), and
    with `loss: salient` a `mask` (1 on the salient tokens; the loss counts the targets it
    marks). The pools follow profile.new_pool, infoboxes and salient."""
    toks = load_tokens(tokens, tokenizer)
    docs = toks.docs
    lead = list(toks.meta["leading_special_ids"])
    n, seed, period = params["n_sequences"], params["seed"], int(params["period"])
    control = resolve_control(params, model_dir)
    salient = params["loss"] == "salient"
    if salient and (tokenizer is None or not getattr(tokenizer, "is_fast", False)):
        raise InputError("profile loss 'salient' needs the model's fast tokenizer (character offsets)")
    if salient and tagged is None:
        raise InputError("profile loss 'salient' needs the tagged folder (mentions.parquet)")
    by_object = salient and params["salient"] == "object" and params["source"] == "diff"
    needs_info = (params["new_pool"] == "subject" or params["infoboxes"] == "exclude"
                  or params["bootstrap_unit"] == "entity" or by_object or salient)
    info = sequence_info(tagged, corpus, params["new_pool"] == "subject" or by_object) if needs_info else None
    spans = salient_spans(tagged) if salient else None

    def from_tokens(rows: pd.DataFrame, kt: str, status: str) -> pd.DataFrame:
        sids = rows["seq_id"].astype(str).to_numpy()
        out = pd.DataFrame({"seq_id": sids, "knowledge_type": kt,
                            "entity": info["entity"].reindex(sids).fillna(pd.Series(sids, index=sids)).to_numpy()
                            if info is not None else sids,
                            "ids": [lead + d.tolist() for d in toks.docs_of(rows)]})
        if salient:
            masks = []
            for sid, ids in zip(out["seq_id"], out["ids"]):
                text = info["text"].get(sid, "")
                enc_ids, mask = token_mask(tokenizer, text, spans.get((sid, status), []), len(lead))
                if lead + enc_ids != ids:
                    log.warning("profile: %s re-tokenizes differently from tokens/; salient mask from the re-tokenized text", sid)
                masks.append(mask if len(mask) == len(ids) else [0] * len(ids))
            out["mask"] = masks
        return out

    parts = []
    train = docs[(docs["period"] == period) & (docs["split"] == "train")]
    if params["infoboxes"] == "exclude":
        boxes = set(info.index[info["infobox"]])
        docs = docs[~docs["seq_id"].astype(str).isin(boxes)]
        before = len(train)
        train = train[~train["seq_id"].astype(str).isin(boxes)]
        log.info("profile: infoboxes excluded (%d of the period's %d train sequences)", before - len(train), before)
    if params["source"] == "diff":
        pools = {kt: train[train["knowledge_type"] == kt] for kt in KNOWLEDGE_TYPES}
        if params["new_pool"] == "subject":
            pools["new"] = subject_new(pools["new"], info, tagged, period)
        if by_object:
            pools["updated"] = with_object_spans(pools["updated"], info, tagged, corpus, period, spans)
        for kt in KNOWLEDGE_TYPES:
            parts.append(from_tokens(_sample(pools[kt], n, seed), kt, kt))
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


def subject_new(rows: pd.DataFrame, info: pd.DataFrame, tagged, period: int) -> pd.DataFrame:
    """The `new` pool's sequences whose subject (their document's entity) is new in `period`
    (tagged/entity_status.parquet); the rest (updates whose new value is a new entity) left out."""
    path = Path(tagged) / "entity_status.parquet"
    st = read_table(path, ["period", "entity_id", "status"])
    new = set(st.loc[(st["period"].astype(int) == period) & (st["status"] == "new"), "entity_id"].astype(str))
    ents = info["entity"].reindex(rows["seq_id"].astype(str)).to_numpy()
    keep = np.array([e in new for e in ents], dtype=bool)
    log.info("profile: new_pool subject: %d of %d sequences mentioning a new entity are about one "
             "(%d left out: their subject is not new)", int(keep.sum()), len(rows), int((~keep).sum()))
    return rows[keep]


def with_object_spans(rows: pd.DataFrame, info: pd.DataFrame, tagged, corpus, period: int, spans: dict) -> pd.DataFrame:
    """The `updated` pool with salient spans on the updated objects (from the corpus' triples;
    written into `spans` under (seq_id, 'updated')); sequences without one are skipped."""
    objects = updated_objects(corpus, period)
    if objects is None:
        log.warning("profile: salient object: %s ships its probes (its triples are the probes'): the updated "
                    "sequences' salient span stays the subject's name", corpus)
        return rows
    m = read_table(Path(tagged) / "mentions.parquet", ["seq_id", "entity_id", "status"])
    m = m[m["status"] == "updated"]
    mentioned = m.groupby(m["seq_id"].astype(str))["entity_id"].apply(lambda g: list(g.astype(str))).to_dict()
    sids = rows["seq_id"].astype(str).tolist()
    ents = {s: [info["entity"].get(s, s), *mentioned.get(s, [])] for s in sids}
    found = object_spans(info["text"].to_dict(), ents, objects)
    for sid, sp in found.items():
        spans[(sid, "updated")] = sp
    log.info("profile: salient object: %d of %d updated sequences state an updated object of their entity "
             "(%d skipped)", len(found), len(sids), len(sids) - len(found))
    return rows[rows["seq_id"].astype(str).isin(set(found))]


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
        cluster = part["subject_id"] if "subject_id" in part else part["probe_id"]
        df = pd.DataFrame({"seq_id": part["probe_id"].astype(str).to_numpy(), "knowledge_type": kt,
                           "entity": cluster.astype(str).to_numpy(), "ids": ids})
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
    """Long table: seq_id, knowledge_type, entity, granularity, unit, layer, norm."""
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
    if "entity" not in seqs:
        seqs = seqs.assign(entity=seqs["seq_id"])
    meta = seqs.iloc[keep][["seq_id", "knowledge_type", "entity"]].reset_index(drop=True)
    for g, u in units.items():
        norms = np.concatenate(rows[g]) if rows[g] else np.zeros((0, len(u)))
        wide = pd.DataFrame(norms, columns=list(u))
        long = pd.concat([meta, wide], axis=1).melt(["seq_id", "knowledge_type", "entity"], var_name="unit",
                                                    value_name="norm")
        long.insert(3, "granularity", g)
        long.insert(5, "layer", [unit_layer(x, L) for x in long["unit"]])
        frames.append(long)
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------------
# statistics: pure functions on arrays


def cluster_sums(x: np.ndarray, labels) -> tuple[np.ndarray, np.ndarray]:
    """(per-cluster row sums (clusters, units), rows per cluster) of x (rows, units)."""
    _, inv = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    sums = np.zeros((inv.max() + 1 if len(inv) else 0, x.shape[1]))
    np.add.at(sums, inv, x)
    return sums, np.bincount(inv).astype(float)


def bootstrap_means(x: np.ndarray, labels, n_boot: int, rng) -> np.ndarray:
    """(n_boot, units): the mean row of x over resamples of its clusters (`labels`: all rows
    of one cluster drawn together; distinct labels: the ordinary row bootstrap)."""
    sums, counts = cluster_sums(x, labels)
    c = len(counts)
    draw = rng.integers(0, c, (n_boot, c))
    w = np.zeros((n_boot, c))
    np.add.at(w, (np.repeat(np.arange(n_boot), c), draw.ravel()), 1.0)
    return (w @ sums) / (w @ counts)[:, None]


def simultaneous_band(boot: np.ndarray, est: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Simultaneous band est +- c * se over the units (columns of `boot`): se the bootstrap
    standard error, c the `level` quantile of max_u |boot_u - est_u| / se_u (studentised
    max over units). Units with se 0 get a zero-width band and do not enter the max."""
    se = boot.std(0, ddof=1) if len(boot) > 1 else np.zeros(boot.shape[1])
    ok = se > 0
    if not ok.any():
        return est.copy(), est.copy()
    c = np.quantile((np.abs(boot[:, ok] - est[ok]) / se[ok]).max(1), level)
    return est - c * se, est + c * se


def _pool_stats(sums: np.ndarray, counts: np.ndarray, first: np.ndarray) -> tuple[float, float]:
    a = sums[first].sum(0) / counts[first].sum()
    b = sums[~first].sum(0) / counts[~first].sum()
    return float(np.abs(a - b).max()), float(np.abs(a / a.mean() - b / b.mean()).max())


def permutation_test(new: np.ndarray, updated: np.ndarray, control_mean: np.ndarray, new_labels, updated_labels,
                     permutations: int, seed: int) -> dict:
    """Label permutation of new vs updated on norms (rows, units) normalised by the control's
    mean norm: statistic max_u |r_new - r_updated|, shape statistic the same on profiles
    normalised to mean 1. Clusters (`*_labels`, per pool) are exchanged whole; the pools
    keep their number of clusters. p = (1 + #{perm >= observed}) / (1 + permutations)."""
    x = np.vstack([new, updated]) / control_mean
    labels = [f"new\t{e}" for e in np.asarray(new_labels).astype(str)] + \
             [f"updated\t{e}" for e in np.asarray(updated_labels).astype(str)]
    keys, inv = np.unique(labels, return_inverse=True)
    sums = np.zeros((len(keys), x.shape[1]))
    np.add.at(sums, inv, x)
    counts = np.bincount(inv).astype(float)
    first = np.char.startswith(keys.astype(str), "new\t")
    observed, shape = _pool_stats(sums, counts, first)
    rng = np.random.default_rng(seed)
    k = int(first.sum())
    perm = np.empty((permutations, 2))
    for i in range(permutations):
        flag = np.zeros(len(keys), dtype=bool)
        flag[rng.permutation(len(keys))[:k]] = True
        perm[i] = _pool_stats(sums, counts, flag)
    tol = 1e-12
    return {"observed": observed, "p_value": float((1 + (perm[:, 0] >= observed - tol * abs(observed)).sum())
                                                   / (1 + permutations)),
            "shape_observed": shape, "shape_p_value": float((1 + (perm[:, 1] >= shape - tol * abs(shape)).sum())
                                                            / (1 + permutations)),
            "n_clusters": {"new": k, "updated": int(len(keys) - k)}}


# ---------------------------------------------------------------------------------
# relative norms and the tests


def _wide(norms: pd.DataFrame, g: str):
    """(units in order, {knowledge type: (norms (rows, units), cluster labels, seq ids)})."""
    sub = norms[norms["granularity"] == g]
    units = list(dict.fromkeys(sub["unit"]))
    idx = ["knowledge_type", "entity", "seq_id"] if "entity" in sub else ["knowledge_type", "seq_id"]
    wide = sub.pivot_table(index=idx, columns="unit", values="norm", sort=False)[units]
    pools = {}
    for kt, grp in wide.groupby(level=0, sort=False):
        labels = grp.index.get_level_values(1)
        pools[kt] = (grp.to_numpy(), labels.to_numpy(), grp.index.get_level_values(-1).to_numpy())
    return units, pools


def relative_norms(norms: pd.DataFrame, n_boot: int, seed: int, unit: str = "entity") -> pd.DataFrame:
    """rel = mean norm(type) / mean norm(control) per unit, with a bootstrap 95% interval
    lo, hi (type and control resampled independently, with replacement: by entity, all
    sequences of one entity together, or by sequence, `unit`).

    Significance of the selection: `d` = rel - mean(rel) over the transformer-block units
    of the granularity (the select stage's candidates), with a paired bootstrap 95%
    interval `d_lo`, `d_hi` per unit and a simultaneous band `d_slo`, `d_shi` over the
    units (max-|t|): each resample draws type and control clusters once and recomputes
    every unit's r from them, so the layers are compared on the same draws. `d` is NaN
    for units that are never selected (embeddings, final norm)."""
    from .core import is_candidate

    if unit == "sequence" or "entity" not in norms:
        norms = norms.assign(entity=norms["seq_id"])
    rng = np.random.default_rng(seed)
    out = []
    for g in dict.fromkeys(norms["granularity"]):
        units, pools = _wide(norms, g)
        layers = norms[norms["granularity"] == g].drop_duplicates("unit").set_index("unit")["layer"]
        if "control" not in pools:
            continue
        c, c_lab, _ = pools["control"]
        bc = bootstrap_means(c, c_lab, n_boot, rng) if n_boot > 0 else None
        cand = np.array([is_candidate(u) for u in units])
        for kt in KNOWLEDGE_TYPES:
            if kt not in pools:
                continue
            x, x_lab, _ = pools[kt]
            r = x.mean(0) / c.mean(0)
            bad = ~np.isfinite(r)
            if bad.any():
                j = int(np.nonzero(bad)[0][0])
                raise NonFiniteError(f"profile: relative norm of {units[j]} ({kt}) is {r[j]}: mean {kt} norm "
                                     f"{x[:, j].mean()}, mean control norm {c[:, j].mean()}")
            nan = np.full(len(units), np.nan)
            lo, hi, d, d_lo, d_hi, d_slo, d_shi = (nan.copy() for _ in range(7))
            if cand.any():
                d[cand] = r[cand] - r[cand].mean()
            if n_boot > 0:
                rb = bootstrap_means(x, x_lab, n_boot, rng) / bc
                lo, hi = np.percentile(rb, [2.5, 97.5], axis=0)
                if cand.any():
                    db = rb[:, cand] - rb[:, cand].mean(1, keepdims=True)
                    d_lo[cand], d_hi[cand] = np.percentile(db, [2.5, 97.5], axis=0)
                    d_slo[cand], d_shi[cand] = simultaneous_band(db, d[cand], 0.95)
            for j, u in enumerate(units):
                out.append({"knowledge_type": kt, "granularity": g, "unit": u, "layer": int(layers[u]),
                            "rel": float(r[j]), "lo": float(lo[j]), "hi": float(hi[j]), "d": d[j],
                            "d_lo": d_lo[j], "d_hi": d_hi[j], "d_slo": d_slo[j], "d_shi": d_shi[j]})
    cols = ["knowledge_type", "granularity", "unit", "layer", "rel", "lo", "hi", "d", "d_lo", "d_hi", "d_slo", "d_shi"]
    return pd.DataFrame(out, columns=cols)


def tests_of(norms: pd.DataFrame, params: dict, granularity: str = "block") -> dict:
    """profile/tests.json: the new-vs-updated permutation test over the granularity's
    transformer-block units, and what the simultaneous intervals are."""
    from .core import is_candidate

    unit = params["bootstrap_unit"]
    if unit == "sequence" or "entity" not in norms:
        norms = norms.assign(entity=norms["seq_id"])
    units, pools = _wide(norms, granularity)
    cand = [j for j, u in enumerate(units) if is_candidate(u)]
    n_seq = {kt: int(len(pools[kt][0])) if kt in pools else 0 for kt in ("new", "updated")}
    n_clu = {kt: int(len(set(pools[kt][1]))) if kt in pools else 0 for kt in ("new", "updated")}
    test = {"available": False, "reason": None, "test": "label permutation", "granularity": granularity,
            "units": [units[j] for j in cand], "statistic": "max_u |r_new - r_updated|", "observed": None,
            "p_value": None, "shape_statistic": "max_u |r_new / mean(r_new) - r_updated / mean(r_updated)|",
            "shape_observed": None, "shape_p_value": None, "permutations": int(params["permutations"]),
            "seed": int(params["seed"]), "exchange_unit": unit, "n_sequences": n_seq, "n_clusters": n_clu}
    empty = [kt for kt in ("new", "updated", "control") if kt not in pools]
    if empty:
        test["reason"] = f"no {'/'.join(empty)} sequences profiled"
    elif not cand:
        test["reason"] = f"no transformer-block units at granularity {granularity}"
    elif params["permutations"] == 0:
        test["reason"] = "profile.permutations is 0"
    elif min(n_clu.values()) + max(n_clu.values()) < 3:
        test["reason"] = f"too few {unit}s to permute ({n_clu})"
    else:
        (xn, ln, _), (xu, lu, _), (c, _, _) = pools["new"], pools["updated"], pools["control"]
        res = permutation_test(xn[:, cand], xu[:, cand], c[:, cand].mean(0), ln, lu,
                               int(params["permutations"]), int(params["seed"]))
        test.update({k: res[k] for k in ("observed", "p_value", "shape_observed", "shape_p_value")}, available=True)
    return {"new_vs_updated": test,
            "intervals": {"kind": "simultaneous max-|t| over units", "level": 0.95, "n_units": len(cand),
                          "granularity": granularity, "bootstrap": int(params["bootstrap"]), "unit": unit}}


def run(params: dict, model, tokens, probes, out, tagged=None, corpus=None) -> None:
    from .figures import heatmap, significance

    params = with_defaults(params)
    torch.manual_seed(params["seed"])
    ckpt = checkpoint_dir(model)
    lm, tokenizer = load_model(ckpt)
    lm.to(device())
    seqs = diagnostic_sequences(params, tokens, probes, tokenizer, model_dir=model, tagged=tagged, corpus=corpus)
    norms = profile_norms(lm, tokenizer, seqs, params["seq_len"], params["batch_size"])
    relative = relative_norms(norms, params["bootstrap"], params["seed"], params["bootstrap_unit"])
    tests = tests_of(norms, params)
    with atomic_output(out) as tmp:
        write_parquet(norms, tmp / "norms.parquet")
        relative.to_csv(tmp / "relative.csv", index=False)
        write_json(tests, tmp / "tests.json")
        heatmap(relative, tmp / "heatmap.png",
                title=f"relative gradient norm, period {params['period']} ({params['source']})")
        significance(relative, tmp / "significance.png")
    counts = seqs["knowledge_type"].value_counts().to_dict()
    log.info("profile: %s sequences profiled, %d units (block), %d units (module)", counts,
             norms.loc[norms["granularity"] == "block", "unit"].nunique(),
             norms.loc[norms["granularity"] == "module", "unit"].nunique())
    t = tests["new_vs_updated"]
    log.info("profile: new vs updated, %s: %s", t["test"], f"p = {t['p_value']:.3g} ({t['statistic']} = "
             f"{t['observed']:.3g}, {t['permutations']} permutations exchanging "
             f"{'entities' if t['exchange_unit'] == 'entity' else 'sequences'})"
             if t["available"] else f"not available ({t['reason']})")
