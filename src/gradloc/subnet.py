"""Stage `gradloc subnet`: knowledge-critical subnetworks (Bayazit et al. 2024; methods §5).

The base model is frozen; we learn a binary mask m over the weight matrices of chosen
blocks' attention and MLP. The *remaining* model uses w * (1 - m). Its loss:

    1.5 x KL(uniform || p_rest) on the target facts' object tokens   (forget them)
  + 1.0 x KL(p_full || p_rest) on the control facts' object tokens   (keep them)
  + 1.0 x KL(p_full || p_rest) on base text                         (keep the LM)
  + lambda x expected density mean(sigmoid(s))                      (keep m small)

m is sampled with logistic noise, hard-thresholded at 0.5 and passed back with the
straight-through estimator (temperature 1); at evaluation m = sigmoid(s) > 0.5.
Adam on the mask logits s only (the LM's weights never change), through the shared
engine (`engine.fit`: accelerate, get_scheduler with warm-up).

Knowledge sets, per update period k in `periods`: `outdated_P{k}` = the T0 facts that
change in period k; and once, for the first listed period k, `unchanged_P{k}` = T0 facts
still true after period k. Control facts are other unchanged facts, disjoint from both;
the LM control and the held-out perplexity use disjoint samples of base (T0) text.

Where the facts come from (`facts`): `corpus` (default) takes them from the corpus'
triples (`facts.fact_sets`: `outdated` and `unchanged` of period k), about subjects that
no evaluation probe (any set, any period >= 1) asks about, worded like the probes
(`facts.prefix_function`). So the period's changed facts fall in two parts: the facts of
probed subjects, on which the methods are evaluated, and those of the others, on which
the masks train; the split is the world's own, seeded (in the synthetic world the
"probe-worded" half of the entities, `data.synthetic`, is never probed). The probes
folder is read for its subject ids only, and to count how many evaluation probes share a
subject or a fact with the mask's facts (`metrics.json`; 0 by construction). `probes`:
the old way, the evaluation probes' own `outdated` and `unchanged` sets; `metrics.json`
then says `oracle: true` and the report labels the subnet methods "(oracle)".

Outputs (docs/formats.md): `masks/<set>_seed<s>.npz` (bit-packed, `numpy.packbits`),
`density.csv` (per layer and per module), `removal.csv` (the subnetwork removed, a
random mask of the same per-tensor density removed, nothing removed), `metrics.json`.
"""

from __future__ import annotations

import copy
import logging
import math
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from . import engine, schema, tracking
from .io import InputError, atomic_output, read_json, read_table, write_json
from .models import checkpoint_dir, find_blocks, layer_units, load_model, max_positions
from .scoring import encode_probe, ids_logprob, pad_batch, perplexity, score_probes, summarize
from .tokenfiles import load as load_tokens

log = logging.getLogger(__name__)

# TGL knowledge type each mask's target set is compared with (report, localization).


# --- which weights the mask covers --------------------------------------------------------

def mask_targets(model: nn.Module, blocks=None, granularity: str = "weight") -> dict[str, tuple]:
    """name -> (unit e.g. `block.3.attn`, layer, mask shape) for every weight matrix of
    the chosen blocks' attention and MLP. `neuron`: one mask entry per output unit of a
    matrix (a row of nn.Linear's weight, a column of GPT-2's Conv1D)."""
    n = len(find_blocks(model)[1])
    chosen = range(n) if blocks is None else blocks
    if any(b < 0 or b >= n for b in chosen):
        raise InputError(f"subnet.blocks {list(chosen)}: the model has blocks 0..{n - 1}")
    params, modules = dict(model.named_parameters()), dict(model.named_modules())
    out = {}
    for unit, names in layer_units(model, "module").items():
        parts = unit.split(".")
        if len(parts) != 3 or parts[2] not in ("attn", "mlp") or int(parts[1]) not in chosen:
            continue
        for name in names:
            p = params[name]
            if p.dim() != 2:
                continue  # biases and norms stay
            shape = tuple(p.shape)
            if granularity == "neuron":
                owner = modules[name.rsplit(".", 1)[0]]
                shape = (shape[0], 1) if isinstance(owner, nn.Linear) else (1, shape[1])
            out[name] = (unit, int(parts[1]), shape)
    if not out:
        raise InputError("subnet: no attention or MLP weight matrices in the chosen blocks")
    return out


