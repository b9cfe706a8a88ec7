"""Experiment tracking through accelerate's trackers: TensorBoard (the default, offline),
Weights & Biases or MLflow (optional extras), or none.

One tracker run per training run, named `stage[/method][/seed{s}][/P{k}]` (e.g.
`train/full/seed0/P1`, `base_model`, `camels`). The settings are the config's `tracking`
section; the workflow hands them to every job in the environment variable
GRADLOC_TRACKING (JSON), not in a rule's params or command, so switching the tracker
reruns nothing. A stage run by hand tracks nothing unless the variable is set.

Tracking only reads numbers the loop already computed, at the loop's existing host
syncs: it changes no result.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

from . import schema

log = logging.getLogger(__name__)

ENV = "GRADLOC_TRACKING"


def settings(raw: str | dict | None = None) -> dict:
    """The `tracking` section (defaults filled in) from `raw` or $GRADLOC_TRACKING;
    backend none when neither is given."""
    raw = os.environ.get(ENV) if raw is None else raw
    if raw is None or raw == "":
        return {"backend": "none", "dir": None}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            from .io import InputError

            raise InputError(f"${ENV}: not JSON ({e}): {raw!r}") from None
    return schema.fill("tracking", raw, where="tracking")


def run_name(stage: str, name: str | None = None, seed=None, period=None) -> str:
    parts = [stage, name, None if seed is None else f"seed{seed}", None if period is None else f"P{period}"]
    return "/".join(str(p) for p in parts if p is not None)


def flat(values: dict, prefix: str = "") -> dict:
    """Nested settings as `a.b` keys with str/int/float/bool values (what every tracker
    takes as hyperparameters); lists and None become text."""
    out = {}
    for k, v in (values or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = json.dumps(v, default=str)
    return out


class Run:
    """One tracker run. `begin(step)` opens it (a fresh start clears an old TensorBoard
    run of the same name; a resumed one purges the steps after `step`), `log` writes
    values at a step, `finish(metrics)` logs the final metrics and closes it. Every
    method is a no-op for backend none."""

    def __init__(self, stage: str, name: str | None = None, seed=None, period=None, config: dict | None = None,
                 cfg: dict | None = None):
        self.cfg = settings() if cfg is None else settings(cfg)
        self.name = run_name(stage, name, seed, period)
        self.config = config or {}
        self.tracker = None
        self.last_step = 0

    @property
    def active(self) -> bool:
        return self.cfg["backend"] != "none"

    @property
    def folder(self) -> Path:
        return Path(self.cfg["dir"] or "tracking")

    def begin(self, step: int = 0) -> None:
        if not self.active or self.tracker is not None:
            return
        from accelerate import PartialState
        from accelerate import tracking as t

        if not PartialState().is_main_process:
            return
        backend, folder = self.cfg["backend"], self.folder
        if backend == "tensorboard":
            if step == 0:
                shutil.rmtree(folder / self.name, ignore_errors=True)
            self.tracker = t.TensorBoardTracker(self.name, folder, **({"purge_step": step + 1} if step else {}))
        elif backend == "wandb":  # WANDB_MODE=offline: a local run folder, synced later with `wandb sync`
            folder.mkdir(parents=True, exist_ok=True)
            self.tracker = t.WandBTracker(self.cfg["project"], name=self.name, dir=str(folder), resume="allow",
                                          id=re.sub(r"[^A-Za-z0-9_-]", "-", self.name))
        elif backend == "mlflow":  # a local file store (dir/mlruns) unless MLFLOW_TRACKING_URI says otherwise;
            # mlflow 3 keeps the file store working behind MLFLOW_ALLOW_FILE_STORE (its SQLite one needs sqlalchemy)
            folder.mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("MLFLOW_TRACKING_URI", (folder.resolve() / "mlruns").as_uri())
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            self.tracker = t.MLflowTracker(self.cfg["project"], run_name=self.name)
        self.tracker.start()
        self.tracker.store_init_configuration(flat(self.config))
        log.info("tracking: %s run %s under %s", backend, self.name, folder)

    def log(self, values: dict, step: int) -> None:
        if self.tracker is not None:
            self.tracker.log(values, step=step)
            self.last_step = max(self.last_step, step)

    def finish(self, metrics: dict | None = None) -> None:
        if self.tracker is None:
            return
        final = {f"final/{k}": v for k, v in flat(metrics or {}).items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if final:
            self.tracker.log(final, step=self.last_step)
        self.tracker.finish()
        self.tracker = None

    # --- what the training loop logs ---------------------------------------------------

    def steps(self, first_step: int, losses: list, norms: list, lrs: list) -> None:
        """Per optimizer step (from `first_step`): the step loss (this process's mean
        over its micro-batches), learning rate, gradient norm (when clipping computes
        it) and the non-finite guard's verdict (1 finite, 0 not)."""
        if self.tracker is None or not lrs:
            return
        import torch

        step_loss = torch.stack(losses).float().view(len(lrs), -1).mean(1).tolist() if losses else []
        norm = torch.stack(norms).float().tolist() if norms else []
        for i, lr in enumerate(lrs):
            values = {"train/lr": lr}
            if i < len(step_loss):
                values["train/step_loss"] = step_loss[i]
            finite = math.isfinite(step_loss[i]) if i < len(step_loss) else True
            if i < len(norm):
                values["train/grad_norm"] = norm[i]
                finite = finite and math.isfinite(norm[i])
            values["guard/finite"] = float(finite)
            self.log(values, first_step + i)

    def row(self, row: dict) -> None:
        """A log.csv row: the window's mean loss (the curve of log.csv), tokens/s, epoch."""
        self.log({f"train/{k}": row[k] for k in ("loss", "tokens_per_s", "epoch") if k in row}, row["step"])
