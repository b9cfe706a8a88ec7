"""Stage `gradloc train`: continual pretraining of one period's diff.

The period's diff documents come from the token files (`gradloc tokens`), joined with
EOS and cut into `seq_len` blocks (nanoGPT style). Each epoch shuffles them (plus
replayed base blocks for Mix-Review) with a generator seeded by (seed, epoch), so the
data order is a pure function of the two and a resumed run skips exactly the batches it
had consumed. The loop is `gradloc.engine.fit`; what trains and how (frozen layers, ALR
groups, LoRA, K-Adapter, RecAdam) comes from `gradloc.methods`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import engine, methods, modelcard, schema, tracking
from .io import InputError, as_list, atomic_output, write_json
from .methods import augment, replay
from .models import max_positions
from .tokens import load as load_tokens

log = logging.getLogger(__name__)

LOG_COLUMNS = ["step", "epoch", "loss", "lr", "tokens_per_s"]


def settings(params: dict) -> dict:
    """Train-wide settings (schema defaults filled in) with the method's own `lr` /
    `epochs` on top."""
    unknown = set(params) - {"name", "common", "method"}
    if unknown:
        raise InputError(f"train params: unknown top-level key(s) {sorted(unknown)}; expected name, common, method")
    common = {k: v for k, v in (params.get("common") or {}).items() if k not in ("methods", "seeds", "group_seeds")}
    cfg = schema.fill("train", common, where="train", ignore_required=True)
    cfg.pop("seeds", None)
    cfg.pop("group_seeds", None)
    method = methods.resolve_method(params.get("method"))
    cfg.update({k: method[k] for k in ("lr", "epochs") if k in method})
    return {**cfg, "name": params.get("name", "method"), "method": method}


# --- data -------------------------------------------------------------------------------

def cut_blocks(docs: list[np.ndarray], seq_len: int, pad_id: int,
               weights: list[np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """The documents concatenated and cut into [n, seq_len] blocks (nanoGPT style); the
    tail block is padded, its padding labelled -100 so no token is lost. With per-token
    `weights` (one array per document), a `weights` block cut the same way (padding 0)."""
    ids = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
    n = max(1, math.ceil(len(ids) / seq_len))
    input_ids = np.full(n * seq_len, pad_id, dtype=np.int64)
    labels = np.full(n * seq_len, -100, dtype=np.int64)
    input_ids[:len(ids)] = ids
    labels[:len(ids)] = ids
    out = {"input_ids": torch.from_numpy(input_ids.reshape(n, seq_len)),
           "labels": torch.from_numpy(labels.reshape(n, seq_len))}
    if weights is not None:
        w = np.zeros(n * seq_len, dtype=np.float32)
        w[:len(ids)] = np.concatenate(weights) if weights else np.zeros(0, dtype=np.float32)
        out["weights"] = torch.from_numpy(w.reshape(n, seq_len))
    return out


def with_eos(docs: list[np.ndarray], eos: int) -> list[np.ndarray]:
    return [np.append(d, eos) for d in docs]


class Epochs:
    """The blocks of each epoch in training order, built on demand (one epoch cached):
    diff blocks plus, for replay, `ratio` x as many fresh base blocks (`source` 0 = diff,
    1 = replay), shuffled by (seed, epoch). Indexed by a global row epoch * size + i."""

    def __init__(self, diff: dict, base_docs: list[np.ndarray], cfg: dict, seed: int, pad_id: int):
        self.diff, self.base_docs, self.cfg, self.seed, self.pad_id = diff, base_docs, cfg, seed, pad_id
        self.n_diff = len(diff["input_ids"])
        self.n_replay = round(cfg["method"]["replay"]["ratio"] * self.n_diff) if "replay" in cfg["method"] else 0
        self.size = self.n_diff + self.n_replay
        self._epoch, self._data = None, None

    def build(self, epoch: int) -> dict:
        data = {**self.diff, "source": torch.zeros(self.n_diff, dtype=torch.long)}
        if self.n_replay:
            base = replay.blocks(self.base_docs, self.cfg["seq_len"], self.n_replay,
                                 np.random.default_rng([self.seed, epoch, 1]), self.pad_id)
            if "weights" in data:  # replayed base text keeps the plain loss
                base["weights"] = (base["labels"] != -100).float()
            base["source"] = torch.ones(self.n_replay, dtype=torch.long)
            data = {k: torch.cat([data[k], base[k]]) for k in data}
        order = torch.from_numpy(np.random.default_rng([self.seed, epoch, 0]).permutation(self.size))
        return {k: v[order] for k, v in data.items()}

    def __getitems__(self, rows: list[int]) -> dict:
        epoch = rows[0] // self.size
        if epoch != self._epoch:
            self._epoch, self._data = epoch, self.build(epoch)
        idx = torch.as_tensor(rows) - epoch * self.size
        return {k: v[idx] for k, v in self._data.items() if k != "source"}


def period_docs(tokens, period: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(diff documents of `period`'s train split, base documents), in file order."""
    diff = tokens.select(period=period, split="train")
    if diff.empty:
        raise InputError(f"{tokens.path}/docs.parquet: no rows with period == {period} and split == 'train'")
    return tokens.docs_of(diff), tokens.docs_of(tokens.select(split="base"))


