"""Stage `gradloc metatrain`: meta-trains the CaMeLS weighting model (Hu et al. 2023)
against the base model on T0 documents and T0 probes.

Episodes: T0 documents (`split == base`) paired with the T0 probes (period 0) whose
subject the document mentions and whose object it contains. Entities asked about by any
uptake probe (new/updated/outdated/changed, period >= 1) are left out; the rest are split by a hash of the entity
into meta-training and validation entities.

One outer step: the weighting model gives each of `inner_steps` sequential documents its
per-token weights w; the base model takes one SGD step per document on mean_t(w_t CE_t)
(differentiable, `torch.func.grad` + `functional_call`, so it runs on a CPU); the outer
loss is the object NLL of the documents' probes under the updated base model plus
`kl_coef` x KL(pre-update || post-update) on unrelated T0 text; Adam updates the
weighting model. The base model carries its (detached) updates on until `reset_every`
documents, then restarts from the checkpoint. Every `val_every` outer steps the same
fixed validation episodes (always from the checkpoint) give the validation loss; the
best weighting model is kept and training stops after `patience` validations without
improvement.

Outputs `weighting_model/`: the weighting model (backbone via save_pretrained, head.pt,
weighting.json, tokenizer), `curve.csv` (step, train_loss, val_loss, val_qa, val_kl) and
`metrics.json` (best step, stop reason, episodes, time, mean weight on entity/object
tokens vs other tokens of the validation documents).
"""

from __future__ import annotations

import copy
import logging
import os
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

from . import schema, tracking
from .engine import lm_loss
from .io import InputError, atomic_output, read_table, write_json
from .methods import load_checkpoint
from .methods.weighting import WeightingModel, check_same_tokenizer
from .methods.weighting import summary as weight_summary
from .models import device
from .tokenfiles import load as load_tokens

log = logging.getLogger(__name__)


# --- the meta-objective ------------------------------------------------------------------

def pad(seqs: list[list[int]], labels: list[list[int]] | None = None):
    """(ids, labels -100 on padding, attention mask) of right-padded sequences."""
    T = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), T), dtype=torch.long)
    lab = torch.full((len(seqs), T), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s)
        lab[i, :len(s)] = torch.as_tensor(s if labels is None else labels[i])
        mask[i, :len(s)] = 1
    return ids, lab, mask


def twice_differentiable(model):
    """Eager attention: the fused SDPA kernels have no second derivative, which the
    meta-gradient through an inner step needs."""
    model.config._attn_implementation = "eager"
    return model


def weighted_loss(model, params: dict, ids, weights) -> torch.Tensor:
    """The inner loss of one document (batch of 1): mean_t(w_t CE_t)."""
    logits = functional_call(model, params, (ids,)).logits
    return lm_loss(logits, ids, weights)


def inner_updates(model, params: dict, docs: list[torch.Tensor], weights: list[torch.Tensor], lr: float) -> dict:
    """One SGD step per document, in order; differentiable w.r.t. the weights."""
    step = grad(lambda p, ids, w: weighted_loss(model, p, ids, w))
    for ids, w in zip(docs, weights):
        g = step(params, ids, w)
        params = {k: p - lr * g[k] for k, p in params.items()}
    return params


def qa_loss(model, params: dict, probes) -> torch.Tensor:
    ids, labels, mask = probes
    return lm_loss(functional_call(model, params, (ids,), {"attention_mask": mask}).logits, labels)


def log_probs(model, params: dict, ids, mask) -> torch.Tensor:
    logits = functional_call(model, params, (ids,), {"attention_mask": mask}).logits
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)


def kl_loss(model, before: dict, after: dict, text) -> torch.Tensor:
    """KL(p_before || p_after) per real token of `text`."""
    ids, labels, mask = text
    with torch.no_grad():
        p0 = log_probs(model, before, ids, mask)
    p1 = log_probs(model, after, ids, mask)
    kl = (p0.exp() * (p0 - p1)).sum(-1)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp(min=1)


def outer_loss(wmodel, model, params: dict, episode: dict, cfg: dict):
    """(loss, qa, kl) of one episode: inner weighted SGD steps from `params`, then the
    probes' NLL + kl_coef x KL on unrelated text; also the updated params."""
    weights = [wmodel(ids) for ids in episode["docs"]]
    after = inner_updates(model, params, episode["docs"], weights, cfg["inner_lr"])
    qa = qa_loss(model, after, episode["probes"])
    kl = kl_loss(model, params, after, episode["kl"]) if cfg["kl_coef"] > 0 else torch.zeros(())
    return qa + cfg["kl_coef"] * kl, qa, kl, after


# --- data -------------------------------------------------------------------------------

UPTAKE_SETS = ("new", "updated", "outdated", "changed")