def remaining_weights(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """w * (1 - m) for every masked tensor (m broadcasts for neuron masks)."""
    params = dict(model.named_parameters())
    return {name: params[name] * (1 - m) for name, m in masks.items()}


def straight_through(logits: torch.Tensor, temperature: float = 1.0, noise: bool = True) -> torch.Tensor:
    """Hard 0/1 sample forwards, the sigmoid's gradient backwards."""
    s = logits
    if noise:
        u = torch.rand_like(s).clamp(1e-6, 1 - 1e-6)
        s = s + torch.log(u) - torch.log1p(-u)  # logistic noise
    soft = torch.sigmoid(s / temperature)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + (soft - soft.detach())  # exactly 0 or 1 forwards


# --- bit-packed masks ------------------------------------------------------------------------

def pack(masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{name: packbits(flat 0/1)} plus `<name>.shape` entries, for np.savez."""
    out = {}
    for name, m in masks.items():
        out[name] = np.packbits(np.asarray(m, dtype=bool).ravel())
        out[name + ".shape"] = np.asarray(m.shape, dtype=np.int64)
    return out


class MaskedLM(nn.Module):
    """The trainable mask logits; the frozen LM is held outside the module tree, so the
    engine's `model.train()` never turns its dropout on and the optimizer sees the logits only."""

    def __init__(self, lm: nn.Module, targets: dict[str, tuple], params: dict, total_steps: int):
        super().__init__()
        object.__setattr__(self, "lm", lm)
        self.names = list(targets)
        init = math.log(params["init"] / (1 - params["init"]))
        self.logits = nn.ParameterList([nn.Parameter(torch.full(targets[n][2], init)) for n in self.names])
        self.p, self.total, self.step = params, total_steps, 0

    def sample(self) -> dict[str, torch.Tensor]:
        return {n: straight_through(s) for n, s in zip(self.names, self.logits)}

    def density(self) -> torch.Tensor:
        """Expected density, over all masked weights (a neuron mask entry weighs its row)."""
        params = dict(self.lm.named_parameters())
        num = sum(torch.sigmoid(s).expand_as(params[n]).sum() for n, s in zip(self.names, self.logits))
        return num / sum(params[n].numel() for n in self.names)

    def penalty_weight(self) -> float:
        """lambda: constant for the first half, then linear from start to end."""
        p, half = self.p, self.total / 2
        frac = max(0.0, (self.step - half) / max(half, 1))
        return p["lambda_start"] + min(frac, 1.0) * (p["lambda_end"] - p["lambda_start"])

    def forward(self, batch: dict) -> torch.Tensor:
        weights = remaining_weights(self.lm, self.sample())
        logp = F.log_softmax(functional_call(self.lm, weights, (batch["input_ids"],),
                                             {"attention_mask": batch["attention_mask"]}).logits[:, :-1].float(), -1)
        obj = batch["object"][:, 1:].float()  # 1 where the next token is an object token
        tgt = batch["is_target"].float()[:, None] * obj
        ctl = (1 - batch["is_target"].float())[:, None] * obj
        # KL(uniform || p) = -log V - mean_v log p_v
        kl_uniform = -math.log(logp.shape[-1]) - logp.mean(-1)
        kl_full = (batch["ref"].exp() * (batch["ref"] - logp)).sum(-1)
        lm_logp = F.log_softmax(functional_call(self.lm, weights, (batch["lm_ids"],)).logits[:, :-1].float(), -1)
        lm_kl = (batch["lm_ref"].exp() * (batch["lm_ref"] - lm_logp)).sum(-1).mean()
        loss = (self.p["target_weight"] * (kl_uniform * tgt).sum() / tgt.sum().clamp(min=1)
                + self.p["control_weight"] * (kl_full * ctl).sum() / ctl.sum().clamp(min=1)
                + self.p["lm_weight"] * lm_kl + self.penalty_weight() * self.density())
        self.step += 1
        return loss


class WholeBatch(torch.utils.data.Dataset):
    """Every step sees the whole (small) fact set and LM-control set."""

    def __init__(self, batch: dict):
        self.batch = batch

    def __getitems__(self, index):
        return self.batch


@torch.no_grad()
def reference_logprobs(lm, ids, mask=None) -> torch.Tensor:
    return F.log_softmax(lm(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)


def fact_batch(lm, tokenizer, target: pd.DataFrame, control: pd.DataFrame, lm_seqs: list, device) -> dict:
    max_len = max_positions(lm)
    seqs, objs = [], []
    for df in (target, control):
        for prefix, obj in zip(df["prefix"].fillna(""), df["object"].astype(str)):
            ids, k = encode_probe(tokenizer, prefix, obj, max_len)
            seqs.append(ids)
            objs.append(k)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, att = pad_batch(seqs, pad_id, device)
    obj = torch.zeros_like(ids)
    for i, (s, k) in enumerate(zip(seqs, objs)):
        obj[i, len(s) - k:len(s)] = 1
    is_target = torch.tensor([1] * len(target) + [0] * len(control), device=device)
    lm_ids = torch.tensor(np.stack(lm_seqs), device=device)
    return {"input_ids": ids, "attention_mask": att, "object": obj, "is_target": is_target,
            "ref": reference_logprobs(lm, ids, att), "lm_ids": lm_ids, "lm_ref": reference_logprobs(lm, lm_ids),
            "labels": torch.where(obj.bool(), ids, torch.full_like(ids, -100))}


def train_mask(lm, tokenizer, targets, target, control, lm_seqs, params: dict, seed: int, tracker=None):
    """(hard mask per tensor as bool numpy arrays, training log rows, seconds)."""
    torch.manual_seed(seed)
    accelerator = engine.make_accelerator("no")
    lm.to(accelerator.device).eval().requires_grad_(False)
    batch = fact_batch(lm, tokenizer, target, control, lm_seqs, accelerator.device)
    steps = params["steps"]
    masked = MaskedLM(lm, targets, params, steps)
    optimizer = torch.optim.Adam(masked.parameters(), lr=params["lr"])
    scheduler = engine.make_scheduler(optimizer, "constant_with_warmup", steps,
                                      int(params["warmup_ratio"] * steps), accelerator.num_processes)
    batches = engine.StepBatches(lambda step: torch.zeros(1, dtype=torch.long), steps, 1, accelerator.num_processes)
    start = time.time()
    masked, _, progress = engine.fit(accelerator, masked, optimizer, scheduler, WholeBatch(batch), batches,
                                     grad_clip=None, log_every=max(1, steps // 10), desc="subnet mask",
                                     loss_fn=lambda model, b: model(b), tracker=tracker)
    masked = accelerator.unwrap_model(masked)
    hard = {n: (s.detach() > 0).cpu().numpy() for n, s in zip(masked.names, masked.logits)}
    return hard, progress["log"], time.time() - start


# --- removal and density ---------------------------------------------------------------------

def expand(lm, masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Neuron masks broadcast to their weight's shape."""
    params = dict(lm.named_parameters())
    return {n: np.broadcast_to(m, tuple(params[n].shape)) for n, m in masks.items()}


def removed(lm, masks: dict[str, np.ndarray]):
    """A copy of the model with the masked weights set to 0."""
    out = copy.deepcopy(lm)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(1 - torch.tensor(np.asarray(m), dtype=params[n].dtype, device=params[n].device))
    return out


def random_like(masks: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """As many masked entries per tensor as `masks`, at random places."""
    rng = np.random.default_rng(seed)
    out = {}
    for n, m in masks.items():
        flat = np.zeros(m.size, dtype=bool)
        flat[rng.choice(m.size, int(m.sum()), replace=False)] = True
        out[n] = flat.reshape(m.shape)
    return out


def density_table(lm, targets: dict, masks: dict[str, np.ndarray]) -> pd.DataFrame:
    """granularity (block/module), unit, layer, masked, weights, density."""
    full = expand(lm, masks)
    rows = [{"unit": targets[n][0], "layer": targets[n][1], "masked": int(m.sum()), "weights": int(m.size)}
            for n, m in full.items()]
    per_module = pd.DataFrame(rows).groupby(["unit", "layer"], as_index=False, sort=False)[["masked", "weights"]].sum()
    per_block = per_module.assign(unit="block." + per_module["layer"].astype(str)).groupby(
        ["unit", "layer"], as_index=False, sort=False)[["masked", "weights"]].sum()
    out = pd.concat([per_block.assign(granularity="block"), per_module.assign(granularity="module")])
    out["density"] = out["masked"] / out["weights"]
    return out[["granularity", "unit", "layer", "masked", "weights", "density"]].reset_index(drop=True)


def removal_metrics(lm, tokenizer, target, control, heldout, batch_size: int) -> dict:
    scores = score_probes(lm, tokenizer, pd.concat([target.assign(set="target"), control.assign(set="control")]),
                          batch_size, progress=False)
    s = summarize(scores)
    heldout_ppl = perplexity(*ids_logprob(lm, tokenizer, heldout, batch_size, progress=False))
    return {"target_object_ppl": s["target"]["object_ppl"], "target_top1": s["target"]["top1"],
            "control_object_ppl": s["control"]["object_ppl"], "control_top1": s["control"]["top1"],
            "heldout_ppl": heldout_ppl}


# --- the stage --------------------------------------------------------------------------------

def knowledge_sets(params, probes_df: pd.DataFrame, known: set | None) -> tuple[dict, pd.DataFrame]:
    """({set name: target facts}, control facts) from probe-like rows (`period`, `set`,
    `prefix`, `object`, `statement`). Facts are deduplicated by statement; with `known`,
    only statements the base model answers (top-1) are kept."""
    rng = np.random.default_rng(params["sample_seed"])

    def facts(df):
        df = df.drop_duplicates("statement")
        return df[df["statement"].isin(known)] if known is not None else df

    def sample(df, n):
        return df.iloc[rng.permutation(len(df))[:n]] if len(df) > n else df

    sets, unchanged_pools = {}, {}
    for k in params["periods"]:
        pr = probes_df[probes_df["period"] == k]
        if pr.empty:
            raise InputError(f"subnet.periods: no {'probes' if params['facts'] == 'probes' else 'facts'} "
                             f"for period {k}")
        sets[f"outdated_P{k}"] = facts(pr[pr["set"] == "outdated"])
        unchanged_pools[k] = facts(pr[pr["set"] == "unchanged"])
    # control: unchanged in every period, shared by all sets; the unchanged targets come
    # from what is left.
    common = set.intersection(*(set(u["statement"]) for u in unchanged_pools.values()))
    pool = next(iter(unchanged_pools.values()))
    pool = pool[pool["statement"].isin(common)]
    pool = pool.iloc[rng.permutation(len(pool))]
    control = pool.iloc[:params["n_control"]]
    # one unchanged target set, of the first listed period: the T0 facts unchanged after
    # period 1 and after period 2 are nearly the same facts, and each set costs a mask per seed
    first = params["periods"][0]
    u = unchanged_pools[first]
    sets[f"unchanged_P{first}"] = u[~u["statement"].isin(control["statement"])]
    sets = {name: sample(df, params["n_facts"]) for name, df in sets.items()}
    for name, df in {**sets, "control": control}.items():
        if len(df) < 2:
            where = ("" if params["facts"] == "probes" else
                     " (from the corpus' triples, about subjects no evaluation probe asks about; set "
                     "subnet.facts: probes to train on the evaluation probes, labelled oracle)")
            raise InputError(f"subnet: only {len(df)} {name} facts{' the base model knows' if known else ''}{where}")
    return sets, control


def corpus_facts(params, corpus, probes_df: pd.DataFrame) -> pd.DataFrame:
    """Probe-like rows (period, set, subject_id, relation, prefix, object, statement) of
    the periods' `outdated` and `unchanged` facts in the corpus' triples, about subjects
    that no evaluation probe (period >= 1) asks about, in the probes' wording."""
    from pathlib import Path

    from .facts import fact_sets, prefix_function, read_triples

    triples = read_triples(corpus)
    prefix = prefix_function(read_json(Path(corpus) / "manifest.json").get("source", ""))
    probed = set(probes_df.loc[probes_df["period"] >= 1, "subject_id"].astype(str))
    rows = []
    for k in params["periods"]:
        sets = fact_sets(triples, k)
        for name in ("outdated", "unchanged"):
            f = sets[name][~sets[name]["subject_id"].isin(probed)]
            rows += [{"period": k, "set": name, "subject_id": s, "relation": r, "prefix": prefix(n, r), "object": o}
                     for s, n, r, o in f[["subject_id", "subject", "relation", "object"]].itertuples(index=False)]
        if not any(r["period"] == k and r["set"] == "outdated" for r in rows):
            raise InputError(f"subnet: {Path(corpus) / 'triples.parquet'}: no facts of period {k} that change "
                             "about subjects without an evaluation probe, so no mask can train on facts the methods "
                             "are not evaluated on; set subnet.facts: probes to train on the evaluation probes "
                             "(the report then labels the subnet methods oracle)")
    df = pd.DataFrame(rows)
    return df.assign(statement=df["prefix"] + " " + df["object"])


def overlap(probes_df: pd.DataFrame, mask_facts: pd.DataFrame) -> dict:
    """How many evaluation probes (period >= 1) share a subject, or a whole fact, with the
    facts the masks train on (targets and control)."""
    ev = probes_df[probes_df["period"] >= 1]
    key = list(zip(mask_facts["subject_id"].astype(str), mask_facts["relation"].astype(str),
                   mask_facts["object"].astype(str)))
    facts_ = set(key)
    return {"eval_probes_sharing_a_fact": int(sum(
                (s, r, o) in facts_ for s, r, o in zip(ev["subject_id"].astype(str), ev["relation"].astype(str),
                                                      ev["object"].astype(str)))),
            "eval_probes_sharing_a_subject": int(ev["subject_id"].astype(str).isin({k[0] for k in key}).sum())}


def mask_facts(params: dict, lm, tokenizer, probes_df: pd.DataFrame, corpus):
    """(the knowledge sets {name: facts}, the control facts, their overlap with the
    evaluation probes (none unless subnet.facts: probes), whether they are the probes)."""
    oracle = params["facts"] == "probes"
    if oracle:
        fact_df = probes_df.assign(probe_id=probes_df.index.astype(str))
        log.warning("subnet.facts: probes: the masks train on the evaluation probes (oracle)")
    elif not corpus:
        raise InputError("subnet: subnet.facts: corpus needs --corpus (the corpus folder: its triples)")
    else:
        fact_df = corpus_facts(params, corpus, probes_df)
        fact_df = fact_df.assign(probe_id=fact_df.index.astype(str))
    known = None
    if params["known_only"]:
        pool = fact_df[fact_df["period"].isin(params["periods"])].drop_duplicates("statement")
        scores = score_probes(lm, tokenizer, pool, params["batch_size"], progress=False)
        known = set(pool["statement"][scores["top1"].to_numpy()])
    sets, control = knowledge_sets(params, fact_df, known)
    shared = overlap(probes_df, pd.concat([*sets.values(), control]))
    if not oracle and any(shared.values()):  # cannot happen: the subjects were excluded
        raise AssertionError(f"subnet: mask facts overlap the evaluation probes: {shared}")
    log.info("subnet: facts from the %s: %s, control %d; %s", "evaluation probes (oracle)" if oracle else
             "corpus' triples", {n: len(df) for n, df in sets.items()}, len(control), shared)
    return sets, control, shared, oracle


def base_blocks(toks, params: dict) -> tuple[list[np.ndarray], list[list[int]]]:
    """(LM-control blocks, held-out blocks) of base text: T0 documents in a seeded order,
    joined with EOS and cut into seq_len-token blocks (most documents are shorter)."""
    base = toks.select(split="base")
    order = np.random.default_rng(params["sample_seed"]).permutation(len(base))
    n_lm, n_held = params["n_lm"], params["n_heldout"]
    lead = list(toks.meta["leading_special_ids"])
    width = params["seq_len"] - len(lead)
    stream, docs = [], []
    for d in toks.docs_of(base.iloc[order]):
        stream += d.tolist() + [toks.meta["eos_id"]]
        while len(stream) >= width and len(docs) < n_lm + n_held:
            docs.append(np.asarray(lead + stream[:width]))
            stream = stream[width:]
        if len(docs) == n_lm + n_held:
            break
    if len(docs) < n_lm + n_held:
        raise InputError(f"subnet: the base text gives {len(docs)} blocks of {params['seq_len']} tokens; "
                         f"n_lm + n_heldout = {n_lm + n_held}")
    return docs[:n_lm], [d.tolist() for d in docs[n_lm:n_lm + n_held]]


def run(params: dict, model, probes, tokens, out, corpus=None) -> None:
    from pathlib import Path

    params = schema.fill("subnet", params, where="subnet")
    started = time.time()
    lm, tokenizer = load_model(checkpoint_dir(model))
    lm.eval().requires_grad_(False)
    probes_df = read_table(Path(probes) / "probes.parquet",
                           ["period", "set", "subject_id", "relation", "prefix", "object", "statement"])
    sets, control, shared, oracle = mask_facts(params, lm, tokenizer, probes_df, corpus)
    lm_seqs, heldout = base_blocks(load_tokens(tokens, tokenizer), params)

    targets = mask_targets(lm, params["blocks"], params["granularity"])
    n_weights = sum(int(np.prod(p.shape)) for n, p in lm.named_parameters() if n in targets)
    removal, density, logs, runs = [], [], [], []
    with atomic_output(out) as tmp:
        (tmp / "masks").mkdir()
        for name, target in sets.items():
            kind, period = name.split("_P")
            before = removal_metrics(lm, tokenizer, target, control, heldout, params["batch_size"])
            for seed in params["seeds"]:
                tracker = tracking.Run("subnet", kind, seed, period, config={**params, "knowledge_set": name})
                hard, log_rows, seconds = train_mask(lm, tokenizer, targets, target, control, lm_seqs, params, seed,
                                                     tracker)
                np.savez(tmp / "masks" / f"{name}_seed{seed}.npz", **pack(hard))
                full = expand(lm, hard)
                ident = {"knowledge_set": name, "kind": kind, "period": int(period), "seed": seed}
                for mask_name, m in (("none", None), ("subnet", full), ("random", random_like(full, seed))):
                    metrics = before if m is None else removal_metrics(
                        removed(lm, m), tokenizer, target, control, heldout, params["batch_size"])
                    removal.append({**ident, "mask": mask_name, **metrics})
                density.append(density_table(lm, targets, hard).assign(**ident))
                logs += [{**ident, **row} for row in log_rows]
                frac = sum(int(m.sum()) for m in full.values()) / n_weights
                runs.append({**ident, "density": frac, "steps": params["steps"], "train_time_s": seconds,
                             "n_target": len(target), "n_control": len(control)})
                tracker.finish({**runs[-1], **{f"{r['mask']}.{k}": v for r in removal[-3:] for k, v in r.items()
                                                 if k not in ident and k != "mask"}})
                log.info("subnet %s seed %d: density %.4f (%.0f s); %s", name, seed, frac, seconds,
                         {k: round(v, 3) for k, v in removal[-2].items() if k not in ident and k != "mask"})
        pd.DataFrame(removal).to_csv(tmp / "removal.csv", index=False)
        density_df = pd.concat(density, ignore_index=True)
        density_df[["knowledge_set", "kind", "period", "seed", *density_df.columns[:6]]].to_csv(
            tmp / "density.csv", index=False)
        pd.DataFrame(logs).to_csv(tmp / "train_log.csv", index=False)
        write_json({"params": params, "masked_weights": n_weights, "n_heldout": len(heldout), "n_lm": len(lm_seqs),
                    "facts": params["facts"], "oracle": oracle,
                    "n_facts": {**{n: len(df) for n, df in sets.items()}, "control": len(control)}, **shared,
                    "runs": runs, "wall_time_s": time.time() - started}, tmp / "metrics.json")
    log.info("subnet: %d sets x %d seeds in %.0f s -> %s", len(sets), len(params["seeds"]),
             time.time() - started, out)