# --- the stage ------------------------------------------------------------------------------

def run(params: dict, init, tokens, selection=None, period=1, seed=0, state=None, out="train", gpus=0,
        attention=None, tagged=None, probes=None, weighting_model=None, subnet=None, corpus=None):
    """Train one method on one period: from `init` into `out` (metrics returned). With a
    list of seeds, one training per seed in turn, in this process (the workflow's
    `train.group_seeds`: a small model's job is half torch/transformers imports); `init`
    (one for all, or one per seed), `state` and `out` are then lists in seed order.
    `corpus`: its triples give the fact objects of token weighting's marks (`probes`, the
    old input, is refused: training never reads the evaluation probes)."""
    from .attention import no_probes

    settings(params)  # bad params are named before any input is looked at
    no_probes(probes, "train")
    if not isinstance(seed, (list, tuple)):
        return train_one(params, init, tokens, selection, period, seed, state, out, gpus, attention, tagged, corpus,
                         weighting_model, subnet)
    n = len(seed)
    inits, outs = as_list(init), as_list(out)
    states = as_list(state) if state else [None] * n
    if len(inits) == 1:
        inits = inits * n
    for name, values in (("--init", inits), ("--out", outs), ("--state", states)):
        if len(values) != n:
            raise InputError(f"train: {n} seed(s) but {len(values)} {name} folder(s); give one per seed "
                             "(--init may also be one for all)")
    return [train_one(params, i, tokens, selection, period, s, st, o, gpus, attention, tagged, corpus,
                      weighting_model, subnet) for s, i, st, o in zip(seed, inits, states, outs)]