def episodes_data(toks, tokenizer, tagged, probes, cfg: dict) -> dict:
    """{"train": [doc], "val": [doc], "other": [ids]}: each doc {ids, probes: [(ids, n_obj)],
    entity}; `other`: T0 documents without probes (the KL text)."""
    from .core import stable_unit
    from .scoring import encode_probe

    rows = toks.select(split="base")
    if rows.empty:
        raise InputError(f"{toks.path}/docs.parquet: no split == 'base' (T0) documents to meta-train on")
    pr = read_table(Path(probes) / "probes.parquet", ["period", "set", "subject_id", "prefix", "object"])
    # Entities whose facts an update changes or adds (the uptake probes) are never meta-trained
    # on. Unchanged entities are: their probes measure forgetting of the continually trained
    # model, which the weighting model never sees, and the diffs hold no text about them.
    held = set(pr.loc[(pr["period"] > 0) & pr["set"].isin(UPTAKE_SETS), "subject_id"].astype(str))
    t0 = pr[(pr["period"] == 0) & ~pr["subject_id"].astype(str).isin(held)]
    if t0.empty:
        raise InputError(f"{probes}/probes.parquet: no T0 (period 0) probes about entities outside the uptake "
                         "probes (new/updated/outdated/changed): the meta-training question set is empty")
    by_subject = {s: g for s, g in t0.groupby(t0["subject_id"].astype(str))}
    seqs = read_table(Path(tagged) / "sequences.parquet", ["seq_id", "text"]).set_index("seq_id")["text"]
    mentions = read_table(Path(tagged) / "mentions.parquet", ["seq_id", "entity_id"])
    ents = mentions.groupby("seq_id")["entity_id"].apply(lambda s: sorted(set(map(str, s))))
    eos, L = toks.meta["eos_id"], cfg["max_tokens"]
    out = {"train": [], "val": [], "other": []}
    for sid, ids in zip(rows["seq_id"], toks.docs_of(rows)):
        text = str(seqs.get(sid, ""))
        doc_ids = (ids.tolist() + [eos])[:L]
        qs = [(s, r.prefix, r.object) for s in ents.get(sid, []) if s in by_subject
              for r in by_subject[s].itertuples() if str(r.object) and str(r.object) in text]
        if not qs:
            out["other"].append(doc_ids)
            continue
        entity = qs[0][0]
        part = "val" if stable_unit(f"{entity}|camels|{cfg['seed']}") < cfg["val_fraction"] else "train"
        out[part].append({"seq_id": sid, "text": text, "ids": doc_ids, "entity": entity,
                          "objects": sorted({str(o) for s, p, o in qs if s == entity}),
                          "probes": [encode_probe(tokenizer, p, o, L) for s, p, o in qs if s == entity]})
    if not out["train"] or not out["val"]:
        raise InputError(f"meta-training needs T0 documents with probes for both training and validation entities; "
                         f"found {len(out['train'])} and {len(out['val'])} (val_fraction {cfg['val_fraction']})")
    if not out["other"]:  # every T0 document has probes: the KL text is drawn from the others' documents
        out["other"] = [d["ids"] for d in out["train"]]
    return out


def make_episode(docs: list[dict], other: list[list[int]], cfg: dict, rng, dev=None) -> dict:
    qs = [p for d in docs for p in d["probes"]]
    labels = [[-100] * (len(ids) - n) + ids[-n:] for ids, n in qs]
    kl = [other[i] for i in rng.choice(len(other), min(cfg["kl_docs"], len(other)), replace=False)]
    return {"docs": [torch.as_tensor([d["ids"]], device=dev) for d in docs],
            "probes": tuple(t.to(dev) for t in pad([q[0] for q in qs], labels)),
            "kl": tuple(t.to(dev) for t in pad(kl))}


# --- the stage ------------------------------------------------------------------------------

def load_models(base, backbone, cfg: dict, dev):
    """(the frozen base model, twice differentiable; the weighting model on the backbone;
    their one tokenizer), on `dev`."""
    model, tokenizer = load_checkpoint(base, dtype=torch.float32)
    bb, btok = load_checkpoint(backbone, dtype=torch.float32)
    check_same_tokenizer(tokenizer, btok, str(backbone))
    twice_differentiable(model).to(dev).eval().requires_grad_(False)
    wmodel = WeightingModel(bb, cfg["head_hidden"], cfg["beta"]).to(dev).eval()  # eval: no dropout, deterministic
    return model, wmodel, tokenizer


def what_was_learned(wmodel, tokenizer, vdocs: list[dict]) -> dict:
    """The weights on entity/object tokens vs the others, on the validation documents."""
    from .core import marks

    ws = [wmodel(torch.as_tensor([d["ids"]]))[0].detach().numpy() for d in vdocs]
    spans = [[(m.start(), m.end()) for o in d["objects"] for m in re.finditer(re.escape(o), d["text"])]
             for d in vdocs]
    mk = marks(tokenizer, [d["text"] for d in vdocs], [np.asarray(d["ids"][:-1]) for d in vdocs], spans)
    mk = [np.append(m, 0)[:len(d["ids"])] for m, d in zip(mk, vdocs)]
    return weight_summary(ws, mk, ["val"] * len(vdocs))


