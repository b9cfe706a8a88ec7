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
import logging
import math
import shutil
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from . import engine, methods, modelcard, parts, schema, tracking
from .io import InputError, as_list, atomic_output, write_json
from .models import max_positions
from .tokenfiles import load as load_tokens

log = logging.getLogger(__name__)

LOG_COLUMNS = ["step", "epoch", "loss", "lr", "tokens_per_s"]


def settings(params: dict) -> dict:
    """Train-wide settings (schema defaults filled in) with the method's own `lr` /
    `epochs` on top. `parts`: files of method parts to register first."""
    unknown = set(params) - {"name", "common", "method", "parts"}
    if unknown:
        raise InputError(f"train params: unknown top-level key(s) {sorted(unknown)}; expected name, common, method, "
                         "parts")
    parts.load(params.get("parts"))  # files of parts beyond the built-in ones (config `parts:`)
    common = {k: v for k, v in (params.get("common") or {}).items() if k not in ("methods", "seeds", "group_seeds")}
    cfg = schema.fill("train", common, where="train", ignore_required=True)
    cfg.pop("seeds", None)
    cfg.pop("group_seeds", None)
    method = methods.resolve_method(params.get("method"))
    cfg.update({k: method[k] for k in ("lr", "epochs") if k in method})
    return {**cfg, "name": params.get("name", "method"), "method": method}


# --- data -------------------------------------------------------------------------------

class Epochs:
    """The blocks of each epoch in training order, built on demand (one epoch cached):
    the diff blocks plus, for each mixer (a part's `mix` hook, e.g. replay), its `n`
    blocks drawn afresh (`source` 0 = diff, i = the i-th mixer), shuffled by (seed,
    epoch). Indexed by a global row epoch * size + i."""

    def __init__(self, diff: dict, mixers: list, seed: int):
        self.diff, self.mixers, self.seed = diff, [(n, draw) for n, draw in mixers if n], seed
        self.n_diff = len(diff["input_ids"])
        self.size = self.n_diff + sum(n for n, _ in self.mixers)
        self._epoch, self._data = None, None

    def build(self, epoch: int) -> dict:
        data = {**self.diff, "source": torch.zeros(self.n_diff, dtype=torch.long)}
        for i, (n, draw) in enumerate(self.mixers, 1):
            more = draw(np.random.default_rng([self.seed, epoch, i]))
            if "weights" in data:  # mixed-in text keeps the plain loss
                more["weights"] = (more["labels"] != -100).float()
            more["source"] = torch.full((n,), i, dtype=torch.long)
            data = {k: torch.cat([data[k], more[k]]) for k in data}
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

@dataclass(frozen=True)
class Args:
    """One training run's arguments (`gradloc train` with one seed). `inputs`: the
    upstream outputs the method's parts read, by their name in `parts.INPUTS`."""
    params: dict
    init: str
    tokens: str
    period: int
    seed: int
    out: str
    state: str | None = None
    gpus: int = 0
    inputs: dict = field(default_factory=dict)


@dataclass
class Job:
    """What the parts' hooks see and change (gradloc/parts.py): the run's settings and
    data, the documents (with their knowledge types and marked tokens, one per document),
    what goes into metrics.json (`extra`) and beside it (`files`), and `state`, where a
    part keeps what its hooks share."""
    cfg: dict
    tokenizer: object
    toks: object
    rows: pd.DataFrame
    period: int
    seed: int
    inputs: dict
    docs: list
    types: list
    base_docs: list
    eos: int
    pad_id: int
    marked: list | None = None
    n_diff: int = 0
    extra: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)  # the hooks' own scratch space, by part key (never written)