def train_one(params: dict, init, tokens, selection, period, seed, state, out, gpus, attention, tagged, corpus,
              weighting_model, subnet) -> dict:
    from accelerate.utils import set_seed

    cfg = settings(params)
    period, seed = int(period), int(seed)
    accelerator = engine.make_accelerator(cfg["precision"], cfg["grad_accum"])
    engine.check_gpus(int(gpus or 0), accelerator.num_processes)
    set_seed(seed)
    # fp32 master weights; mixed precision is autocast on top, never bf16 weights.
    model, tokenizer = methods.load_checkpoint(init, dtype=torch.float32)
    max_len = max_positions(model)
    if max_len and cfg["seq_len"] > max_len:
        raise InputError(f"train params: seq_len {cfg['seq_len']} exceeds the model's {max_len} positions")
    prepared = methods.prepare(model, cfg["method"], selection, seed, subnet=subnet, period=period)

    toks = load_tokens(tokens, tokenizer)
    eos, pad_id = toks.meta["eos_id"], toks.meta["pad_id"] or 0
    if eos is None:
        raise InputError("tokenizer has neither an EOS nor a pad token to separate documents")
    diff_docs, base_docs = period_docs(toks, period)
    if "replay" in cfg["method"] and not base_docs:
        raise InputError(f"replay: {toks.path} has no split == 'base' documents to replay")
    extra, masks = {}, None
    rows_p = toks.select(period=period, split="train")
    if "permute_objects" in cfg["method"]:  # the negative control: the same text with wrong facts
        diff_docs, extra["permute_objects"] = permuted(rows_p, cfg["method"]["permute_objects"], corpus, tagged,
                                                       tokenizer, period, diff_docs[0].dtype)
    types, marked = rows_p["knowledge_type"].astype(str).tolist(), None
    tw = cfg["method"].get("token_weighting")
    if tw and tagged:  # entity/object tokens: salient_spans' weights and the weights' summary
        from .attention import marks, spans_of

        texts, spans = spans_of(rows_p, tagged, corpus, period)
        marked = marks(tokenizer, texts, diff_docs, spans)
    if "augment" in cfg["method"]:  # token-dropout copies beside each document (methods/augment.py)
        diff_docs, extra, masks = augmented(diff_docs, cfg["method"]["augment"], attention, toks, tokenizer, seed,
                                            period)
        types = with_copies(types, masks, lambda t, k: t)
        marked = None if marked is None else with_copies(marked, masks, lambda m, k: m[k])
    weights, files = None, {}
    if tw:
        weights, summary, files = token_weights(tw, with_eos(diff_docs, eos), marked, types, tokenizer, toks,
                                                weighting_model)
        extra["token_weighting"] = summary
    diff = cut_blocks(with_eos(diff_docs, eos), cfg["seq_len"], pad_id, weights)
    data = Epochs(diff, with_eos(base_docs, eos), cfg, seed, pad_id)
    W, A, B = accelerator.num_processes, cfg["grad_accum"], cfg["batch_size"]
    steps_per_epoch = math.ceil(data.size / (B * W * A))
    total_steps = steps_per_epoch * cfg["epochs"]

    # An epoch wraps around to a multiple of processes x grad_accum, so that every step
    # splits evenly into micro-batches.
    padded = data.size + (-data.size) % (W * A)

    def rows(step: int) -> torch.Tensor:
        epoch, s = divmod(step, steps_per_epoch)
        return torch.arange(s * B * W * A, min((s + 1) * B * W * A, padded)) % data.size + epoch * data.size

    optimizer = methods.make_optimizer(prepared, cfg["lr"], cfg["weight_decay"])
    scheduler = engine.make_scheduler(optimizer, cfg["schedule"], total_steps, int(cfg["warmup_ratio"] * total_steps),
                                      W)
    fp = engine.fingerprint(cfg, [init, tokens, selection, attention, tagged, corpus, weighting_model, subnet], period,
                            seed, W)
    tracker = tracking.Run("train", cfg["name"], seed, period, config={**cfg, "period": period, "seed": seed})
    model, optimizer, progress = engine.fit(
        accelerator, prepared.model, optimizer, scheduler, data, engine.StepBatches(rows, total_steps, A, W),
        grad_clip=cfg["grad_clip"], log_every=cfg["log_every"], desc=f"train {cfg['name']} P{period}",
        state=state, fp=fp, save_every=cfg["save_every"], epoch_of=lambda step: step // steps_per_epoch,
        tracker=tracker, save_every_minutes=cfg["save_every_minutes"])

    metrics = {}
    if accelerator.is_main_process:
        run_info = {"device": str(accelerator.device), "processes": W, "mixed_precision": accelerator.mixed_precision,
                    **{k: v for k, v in extra.items() if k != "augment.md"}}
        metrics = write_outputs(accelerator.unwrap_model(model), tokenizer, optimizer, prepared, cfg, progress,
                                total_steps, n_diff=data.n_diff, out=out, period=period, seed=seed, run_info=run_info,
                                files={**{k: v for k, v in extra.items() if k == "augment.md"}, **files}, init=init)
    tracker.finish(metrics)
    accelerator.wait_for_everyone()
    if state and accelerator.is_main_process:
        shutil.rmtree(state, ignore_errors=True)  # finished: the resumable state is spent
    return metrics


def augmented(docs, aug: dict, attention, toks, tokenizer, seed: int, period: int):
    """(documents with their token-dropout copies, {"augment": summary, "augment.md": text})."""
    from . import attention as scores_of

    if not attention:
        raise InputError("augment: needs --attention (the `gradloc attention` folder of this period)")
    scores = scores_of.load(attention, toks, period)
    protected = augment.protected_ids(tokenizer)
    out, masks = augment.apply(docs, scores, aug, protected, seed, period)
    summary, text = augment.inspect(docs, masks, scores["marked"], protected, aug, tokenizer)
    log.info("augment %s: %d documents -> %d (%s)", aug["kind"], len(docs), len(out), summary)
    return out, {"augment": summary, "augment.md": text}, masks


