"""Stage 6, `gradloc train`: continual pretraining of one period's diff.

One readable loop for every method (nanoGPT style): the period's diff sequences are
tokenized, joined with EOS and cut into `seq_len` blocks; each epoch shuffles them (plus
replayed base blocks for Mix-Review) with a generator seeded by (seed, epoch), so the data
order is a pure function of the two and a resumed run skips exactly the batches it had
consumed. `accelerate` owns devices, mixed precision and distribution; what trains and
how (frozen layers, ALR groups, LoRA, K-Adapter, RecAdam) comes from `gradloc.methods`.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from . import methods
from .io import InputError, atomic_output, read_json, require_columns, write_json, merge_defaults

log = logging.getLogger(__name__)

# Train-wide defaults, as in workflow/schemas/config.schema.yaml (`schedule` is only
# settable by hand: linear or cosine decay after the warmup).
DEFAULTS = {"lr": 1e-4, "epochs": 1, "batch_size": 16, "grad_accum": 1, "seq_len": 128, "grad_clip": 1.0,
            "weight_decay": 0.01, "warmup_ratio": 0.0, "precision": "auto", "save_every": 0, "log_every": 10,
            "schedule": "linear"}
LOG_COLUMNS = ["step", "epoch", "loss", "lr", "tokens_per_s"]


def settings(params: dict) -> dict:
    """Train-wide settings with the method's own `lr`/`epochs` on top, defaults filled in."""
    unknown = set(params) - {"name", "common", "method", "_stop_after_steps", "_hang_after_steps"}
    if unknown:
        raise InputError(f"train params: unknown top-level key(s) {sorted(unknown)}; expected name, common, method")
    common = {k: v for k, v in (params.get("common") or {}).items() if k not in ("methods", "seeds")}
    method = methods.resolve_method(params.get("method"))
    cfg = {**merge_defaults(common, DEFAULTS, "train params"), **{k: method[k] for k in ("lr", "epochs") if k in method}}
    if cfg["schedule"] not in ("linear", "cosine"):
        raise InputError(f"train params: schedule must be linear or cosine, got {cfg['schedule']!r}")
    return {**cfg, "name": params.get("name", "method"), "method": method,
            # test-only: simulate a preemption (raise) or wait to be killed (hang)
            "_stop_after_steps": params.get("_stop_after_steps"), "_hang_after_steps": params.get("_hang_after_steps")}


# --- data -------------------------------------------------------------------------------

def load_texts(tagged, period: int) -> tuple[list[str], list[str]]:
    """(diff texts of `period`'s train split, base snapshot texts), in file order."""
    path = Path(tagged) / "sequences.parquet"
    if not path.exists():
        raise InputError(f"{path}: file not found")
    df = pd.read_parquet(path, columns=["period", "split", "text"])
    require_columns(df, ["period", "split", "text"], path)
    diff = df[(df["period"] == period) & (df["split"] == "train")]["text"].astype(str).tolist()
    if not diff:
        raise InputError(f"{path}: no rows with period == {period} and split == 'train'")
    return diff, df[df["split"] == "base"]["text"].astype(str).tolist()