def run(params: dict, init, tokens, period=1, seed=0, state=None, out="train", gpus=0, probes=None, **inputs):
    """Train one method on one period: from `init` into `out` (metrics returned). With a
    list of seeds, one training per seed in turn, in this process (the workflow's
    `train.group_seeds`: a small model's job is half torch/transformers imports); `init`
    (one for all, or one per seed), `state` and `out` are then lists in seed order.
    `inputs`: the upstream outputs the method's parts read (`parts.INPUTS`: selection,
    attention, subnet, tagged, corpus, weighting_model). `probes`, an old input, is
    refused: training never reads the evaluation probes."""
    from .core import no_probes

    settings(params)  # bad params are named before any input is looked at
    no_probes(probes, "train")
    unknown = set(inputs) - set(parts.INPUTS)
    if unknown:
        raise InputError(f"train: unknown input(s) {sorted(unknown)}; the method parts read {list(parts.INPUTS)}")
    inputs = {k: v for k, v in inputs.items() if v}
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed]
    n = len(seeds)
    inits, outs = as_list(init), as_list(out)
    states = as_list(state) if state else [None] * n
    if len(inits) == 1:
        inits = inits * n
    for name, values in (("--init", inits), ("--out", outs), ("--state", states)):
        if len(values) != n:
            raise InputError(f"train: {n} seed(s) but {len(values)} {name} folder(s); give one per seed "
                             "(--init may also be one for all)")
    metrics = [train_one(Args(params, i, tokens, int(period), int(s), o, st, int(gpus or 0), inputs))
               for s, i, st, o in zip(seeds, inits, states, outs)]
    return metrics if isinstance(seed, (list, tuple)) else metrics[0]


def train_one(a: Args) -> dict:
    from accelerate.utils import set_seed

    cfg = settings(a.params)
    method = cfg["method"]
    accelerator = engine.make_accelerator(cfg["precision"], cfg["grad_accum"])
    engine.check_gpus(a.gpus, accelerator.num_processes)
    set_seed(a.seed)
    # fp32 master weights; mixed precision is autocast on top, never bf16 weights.
    model, tokenizer = methods.load_checkpoint(a.init, dtype=torch.float32)
    max_len = max_positions(model)
    if max_len and cfg["seq_len"] > max_len:
        raise InputError(f"train params: seq_len {cfg['seq_len']} exceeds the model's {max_len} positions")
    prepared = methods.prepare(model, method, a.inputs.get("selection"), a.seed, subnet=a.inputs.get("subnet"),
                               period=a.period)
    job = load_job(a, cfg, tokenizer)
    for hook, entry in parts.hooks(method, "prepare"):
        hook(entry, prepared, job)
    for hook, entry in parts.hooks(method, "documents"):  # e.g. permute_objects, augment's copies
        hook(entry, job)
    docs, weights = engine.with_eos(job.docs, job.eos), None
    for hook, entry in parts.hooks(method, "weights"):  # token_weighting
        w = hook(entry, job, docs)
        weights = w if weights is None else [x * y for x, y in zip(weights, w)]
    diff = engine.cut_blocks(docs, cfg["seq_len"], job.pad_id, weights)
    job.n_diff = len(diff["input_ids"])
    data = Epochs(diff, [hook(entry, job) for hook, entry in parts.hooks(method, "mix")], a.seed)
    W = accelerator.num_processes
    batches, steps_per_epoch = schedule(data.size, cfg, W)
    total_steps = batches.total_steps
    optimizer = methods.make_optimizer(prepared, cfg["lr"], cfg["weight_decay"])
    for hook, entry in parts.hooks(method, "after_step"):
        optimizer.register_step_post_hook(lambda *_, hook=hook, entry=entry: hook(entry, prepared.model, job))
    scheduler = engine.make_scheduler(optimizer, cfg["schedule"], total_steps, int(cfg["warmup_ratio"] * total_steps),
                                      W)
    fp = engine.fingerprint(cfg, [a.init, a.tokens, *(a.inputs.get(k) for k in parts.INPUTS)], a.period, a.seed,
                            W)
    tracker = tracking.Run("train", cfg["name"], a.seed, a.period, config={**cfg, "period": a.period, "seed": a.seed})
    model, optimizer, progress = engine.fit(
        accelerator, prepared.model, optimizer, scheduler, data, batches,
        grad_clip=cfg["grad_clip"], log_every=cfg["log_every"], desc=f"train {cfg['name']} P{a.period}",
        state=a.state, fp=fp, save_every=cfg["save_every"], epoch_of=lambda step: step // steps_per_epoch,
        tracker=tracker, save_every_minutes=cfg["save_every_minutes"], loss_fn=loss_fn(method, job))

    metrics = {}
    if accelerator.is_main_process:
        run_info = {"device": str(accelerator.device), "processes": W, "mixed_precision": accelerator.mixed_precision,
                    **job.extra}
        metrics = write_outputs(accelerator.unwrap_model(model), tokenizer, optimizer, prepared, cfg, progress,
                                total_steps, n_diff=data.n_diff, blocks=data.size, out=a.out, period=a.period,
                                seed=a.seed, run_info=run_info, files=job.files, init=a.init)
    tracker.finish(metrics)
    accelerator.wait_for_everyone()
    if a.state and accelerator.is_main_process:
        shutil.rmtree(a.state, ignore_errors=True)  # finished: the resumable state is spent
    return metrics


