"""Tracking (gradloc.tracking): the TensorBoard run of a training run, read back with
tensorboard's own event reader, holds log.csv's loss curve and one point per step, and
tracking changes no number."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train import run, world  # noqa: F401  (the tiny world fixture)

from gradloc import tracking


def scalars(folder):
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_log(folder):
    with open(folder / "log.csv") as f:
        return list(csv.DictReader(f))


def test_tensorboard_curve_equals_log_csv_and_numbers_unchanged(world, tmp_path, monkeypatch):  # noqa: F811
    plain = tmp_path / "plain"
    monkeypatch.delenv(tracking.ENV, raising=False)
    run(world, plain, {"layers": "all"}, selection=False, epochs=2)
    monkeypatch.setenv(tracking.ENV, json.dumps({"backend": "tensorboard", "dir": str(tmp_path / "tb")}))
    tracked = tmp_path / "tracked"
    metrics = run(world, tracked, {"layers": "all"}, selection=False, epochs=2)

    # tracking changes no number: same weights, same loss curve
    a, b = load_file(plain / "model" / "model.safetensors"), load_file(tracked / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = read_log(tracked)
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_log(plain)]

    s = scalars(tmp_path / "tb" / "train" / "m" / "seed0" / "P1")
    assert [step for step, _ in s["train/loss"]] == [int(r["step"]) for r in rows]
    assert [v for _, v in s["train/loss"]] == pytest.approx([float(r["loss"]) for r in rows], rel=1e-6)
    assert [v for _, v in s["train/tokens_per_s"]] == pytest.approx([float(r["tokens_per_s"]) for r in rows],
                                                                     rel=1e-6)
    steps = list(range(1, metrics["steps"] + 1))
    for tag in ("train/lr", "train/step_loss", "train/grad_norm", "guard/finite"):
        assert [step for step, _ in s[tag]] == steps, tag
    assert {v for _, v in s["guard/finite"]} == {1.0}
    assert [v for step, v in s["train/lr"] if step in {int(r["step"]) for r in rows}] == pytest.approx(
        [float(r["lr"]) for r in rows])
    assert s["final/tokens"] == [(metrics["steps"], metrics["tokens"])]


def test_a_rerun_replaces_the_old_run(world, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv(tracking.ENV, json.dumps({"backend": "tensorboard", "dir": str(tmp_path / "tb")}))
    run(world, tmp_path / "a", {"layers": "all"}, selection=False)
    run(world, tmp_path / "b", {"layers": "all"}, selection=False, log_every=1)
    s = scalars(tmp_path / "tb" / "train" / "m" / "seed0" / "P1")
    assert [step for step, _ in s["train/loss"]] == [int(r["step"]) for r in read_log(tmp_path / "b")]


def test_none_writes_nothing_and_bad_settings_name_the_key(world, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(tracking.ENV, json.dumps({"backend": "none"}))
    run(world, tmp_path / "out", {"layers": "all"}, selection=False)
    assert not (tmp_path / "tracking").exists()
    from gradloc.io import InputError

    with pytest.raises(InputError, match="tracking.backend"):
        tracking.settings(json.dumps({"backend": "tensorbaord"}))


@pytest.mark.slow
def test_the_test_configs_runs_hold_log_csv_curves(test_run):
    """config/test.yaml tracks every training run under <results>/tracking by default; each
    train run's loss curve is its log.csv, and the report's tracked figures exist."""
    runs = test_run / "tracking"
    for folder in sorted((test_run / "train").glob("*/seed*/P*")):
        method, seed, period = folder.relative_to(test_run / "train").parts
        s = scalars(runs / "train" / method / seed / period)
        rows = read_log(folder)
        assert [(step, pytest.approx(v, rel=1e-6)) for step, v in s["train/loss"]] == [
            (int(r["step"]), float(r["loss"])) for r in rows], folder
    for name in ("base_model/seed0", "small_model/seed0", "camels/seed0", "subnet/outdated/seed0/P1"):
        assert scalars(runs / name), name
    base = scalars(runs / "base_model" / "seed0")["train/loss"]
    with open(test_run / "base_model" / "train_log.csv") as f:
        assert [v for _, v in base] == pytest.approx([float(r["loss"]) for r in csv.DictReader(f)], rel=1e-6)
    for name in ("train", "pretrain", "subnet", "camels"):
        assert (test_run / "extras" / f"tracked_{name}.png").stat().st_size > 1000
    assert (test_run / "model_cards" / "full" / "seed0" / "P1" / "README.md").exists()
