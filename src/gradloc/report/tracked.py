"""Stage `gradloc tracked-curves`: training curves drawn from the tracker's data (the
TensorBoard event files of `gradloc.tracking`, read with tensorboard's event reader), one
PNG per training stage: continual pretraining (per method: loss and gradient norm, one
column per period), base and small model pretraining, subnet masks, CaMeLS meta-training
(outer and validation loss). A stage without runs gets a figure that says so."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ..io import InputError  # noqa: E402

log = logging.getLogger(__name__)

STAGES = ("train", "base_model", "small_model", "subnet", "camels")
FIGURES = {"train": "tracked_train.png", "pretrain": "tracked_pretrain.png", "subnet": "tracked_subnet.png",
           "camels": "tracked_camels.png"}


def read_runs(folder) -> pd.DataFrame:
    """run, stage, tag, step, value of every TensorBoard run under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = Path(folder)
    rows = []
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        run = events.parent.relative_to(folder).as_posix()
        if run.split("/")[0] not in STAGES:
            continue
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            rows += [{"run": run, "tag": tag, "step": e.step, "value": e.value} for e in acc.Scalars(tag)]
    df = pd.DataFrame(rows, columns=["run", "tag", "step", "value"])
    df["stage"] = df["run"].str.split("/").str[0]
    return df


def _empty(path, text: str, dpi: int) -> None:
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.text(0.5, 0.5, text, ha="center", va="center")
    ax.set_axis_off()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _lines(ax, df: pd.DataFrame, tag: str, label_of) -> None:
    for run, g in df[df["tag"] == tag].groupby("run", sort=True):
        g = g.sort_values("step")
        ax.plot(g["step"], g["value"], label=label_of(run), lw=1.2)


def train_figure(df: pd.DataFrame, order: list[str], path, dpi: int) -> None:
    """Per method (mean over seeds), the loss and gradient norm of each step (dots: the
    log windows' mean loss, log.csv's curve), one column per period."""
    df = df[df["stage"] == "train"].copy()
    if df.empty:
        return _empty(path, "no tracked training runs", dpi)
    parts = df["run"].str.split("/")
    df["method"], df["period"] = parts.str[1], parts.str[3].str[1:].astype(int)
    methods = [m for m in order if m in set(df["method"])] + sorted(set(df["method"]) - set(order))
    periods = sorted(set(df["period"]))
    tags = [t for t in ("train/step_loss", "train/grad_norm") if t in set(df["tag"])] or ["train/loss"]
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(len(tags), len(periods), figsize=(4.2 * len(periods), 3 * len(tags)), squeeze=False)
    for j, p in enumerate(periods):
        for i, tag in enumerate(tags):
            ax = axes[i][j]
            sub = df[df["period"] == p]
            for m in methods:
                g = sub[(sub["method"] == m) & (sub["tag"] == tag)].groupby("step")["value"].mean()
                if len(g):
                    ax.plot(g.index, g.values, label=m, lw=1.2, color=colors[m])
                if tag == "train/step_loss":  # log.csv's window means as dots on the step losses
                    w = sub[(sub["method"] == m) & (sub["tag"] == "train/loss")].groupby("step")["value"].mean()
                    ax.plot(w.index, w.values, "o", ms=3, color=colors[m])
            name = {"train/step_loss": "loss per step (dots: log.csv windows)"}.get(tag, tag.split("/")[1])
            ax.set_title(f"period {p}: {name.replace('_', ' ')}", fontsize=9)
            ax.set_xlabel("step")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def simple_figure(df: pd.DataFrame, stages: tuple, tags: list[str], path, dpi: int, what: str) -> None:
    df = df[df["stage"].isin(stages)]
    tags = [t for t in tags if t in set(df["tag"])]
    if df.empty or not tags:
        return _empty(path, f"no tracked {what} runs", dpi)
    fig, axes = plt.subplots(1, len(tags), figsize=(4.5 * len(tags), 3.2), squeeze=False)
    for ax, tag in zip(axes[0], tags):
        _lines(ax, df, tag, lambda run: run)
        ax.set_title(tag.replace("/", ": ").replace("_", " "), fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def run(params: dict, tracking, out, trains=None) -> None:
    from .. import schema
    from ..io import read_json

    cfg = schema.fill("report", params, where="report")
    if not Path(tracking).is_dir():
        raise InputError(f"{tracking}: no tracking folder (tracking.backend tensorboard writes it while jobs train)")
    df = read_runs(tracking)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dpi = cfg["dpi"]
    methods = list(dict.fromkeys(read_json(Path(t) / "metrics.json")["method"] for t in trains or []))
    train_figure(df, methods, out / FIGURES["train"], dpi)
    simple_figure(df, ("base_model", "small_model"), ["train/loss", "train/grad_norm", "train/lr"],
                  out / FIGURES["pretrain"], dpi, "pretraining")
    simple_figure(df, ("subnet",), ["train/loss"], out / FIGURES["subnet"], dpi, "subnet mask")
    simple_figure(df, ("camels",), ["outer/loss", "val/loss"], out / FIGURES["camels"], dpi, "CaMeLS")
    log.info("tracked curves: %d runs -> %s", df["run"].nunique(), out)