def tokenize(texts: list[str], tokenizer) -> list[np.ndarray]:
    """Token ids of each text followed by EOS. Documents stay apart until `cut_blocks`,
    so a per-document transformation (e.g. token-dropout copies) can come in between."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    if eos is None:
        raise InputError("tokenizer has neither an EOS nor a pad token to separate documents")
    docs = []
    for start in range(0, len(texts), 1024):
        for ids in tokenizer(texts[start:start + 1024], add_special_tokens=False, verbose=False)["input_ids"]:
            docs.append(np.asarray(ids + [eos], dtype=np.int64))
    return docs


def cut_blocks(docs: list[np.ndarray], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """The documents concatenated and cut into [n, seq_len] blocks (nanoGPT style); the
    tail block is padded, its padding labelled -100 so no token is lost."""
    ids = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
    n = max(1, math.ceil(len(ids) / seq_len))
    input_ids = np.full(n * seq_len, pad_id, dtype=np.int64)
    labels = np.full(n * seq_len, -100, dtype=np.int64)
    input_ids[:len(ids)] = ids
    labels[:len(ids)] = ids
    return {"input_ids": torch.from_numpy(input_ids.reshape(n, seq_len)),
            "labels": torch.from_numpy(labels.reshape(n, seq_len))}


def replay_blocks(base_texts: list[str], tokenizer, seq_len: int, n: int, rng: np.random.Generator) -> dict:
    """`n` blocks of base-snapshot text: documents in a random order, tokenized only
    until the budget is met (the base snapshot can be far larger than a diff)."""
    if not base_texts:
        raise InputError("replay: the tagged sequences have no split == 'base' rows to replay")
    order, docs = rng.permutation(len(base_texts)), []
    for start in range(0, len(order), 256):
        docs += tokenize([base_texts[i] for i in order[start:start + 256]], tokenizer)
        if sum(map(len, docs)) >= n * seq_len:
            break
    blocks = cut_blocks(docs, seq_len, tokenizer.pad_token_id or 0)
    if len(blocks["input_ids"]) < n:  # base text shorter than the budget: sample with replacement
        pick = torch.from_numpy(rng.integers(0, len(blocks["input_ids"]), n))
        blocks = {k: v[pick] for k, v in blocks.items()}
    return {k: v[:n] for k, v in blocks.items()}


def build_epoch(diff: dict, base_texts: list[str], tokenizer, cfg: dict, epoch: int, seed: int) -> dict:
    """The epoch's blocks in training order: diff blocks plus, for replay, ratio x as
    many fresh base blocks (`source` 0 = diff, 1 = replay), shuffled by (seed, epoch)."""
    data = {**diff, "source": torch.zeros(len(diff["input_ids"]), dtype=torch.long)}
    if "replay" in cfg["method"]:
        n = round(cfg["method"]["replay"]["ratio"] * len(diff["input_ids"]))
        base = replay_blocks(base_texts, tokenizer, cfg["seq_len"], n, np.random.default_rng([seed, epoch, 1]))
        base["source"] = torch.ones(n, dtype=torch.long)
        data = {k: torch.cat([data[k], base[k]]) for k in data}
    order = torch.from_numpy(np.random.default_rng([seed, epoch, 0]).permutation(len(data["input_ids"])))
    return {k: v[order] for k, v in data.items()}


def epoch_size(cfg: dict, n_diff: int) -> int:
    return n_diff + (round(cfg["method"]["replay"]["ratio"] * n_diff) if "replay" in cfg["method"] else 0)


def lr_lambda(total: int, warmup: int, schedule: str):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 1 - progress) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


# --- resumable state --------------------------------------------------------------------

def fingerprint(cfg: dict, inputs: list, *args) -> str:
    """What a saved state must match to be resumed: settings, the input files (path,
    size, mtime: a rebuilt previous period invalidates the state) and `args`."""
    files = [f for path in inputs if path for f in sorted(Path(path).rglob("*")) + [Path(path)] if f.is_file()]
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    text = json.dumps([{k: v for k, v in cfg.items() if not k.startswith("_")}, stats, *map(str, args)],
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_progress(accelerator, state, fp: str) -> dict:
    """Restore the latest saved state (model, optimizer, scheduler, RNGs) and return the
    loop position; a fresh start when there is none or it belongs to other settings."""
    fresh = {"step": 0, "tokens": 0, "elapsed": 0.0, "log": [], "loss_sum": 0.0, "loss_n": 0}
    latest = Path(state) / "latest.json" if state else None
    if latest is None or not latest.exists():
        return fresh
    progress = read_json(latest)
    if progress.get("fingerprint") != fp:
        log.warning("%s: saved state belongs to other settings or inputs; starting afresh", state)
        return fresh
    accelerator.load_state(str(Path(state) / progress["dir"]))
    log.info("resuming from %s at step %d", state, progress["step"])
    return progress


def save_progress(accelerator, state, progress: dict) -> None:
    """Save into a new step folder, then point latest.json at it, so a kill mid-save
    leaves the previous state usable."""
    folder = f"step-{progress['step']:08d}"
    accelerator.save_state(str(Path(state) / folder))
    if accelerator.is_main_process:
        tmp = Path(state) / "latest.json.tmp"
        write_json({**progress, "dir": folder}, tmp)
        os.replace(tmp, Path(state) / "latest.json")
        for old in Path(state).glob("step-*"):
            if old.name != folder:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


# --- the loop ---------------------------------------------------------------------------

def mixed_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return precision


def train_step(accelerator, model, optimizer, prepared, data, rows, grad_accum, grad_clip) -> torch.Tensor:
    """One optimizer step on this step's blocks `rows` (all processes' together): split
    into grad_accum micro-batches, each split across the processes. Returns the loss."""
    micro = rows.view(grad_accum, accelerator.num_processes, -1)
    step_loss = 0.0
    for m in range(grad_accum):
        mine = micro[m, accelerator.process_index]
        x, y = (data[k][mine].to(accelerator.device) for k in ("input_ids", "labels"))
        weights = prepared.token_weights(x, y) if prepared.token_weights else None
        # Gradients are synchronised across processes only on the last micro-batch.
        with accelerator.no_sync(model) if m < grad_accum - 1 else contextlib.nullcontext():
            # Padding (label -100) only ever ends the last block: masking it changes nothing
            # before it, but tells the model the pad ids are padding.
            logits = model(input_ids=x, attention_mask=(y != -100).long()).logits
            loss = methods.lm_loss(logits, y, weights)
            accelerator.backward(loss / grad_accum)
        step_loss += loss.detach() / grad_accum
    if grad_clip:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss


def check_gpus(requested: int, num_processes: int) -> None:
    """Fail clearly when a job that asked for GPUs cannot see them (a wrong --gres, a
    CUDA_VISIBLE_DEVICES mix-up), instead of silently training on the CPU. A CPU-only
    torch build cannot use GPUs at all; there the request is only warned about, so the
    same rules run on machines without GPUs."""
    if not requested:
        return
    if torch.version.cuda is None and not torch.cuda.is_available():
        log.warning("the job asked for %d GPU(s) but this torch build has no CUDA; training on CPU", requested)
        return
    visible = torch.cuda.device_count()
    if visible < requested:
        raise InputError(f"the job asked for {requested} GPU(s) but CUDA sees {visible} "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    if requested > 1 and num_processes != requested:
        raise InputError(f"the job asked for {requested} GPUs but runs {num_processes} process(es): "
                         f"launch it with `accelerate launch --multi_gpu --num_processes {requested} -m gradloc train ...`")


def run(params: dict, init, tagged, selection=None, period=1, seed=0, state=None, out="train", gpus=0) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cfg = settings(params)
    period, seed = int(period), int(seed)
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg["precision"]))
    check_gpus(int(gpus or 0), accelerator.num_processes)
    set_seed(seed)
    # fp32 master weights; mixed precision is autocast on top, never bf16 weights.
    model, tokenizer = methods.load_checkpoint(init, dtype=torch.float32)
    max_len = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if max_len and cfg["seq_len"] > max_len:
        raise InputError(f"train params: seq_len {cfg['seq_len']} exceeds the model's {max_len} positions")
    prepared = methods.prepare(model, cfg["method"], selection, seed)

    diff_texts, base_texts = load_texts(tagged, period)
    diff = cut_blocks(tokenize(diff_texts, tokenizer), cfg["seq_len"], tokenizer.pad_token_id or 0)
    W, A, B = accelerator.num_processes, cfg["grad_accum"], cfg["batch_size"]
    n_epoch = epoch_size(cfg, len(diff["input_ids"]))
    steps_per_epoch = math.ceil(n_epoch / (B * W * A))
    total_steps = steps_per_epoch * cfg["epochs"]

    optimizer = methods.make_optimizer(prepared, cfg["lr"], cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, int(cfg["warmup_ratio"] * total_steps), cfg["schedule"]))
    model, optimizer = accelerator.prepare(prepared.model, optimizer)
    # Not prepared: accelerate's scheduler wrapper steps once per process.
    accelerator.register_for_checkpointing(scheduler)
    fp = fingerprint(cfg, [init, Path(tagged) / "sequences.parquet", selection], period, seed, W)
    progress = load_progress(accelerator, state, fp)

    model.train()
    started = time.time() - progress["elapsed"]
    bar = tqdm(total=total_steps, initial=progress["step"], desc=f"train {cfg['name']} P{period}",
               file=sys.stderr, disable=not accelerator.is_local_main_process)
    while progress["step"] < total_steps:
        epoch, first = divmod(progress["step"], steps_per_epoch)
        data = build_epoch(diff, base_texts, tokenizer, cfg, epoch, seed)
        order = torch.arange(len(data["input_ids"]))
        # Wrap around so every step splits evenly into grad_accum x processes micro-batches.
        pad = (-len(order)) % (W * A)
        order = torch.cat([order, order.repeat(pad // len(order) + 1)[:pad]])
        for step_in_epoch in range(first, steps_per_epoch):
            t0 = time.time()
            rows = order[step_in_epoch * B * W * A:(step_in_epoch + 1) * B * W * A]
            lr = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["lr_mult"]  # the base lr
            step_loss = train_step(accelerator, model, optimizer, prepared, data, rows, A, cfg["grad_clip"])
            scheduler.step()
            tokens = int((data["labels"][rows][:, 1:] != -100).sum())
            progress["step"] += 1
            progress["tokens"] += tokens
            progress["loss_sum"] += float(accelerator.reduce(step_loss, "mean"))
            progress["loss_n"] += 1
            tok_s = tokens / max(time.time() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{float(step_loss):.3f}", tok_s=f"{tok_s:.0f}")
            if progress["step"] % cfg["log_every"] == 0 or progress["step"] == total_steps:
                progress["log"].append({"step": progress["step"], "epoch": epoch, "lr": lr, "tokens_per_s": tok_s,
                                        "loss": progress["loss_sum"] / progress["loss_n"]})
                progress["loss_sum"], progress["loss_n"] = 0.0, 0
            progress["elapsed"] = time.time() - started
            if state and cfg["save_every"] and progress["step"] % cfg["save_every"] == 0 \
                    and progress["step"] < total_steps:
                save_progress(accelerator, state, {**progress, "fingerprint": fp})
            if cfg["_stop_after_steps"] and progress["step"] >= cfg["_stop_after_steps"]:
                raise RuntimeError(f"stopped after {progress['step']} steps (_stop_after_steps)")
            if cfg["_hang_after_steps"] and progress["step"] >= cfg["_hang_after_steps"]:
                print(f"hanging after step {progress['step']} (_hang_after_steps)", file=sys.stderr, flush=True)
                time.sleep(3600)
    bar.close()

    accelerator.wait_for_everyone()
    metrics = {}
    if accelerator.is_main_process:
        run_info = {"device": str(accelerator.device), "processes": accelerator.num_processes,
                    "mixed_precision": accelerator.mixed_precision}
        metrics = write_outputs(accelerator.unwrap_model(model), tokenizer, optimizer, prepared, cfg, progress,
                                total_steps, n_diff=len(diff["input_ids"]), out=out, period=period, seed=seed,
                                run_info=run_info)
    accelerator.wait_for_everyone()
    if state and accelerator.is_main_process:
        shutil.rmtree(state, ignore_errors=True)  # finished: the resumable state is spent
    return metrics


def optimizer_state_bytes(optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if torch.is_tensor(v))


def write_outputs(model, tokenizer, optimizer, prepared, cfg, progress, total_steps, n_diff, out, period, seed,
                  run_info=None):
    params = {id(p): p for p in model.parameters()}.values()
    metrics = {
        "method": cfg["name"], "method_config": cfg["method"], "period": period, "seed": seed,
        "trained_units": prepared.trained_units, "granularity": prepared.info["granularity"],
        "trainable_params": sum(p.numel() for g in prepared.groups for p in g["params"]),
        "total_params": sum(p.numel() for p in params),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "steps": total_steps, "epochs": cfg["epochs"], "diff_blocks": n_diff,
        "blocks_per_epoch": epoch_size(cfg, n_diff), "tokens": progress["tokens"],
        "wall_time_s": round(progress["elapsed"], 3),
        "final_loss": progress["log"][-1]["loss"] if progress["log"] else None,
        **(run_info or {}),  # device, processes, mixed_precision
    }
    with atomic_output(out) as tmp:
        methods.save_checkpoint(model, tokenizer, tmp / "model")
        with open(tmp / "log.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
            writer.writeheader()
            writer.writerows(progress["log"])
        write_json(metrics, tmp / "metrics.json")
    log.info("trained %s P%d seed %d: %d steps, %d tokens, %d/%d parameters trainable, final loss %s",
             cfg["name"], period, seed, total_steps, progress["tokens"], metrics["trainable_params"],
             metrics["total_params"], metrics["final_loss"])
    return metrics
