"""The one training loop, used by base-model pretraining and continual training.

nanoGPT-plain, with `accelerate` doing what it does well: it prepares the model, the
optimizer, the dataloader (sharding batches across processes) and the scheduler
(`transformers.get_scheduler`), and owns mixed precision, gradient accumulation and
`save_state` resume. A stage brings its data as a `StepBatches` sampler (which blocks
each micro-batch holds, a pure function of the step) and, optionally, its own loss.

Pieces a new method can reuse on their own: `make_accelerator`, `make_scheduler`,
`lm_loss` (per-token weights), `fingerprint` / `load_progress` / `save_progress`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from .io import InputError, NonFiniteError, read_json, write_json

log = logging.getLogger(__name__)


def mixed_precision(precision: str) -> str:
    """`auto`: bf16 where the GPU has it, none (fp32) on CPU."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return precision


def make_accelerator(precision: str = "auto", grad_accum: int = 1):
    from accelerate import Accelerator

    return Accelerator(mixed_precision=mixed_precision(precision), gradient_accumulation_steps=grad_accum)


def make_scheduler(optimizer, name: str, total_steps: int, warmup_steps: int, num_processes: int = 1, **kwargs):
    """`transformers.get_scheduler`, counted in process-steps: accelerate's prepared
    scheduler steps once per process per optimizer step."""
    from transformers import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps * num_processes,
                         num_training_steps=total_steps * num_processes, scheduler_specific_kwargs=kwargs or None)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token loss mean_t(w_t * CE_t) over positions whose label is not -100; w = 1
    without `weights` (per-token weights, e.g. CaMeLS, are indexed like `labels`)."""
    # Shift the labels, not the logits: slicing the (B, T, V) logits would copy them.
    target = F.pad(labels[:, 1:], (0, 1), value=-100)
    # at least float32 (half logits are upcast; float64 stays float64, for gradient checks)
    ce = F.cross_entropy(logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32)), target.flatten(),
                         ignore_index=-100,
                         reduction="none").view_as(target)
    mask = (target != -100).to(ce.dtype)
    w = mask if weights is None else F.pad(weights[:, 1:], (0, 1)).to(ce.dtype) * mask
    return (ce * w).sum() / mask.sum().clamp(min=1)


def causal_lm_loss(model, batch: dict) -> torch.Tensor:
    """The default loss: `batch` holds input_ids and labels (-100: not scored) and,
    optionally, per-token `weights`."""
    x, y = batch["input_ids"], batch["labels"]
    # Padding (label -100) only ever ends a block: masking it changes nothing before
    # it, but tells the model the pad ids are padding.
    logits = model(input_ids=x, attention_mask=(y != -100).long()).logits
    return lm_loss(logits, y, batch.get("weights"))


# --- data ------------------------------------------------------------------------------

class StepBatches(Sampler):
    """Batch sampler over a whole run: for each optimizer step, `grad_accum x processes`
    micro-batches of indices into the dataset, in the order accelerate hands them out
    (micro-batch m of process p is batch m * processes + p). `rows(step)` gives the
    step's indices (all processes together); they are split evenly."""

    def __init__(self, rows: Callable[[int], torch.Tensor], total_steps: int, grad_accum: int, processes: int):
        self.rows, self.total_steps, self.parts = rows, total_steps, grad_accum * processes
        self.batch_size = None  # batches may vary in size (an epoch's last step)

    def __len__(self) -> int:
        return self.total_steps * self.parts

    def __iter__(self):
        for step in range(self.total_steps):
            rows = self.rows(step)
            if len(rows) % self.parts:  # wrap around so the step splits evenly
                pad = self.parts - len(rows) % self.parts
                rows = torch.cat([rows, rows.repeat(pad // len(rows) + 1)[:pad]])
            yield from (chunk.tolist() for chunk in rows.view(self.parts, -1))


def make_loader(dataset: Dataset, batches: StepBatches) -> DataLoader:
    # Its own generator: a DataLoader iterator draws a seed when it starts, and drawing it
    # from the global RNG would shift the dropout masks of a resumed run.
    return DataLoader(dataset, batch_sampler=batches, collate_fn=_identity, generator=torch.Generator())


def _identity(batch):
    return batch


# --- resumable state -------------------------------------------------------------------

def fingerprint(cfg: dict, inputs: list, *args) -> str:
    """What a saved state must match to be resumed: settings, the input files (path,
    size, mtime: a rebuilt input invalidates the state) and `args`."""
    files = [f for path in inputs if path for f in sorted(Path(path).rglob("*")) + [Path(path)] if f.is_file()]
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    text = json.dumps([cfg, stats, *map(str, args)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_progress(accelerator, state, fp: str) -> dict:
    """Restore the latest saved state (model, optimizer, scheduler, RNGs) and return the
    loop position; a fresh start when there is none or it belongs to other settings."""
    fresh = {"step": 0, "tokens": 0, "elapsed": 0.0, "log": []}
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


def check_gpus(requested: int, num_processes: int, stage: str = "train") -> None:
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
        raise InputError(f"the job asked for {requested} GPUs but runs {num_processes} process(es): launch it "
                         f"with `accelerate launch --multi_gpu --num_processes {requested} -m gradloc {stage} ...`")


# --- preemption ----------------------------------------------------------------------------

# sysexits' EX_TEMPFAIL ("try again later"): the exit code of a job stopped by SIGTERM or
# SIGUSR1 after saving its state. Snakemake's `retries` resubmit it; a site can also list
# it in slurm.conf's RequeueExit.
PREEMPTED_EXIT = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Raised by `fit` after saving its state on SIGTERM/SIGUSR1; exits the process with
    PREEMPTED_EXIT (a SystemExit, so no stage's `except Exception` swallows it)."""

    def __init__(self, message: str):
        super().__init__(PREEMPTED_EXIT)
        self.message = message


class StopRequest:
    """While active, SIGTERM and SIGUSR1 only set `signum`; the loop checks it at each step
    boundary. The previous handlers come back on exit. (Signals can only be caught in the
    main thread; elsewhere this does nothing.)"""

    def __init__(self):
        self.signum, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


# --- blocks ------------------------------------------------------------------------------

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


# --- the loop ----------------------------------------------------------------------------

def fit(accelerator, model, optimizer, scheduler, dataset: Dataset, batches: StepBatches, *,
        grad_clip: float | None, log_every: int, desc: str, state=None, fp: str = "", save_every: int = 0,
        loss_fn: Callable = causal_lm_loss, epoch_of: Callable[[int], int] = lambda step: 0, tracker=None,
        save_every_minutes: float = 0):
    """Train for `batches.total_steps` optimizer steps; returns (prepared model,
    optimizer, progress) with progress["log"] rows {step, epoch, loss, lr, tokens_per_s}
    (loss: mean over the steps since the last row). Resumes from `state` when it holds
    a state of the same fingerprint; saves one every `save_every` steps and, with
    `save_every_minutes`, at the first step boundary that many minutes after the last
    save. On SIGTERM or SIGUSR1 it saves at the next step boundary and raises Preempted.
    A `tracking.Run` gets each step's loss, lr, gradient norm and guard state and each log
    row, at the loop's existing host syncs."""
    with StopRequest() as stop:
        return _fit(accelerator, model, optimizer, scheduler, dataset, batches, grad_clip, log_every, desc, state, fp,
                    save_every, loss_fn, epoch_of, save_every_minutes, stop, tracker)


def _fit(accelerator, model, optimizer, scheduler, dataset, batches, grad_clip, log_every, desc, state, fp,
         save_every, loss_fn, epoch_of, save_every_minutes, stop, tracker=None):
    # One function on purpose (~90 lines): the loop reads device values on the host only at
    # the log/save points marked below; split into helpers, those sync points would hide.
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    loader = accelerator.prepare(make_loader(dataset, batches))
    progress = load_progress(accelerator, state, fp)
    if tracker is not None:
        tracker.begin(progress["step"])
    total, A = batches.total_steps, accelerator.gradient_accumulation_steps
    if progress["step"]:
        loader = accelerator.skip_first_batches(loader, progress["step"] * A)
    group = optimizer.param_groups[0]
    model.train()
    started = time.time() - progress["elapsed"]
    # The open log window: host numbers (saved with the state) plus device sums, which
    # are read (a host sync) only when a log row is due or the state is saved.
    window = progress.pop("window", {"loss": 0.0, "tokens": 0, "steps": 0})
    window_start, dev_loss, dev_tokens = time.time(), 0.0, 0
    # Per-step losses and gradient-norm checks stay on the device until the next sync
    # point, where a non-finite value stops the run (before any state is saved).
    step_losses, finite, step_lrs, norms = [], [], [], []
    # fp16's loss scaler skips steps whose gradients overflow: that is not divergence.
    check_norms = accelerator.mixed_precision != "fp16"
    bar = tqdm(total=total, initial=progress["step"], desc=desc, file=sys.stderr, mininterval=2,
               disable=not accelerator.is_local_main_process)
    micro, last_save = 0, time.time()
    for batch in loader:
        if micro == 0:
            lr = group["lr"] / group.get("lr_mult", 1.0)  # this step's base lr
        with accelerator.accumulate(model):
            loss = loss_fn(model, batch)
            accelerator.backward(loss)
            if accelerator.sync_gradients and grad_clip:
                norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip)
                if check_norms:
                    finite.append(torch.isfinite(norm))
                if tracker is not None:
                    norms.append(norm.detach())
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        dev_loss = dev_loss + loss.detach() / A
        step_losses.append(loss.detach())
        dev_tokens = dev_tokens + (batch["labels"][:, 1:] != -100).sum()
        micro += 1
        if micro < A:
            continue
        micro = 0
        progress["step"] += 1
        window["steps"] += 1
        bar.update(1)
        step = progress["step"]
        row_due = step % log_every == 0 or step == total
        save_due = bool(state and save_every and step % save_every == 0 and step < total)
        stopping = step < total and stop_due(accelerator, stop, save_every_minutes, last_save)
        if stopping:
            save_due = bool(state)
        step_lrs.append(lr)
        if row_due or save_due:
            if tracker is not None:
                tracker.steps(step - len(step_lrs) + 1, step_losses, norms, step_lrs)
                norms = []
            check_finite(accelerator, step_losses, finite, step_lrs, step, A, progress)
            step_losses, finite, step_lrs = [], [], []
            window["loss"] += float(accelerator.reduce(dev_loss, "mean"))
            window["tokens"] += int(accelerator.reduce(dev_tokens, "sum"))
            dev_loss, dev_tokens = 0.0, 0
        if row_due:
            seconds = max(time.time() - window_start, 1e-9)
            mean_loss = window["loss"] / window["steps"]
            progress["tokens"] += window["tokens"]
            progress["log"].append({"step": step, "epoch": epoch_of(step - 1), "loss": mean_loss, "lr": lr,
                                    "tokens_per_s": window["tokens"] / seconds})
            if tracker is not None:
                tracker.row(progress["log"][-1])
            bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{window['tokens'] / seconds:.0f}", refresh=False)
            window, window_start = {"loss": 0.0, "tokens": 0, "steps": 0}, time.time()
        progress["elapsed"] = time.time() - started
        if save_due:
            save_progress(accelerator, state, {**progress, "window": window, "fingerprint": fp})
            last_save = time.time()
        if stopping and stopping != "time":
            bar.close()
            where = f"state saved in {state}" if state else "no state folder (--state), nothing saved"
            message = f"stopped by {stopping} at step {step} of {total}: {where}; exit {PREEMPTED_EXIT}, rerun to resume"
            log.warning(message)
            raise Preempted(message)
    bar.close()
    accelerator.wait_for_everyone()
    return model, optimizer, progress


def stop_due(accelerator, stop: StopRequest, minutes: float, last_save: float):
    """At a step boundary: the name of the signal that asks the run to stop, "time" when
    a time-based save is due, else None. Several processes agree on it (one all-reduce
    per step, only then); a signal reaching any process stops all of them."""
    due = [float(stop.signum or 0), float(bool(minutes) and time.time() - last_save >= 60 * minutes)]
    if accelerator.num_processes > 1:
        due = accelerator.reduce(torch.tensor(due, device=accelerator.device), "max").tolist()
    if due[0]:
        return signal.Signals(int(due[0])).name
    return "time" if due[1] else None


def check_finite(accelerator, losses: list, finite: list, lrs: list, step: int, A: int, progress: dict) -> None:
    """Raise NonFiniteError naming the first step (of those since the last check) whose
    loss or gradient norm was not finite, its learning rate, the precision, and the last
    finite loss. One host sync for the whole window."""
    if not losses:
        return
    loss_ok = torch.isfinite(torch.stack(losses).float())
    norm_ok = torch.stack(finite) if finite else torch.ones(0, dtype=torch.bool, device=loss_ok.device)
    ok = torch.cat([loss_ok, norm_ok]).all()
    if bool(accelerator.reduce(ok.float(), "mean") == 1):
        return
    first = len(lrs) - 1  # index within the window of the first bad step
    steps_ok = loss_ok.view(-1, A).all(1)[:len(lrs)]
    if len(norm_ok) == len(lrs):
        steps_ok = steps_ok & norm_ok
    bad = (~steps_ok).nonzero()
    if len(bad):
        first = int(bad[0])
    earlier = [float(x) for x in torch.stack(losses).view(-1, A).mean(1)[:first]]
    last = earlier[-1] if earlier else (progress["log"][-1]["loss"] if progress["log"] else None)
    bad_step = step - len(lrs) + first + 1
    raise NonFiniteError(
        f"non-finite loss or gradient norm at step {bad_step} (lr {lrs[first]:.3g}, precision "
        f"{accelerator.mixed_precision}); last finite loss: {last if last is None else f'{last:.4f}'}. "
        "Lower the learning rate or set grad_clip; the saved state (if any) is from before this step")