def run(params: dict, base, backbone, tokens, tagged, probes, out) -> None:
    # The outer loop and its early stopping stay in one place (~70 lines with the setup).
    if isinstance(params, dict) and params.get("inner_steps") == 0:
        raise InputError("camels.inner_steps: 0 inner steps leave the base model unchanged, so the weights get no "
                         "gradient; use >= 1")
    cfg = schema.fill("camels", params, where="camels params")
    dev = device()  # the GPU when there is one, as in every model stage
    if dev.type == "cuda":  # deterministic cuBLAS (use_deterministic_algorithms below) needs this
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(cfg["seed"])
    torch.use_deterministic_algorithms(True)
    model, wmodel, tokenizer = load_models(base, backbone, cfg, dev)
    toks = load_tokens(tokens, tokenizer)
    data = episodes_data(toks, tokenizer, tagged, probes, cfg)
    K = cfg["inner_steps"]
    rng = np.random.default_rng(cfg["seed"])
    vrng = np.random.default_rng([cfg["seed"], 1])
    val = [make_episode([data["val"][i] for i in vrng.choice(len(data["val"]), min(K, len(data["val"])),
                                                           replace=False)], data["other"], cfg, vrng, dev)
           for _ in range(cfg["val_episodes"])]
    theta0 = {k: v.detach() for k, v in model.named_parameters()}
    opt = torch.optim.Adam(wmodel.parameters(), lr=cfg["outer_lr"])

    def validate():
        totals = np.zeros(3)
        for ep in val:
            with torch.no_grad():
                loss, qa, kl, _ = outer_loss(wmodel, model, theta0, ep, cfg)
            totals += [float(loss), float(qa), float(kl)]
        return totals / len(val)

    tracker = tracking.Run("camels", seed=cfg["seed"], config=cfg)
    tracker.begin()
    started = time.time()
    curve, best, best_state, bad, stop = [], None, None, 0, "outer_steps"
    params, seen, train_losses = theta0, 0, []
    for step in range(cfg["outer_steps"] + 1):
        if step % cfg["val_every"] == 0 or step == cfg["outer_steps"]:
            v = validate()
            curve.append({"step": step, "train_loss": float(np.mean(train_losses)) if train_losses else None,
                          "val_loss": v[0], "val_qa": v[1], "val_kl": v[2]})
            train_losses = []
            tracker.log({"val/loss": v[0], "val/qa": v[1], "val/kl": v[2]}, step)
            log.info("metatrain step %d: val loss %.4f (qa %.4f, kl %.5f)", step, *v)
            if best is None or v[0] < best[1] - 1e-6:
                best, best_state, bad = (step, v[0]), copy.deepcopy(wmodel.state_dict()), 0
            else:
                bad += 1
                if bad >= cfg["patience"]:
                    stop = f"early stop: no improvement in {bad} validations"
                    break
        if step == cfg["outer_steps"]:
            break
        docs = [data["train"][i] for i in rng.choice(len(data["train"]), min(K, len(data["train"])), replace=False)]
        loss, qa, kl, after = outer_loss(wmodel, model, params, make_episode(docs, data["other"], cfg, rng, dev), cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        train_losses.append(float(loss.detach()))
        tracker.log({"outer/loss": train_losses[-1], "outer/qa": float(qa.detach()), "outer/kl": float(kl.detach())},
                    step + 1)
        seen += len(docs)
        params = theta0 if seen % cfg["reset_every"] < len(docs) else {k: v.detach() for k, v in after.items()}
    wmodel.load_state_dict(best_state)
    wmodel.cpu()  # saved and summarised from the CPU: head.pt loads anywhere

    vdocs = data["val"]
    learned = what_was_learned(wmodel, tokenizer, vdocs)
    metrics = {"best_step": best[0], "best_val_loss": best[1], "stop": stop, "steps_run": curve[-1]["step"],
               "inner_steps": K, "train_docs": len(data["train"]), "val_docs": len(vdocs),
               "kl_docs_pool": len(data["other"]), "time_s": round(time.time() - started, 1),
               "object_vs_other_weight": learned.get("all")}
    with atomic_output(out) as tmp:
        wmodel.save(tmp, tokenizer)
        pd.DataFrame(curve).to_csv(tmp / "curve.csv", index=False)
        write_json(metrics, tmp / "metrics.json")
    tracker.finish(metrics)
    log.info("metatrain: best val loss %.4f at step %d (%s) in %.0f s; weight on object tokens vs others: %s",
             best[1], best[0], stop, metrics["time_s"], learned.get("all"))