def schedule(size: int, cfg: dict, W: int) -> tuple[engine.StepBatches, int]:
    """(the rows of each optimizer step over all epochs, steps per epoch). An epoch wraps
    around to a multiple of processes x grad_accum, so that every step splits evenly into
    micro-batches."""
    A, B = cfg["grad_accum"], cfg["batch_size"]
    steps_per_epoch = math.ceil(size / (B * W * A))
    padded = size + (-size) % (W * A)

    def rows(step: int) -> torch.Tensor:
        epoch, s = divmod(step, steps_per_epoch)
        return torch.arange(s * B * W * A, min((s + 1) * B * W * A, padded)) % size + epoch * size

    return engine.StepBatches(rows, steps_per_epoch * cfg["epochs"], A, W), steps_per_epoch


def load_job(a: Args, cfg: dict, tokenizer) -> Job:
    """The period's diff and base documents from the token files, as the hooks see them."""
    toks = load_tokens(a.tokens, tokenizer)
    eos, pad_id = toks.meta["eos_id"], toks.meta["pad_id"] or 0
    if eos is None:
        raise InputError("tokenizer has neither an EOS nor a pad token to separate documents")
    diff_docs, base_docs = period_docs(toks, a.period)
    rows = toks.select(period=a.period, split="train")
    return Job(cfg=cfg, tokenizer=tokenizer, toks=toks, rows=rows, period=a.period, seed=a.seed, inputs=a.inputs,
               docs=diff_docs, types=rows["knowledge_type"].astype(str).tolist(), base_docs=base_docs, eos=eos,
               pad_id=pad_id)


def loss_fn(method: dict, job: Job):
    """The LM loss plus the active parts' extra terms (their `loss` hooks)."""
    extra = parts.hooks(method, "loss")
    if not extra:
        return engine.causal_lm_loss
    return lambda model, batch: engine.causal_lm_loss(model, batch) + sum(
        hook(entry, model, batch, job) for hook, entry in extra)


def optimizer_state_bytes(optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if torch.is_tensor(v))


def write_outputs(model, tokenizer, optimizer, prepared, cfg, progress, total_steps, n_diff, blocks, out, period,
                  seed, run_info=None, files=None, init=None):
    params = {id(p): p for p in model.parameters()}.values()
    metrics = {
        "method": cfg["name"], "method_config": cfg["method"], "period": period, "seed": seed,
        "trained_units": prepared.trained_units, "granularity": prepared.info["granularity"],
        # mask: subnet trains only the masked entries of its tensors
        "trainable_params": prepared.sparse.trainable() if prepared.sparse else
        sum(p.numel() for g in prepared.groups for p in g["params"]),
        "total_params": sum(p.numel() for p in params),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "steps": total_steps, "epochs": cfg["epochs"], "diff_blocks": n_diff,
        "blocks_per_epoch": blocks, "tokens": progress["tokens"],
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