def permuted(rows, part: dict, corpus, tagged, tokenizer, period: int, dtype):
    """(the period's diff documents with the objects of its new and changed facts permuted
    within each relation, re-tokenized as `gradloc tokens` does; a summary). See
    methods/permute.py."""
    from .facts import fact_sets, read_triples
    from .io import read_table
    from .methods import permute

    if not corpus or not tagged:
        raise InputError("permute_objects: needs --corpus (the triples) and --tagged (texts and mentions)")
    sets = fact_sets(read_triples(corpus), period)
    changed = pd.concat([sets["updated"], sets["new"]], ignore_index=True)
    if changed.empty:
        raise InputError(f"{corpus}/triples.parquet: no new or changed facts in snapshot {period}: nothing to permute")
    mapping = permute.wrong_objects(changed, int(part["seed"]))
    seqs = read_table(Path(tagged) / "sequences.parquet", ["seq_id", "text"])
    text = dict(zip(seqs["seq_id"].astype(str), seqs["text"].astype(str)))
    mentions = read_table(Path(tagged) / "mentions.parquet", ["seq_id", "entity_id"])
    mentioned = mentions.groupby(mentions["seq_id"].astype(str))["entity_id"].agg(lambda x: set(map(str, x)))
    ids = rows["seq_id"].astype(str).tolist()
    texts, n = permute.permute_texts([text[i] for i in ids], [mentioned.get(i, set()) for i in ids], mapping)
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]  # as `gradloc tokens`
    docs = [np.asarray(e, dtype=dtype) for e in encoded]
    wrong = sum(t != w for t, w in mapping.values())
    summary = {"facts": len(mapping), "facts_made_wrong": wrong, "replacements": n,
               "documents_changed": sum(a != b for a, b in zip(texts, (text[i] for i in ids)))}
    if n == 0:
        raise InputError(f"permute_objects: no object of the period's {len(mapping)} new or changed facts occurs in "
                         f"a document mentioning its subject ({tagged}): the control would equal full")
    log.info("permute_objects P%d: %s", period, summary)
    return docs, summary


def with_copies(items: list, masks: list[list[np.ndarray]], cut) -> list:
    """A per-document list expanded like augment.apply's output: each item, then cut(item, mask) per copy."""
    out = []
    for x, m in zip(items, masks):
        out.append(x)
        out.extend(cut(x, k) for k in m)
    return out


def token_weights(part: dict, docs: list[np.ndarray], marked, types, tokenizer, toks, weighting_model):
    """(per-token weights of each document with its EOS, summary for metrics.json,
    {"weights.json": the summary and one document's weights, for the report})."""
    from .methods import weighting

    model = None
    marked_eos = None if marked is None else [np.append(m, 0) for m in marked]
    # Loading and running the weighting model must not move the RNG the training's dropout draws from.
    with torch.random.fork_rng(devices=[]):
        if part["kind"] == "camels":
            if not weighting_model:
                raise InputError("token_weighting camels: needs --weighting-model (the `gradloc metatrain` folder)")
            model, wtok = weighting.WeightingModel.load(weighting_model)
            weighting.check_same_tokenizer(tokenizer, wtok, str(weighting_model))
        weights = weighting.doc_weights(part, docs, marked_eos, model)
    summary = {"kind": part["kind"], **weighting.summary(weights, marked_eos, types)}
    log.info("token weighting %s: %s", part["kind"], summary)
    doc = weighting.example(weights, marked_eos, docs, tokenizer)
    return weights, summary, {"weights.json": json.dumps({**summary, "example": doc})}


def optimizer_state_bytes(optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if torch.is_tensor(v))


def write_outputs(model, tokenizer, optimizer, prepared, cfg, progress, total_steps, n_diff, out, period, seed,
                  run_info=None, files=None, init=None):
    params = {id(p): p for p in model.parameters()}.values()
    n_replay = round(cfg["method"]["replay"]["ratio"] * n_diff) if "replay" in cfg["method"] else 0
    metrics = {
        "method": cfg["name"], "method_config": cfg["method"], "period": period, "seed": seed,
        "trained_units": prepared.trained_units, "granularity": prepared.info["granularity"],
        # mask: subnet trains only the masked entries of its tensors
        "trainable_params": prepared.sparse.trainable() if prepared.sparse else
        sum(p.numel() for g in prepared.groups for p in g["params"]),
        "total_params": sum(p.numel() for p in params),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "steps": total_steps, "epochs": cfg["epochs"], "diff_blocks": n_diff,
        "blocks_per_epoch": n_diff + n_replay, "tokens": progress["tokens"],
        "wall_time_s": round(progress["elapsed"], 3),
        "final_loss": progress["log"][-1]["loss"] if progress["log"] else None,
        **(run_info or {}),  # device, processes, mixed_precision
    }
    with atomic_output(out) as tmp:
        methods.save_checkpoint(model, tokenizer, tmp / "model")
        modelcard.write(tmp / "model", modelcard.train_meta(cfg, metrics, init))
        with open(tmp / "log.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
            writer.writeheader()
            writer.writerows(progress["log"])
        write_json(metrics, tmp / "metrics.json")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
    log.info("trained %s P%d seed %d: %d steps, %d tokens, %d/%d parameters trainable, final loss %s",
             cfg["name"], period, seed, total_steps, progress["tokens"], metrics["trainable_params"],
             metrics["total_params"], metrics["final_loss"])
    return metrics
