"""Preemption (issue 22): SIGTERM or SIGUSR1 during training or pretraining saves the
resumable state at the next step boundary and exits with engine.PREEMPTED_EXIT; the rerun
resumes at that step and ends with weights bit-identical to an uninterrupted run. A
time-based save (`save_every_minutes`) bounds the loss when a process dies unsignalled.

The signal is real (os.kill of this process) and sent at a fixed optimizer step, from
inside AdamW.step, so where it lands does not depend on timing; the CLI test sends it
from outside, as SLURM does."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from gradloc import basemodel, engine, schema, train
from helpers import char_tokenizer, tiny_gpt2, tiny_train_world

torch.set_num_threads(1)

COMMON = {"lr": 1e-2, "batch_size": 2, "seq_len": 32, "log_every": 2, "precision": "no", "grad_accum": 2,
          "epochs": 3}
METHOD = {"layers": "all", "replay": {"ratio": 0.5}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_train_world(tmp_path_factory.mktemp("world"))


def params(**common):
    return {"name": "m", "common": {**COMMON, **common}, "method": METHOD}


def run(world, out, state=None, **common):
    return train.run(params(**common), init=world / "base_model", tokens=world / "tokens", period=1, seed=0,
                     state=state, out=out)


def weights(folder):
    return load_file(folder / "model" / "model.safetensors")


def at_step(monkeypatch, step: int, action):
    """AdamW whose `step`-th optimizer step (1-based) calls `action()` after stepping."""
    class AdamW(torch.optim.AdamW):
        calls = 0

        def step(self, *a, **k):
            out = super().step(*a, **k)
            AdamW.calls += 1
            if AdamW.calls == step:
                action()
            return out

    monkeypatch.setattr(torch.optim, "AdamW", AdamW)


def strip(rows):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=lambda s: s.name)
def test_train_stopped_by_a_signal_resumes_to_the_same_weights(world, tmp_path, monkeypatch, caplog, sig):
    run(world, tmp_path / "full")
    state, handler = tmp_path / "state", signal.getsignal(sig)
    with monkeypatch.context() as m:
        at_step(m, 3, lambda: os.kill(os.getpid(), sig))
        with pytest.raises(engine.Preempted) as stopped:
            run(world, tmp_path / "resumed", state=state)
    assert stopped.value.code == engine.PREEMPTED_EXIT == 75
    assert f"stopped by {sig.name} at step 3 of" in stopped.value.message
    assert not (tmp_path / "resumed").exists(), "a stopped job leaves no output"
    assert json.loads((state / "latest.json").read_text())["step"] == 3
    assert signal.getsignal(sig) == handler, "the handler is restored once training stops"
    with caplog.at_level(logging.INFO, logger="gradloc.engine"):
        run(world, tmp_path / "resumed", state=state)
    assert f"resuming from {state} at step 3" in caplog.text
    a, b = weights(tmp_path / "full"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert full["steps"] == resumed["steps"] > 3
    assert not state.exists()


def test_time_based_save_bounds_what_an_unsignalled_death_loses(world, tmp_path, monkeypatch, caplog):
    """save_every_minutes (here: at every step) leaves a state however the process dies."""
    run(world, tmp_path / "full")
    state = tmp_path / "state"

    def die():
        raise RuntimeError("node lost")

    with monkeypatch.context() as m:
        at_step(m, 4, die)
        with pytest.raises(RuntimeError, match="node lost"):
            run(world, tmp_path / "resumed", state=state, save_every_minutes=1e-9)
    assert json.loads((state / "latest.json").read_text())["step"] == 3
    with caplog.at_level(logging.INFO, logger="gradloc.engine"):
        run(world, tmp_path / "resumed", state=state, save_every_minutes=1e-9)
    assert "at step 3" in caplog.text
    a, b = weights(tmp_path / "full"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_time_based_save_is_off_by_default():
    assert schema.fill("train", {}, where="train", ignore_required=True)["save_every_minutes"] == 0
    assert schema.fill("model", {}, where="model", ignore_required=True)["pretrain"]["save_every_minutes"] == 0


def test_pretraining_stopped_by_sigusr1_resumes_to_the_same_weights(tmp_path, monkeypatch, caplog):
    pre = {**schema.fill("model", {}, where="model", ignore_required=True)["pretrain"],
           "steps": 6, "batch_size": 2, "seq_len": 16, "precision": "no"}
    texts = [f"Base {i}: river {i % 3} is long and wide." for i in range(20)]
    full, _ = basemodel.pretrain(tiny_gpt2(96, n_layer=2), char_tokenizer(), texts, pre)
    state = tmp_path / "state"
    with monkeypatch.context() as m:
        at_step(m, 2, lambda: os.kill(os.getpid(), signal.SIGUSR1))
        with pytest.raises(engine.Preempted):
            basemodel.pretrain(tiny_gpt2(96, n_layer=2), char_tokenizer(), texts, pre, state=state)
    assert json.loads((state / "latest.json").read_text())["step"] == 2
    with caplog.at_level(logging.INFO, logger="gradloc.engine"):
        resumed, _ = basemodel.pretrain(tiny_gpt2(96, n_layer=2), char_tokenizer(), texts, pre, state=state)
    assert "at step 2" in caplog.text
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_signalled_from_outside_exits_75_and_the_rerun_resumes(world, tmp_path):
    """`gradloc train` sent SIGUSR1 by another process (as `scancel --signal=USR1` does)
    once it is past step 2: it exits 75 naming the step, and the rerun equals a full run."""
    run(world, tmp_path / "full", save_every=1)
    state, out = tmp_path / "state", tmp_path / "resumed"
    command = [sys.executable, "-m", "gradloc", "train", "--params", json.dumps(params(save_every=1)),
               "--init", str(world / "base_model"), "--tokens", str(world / "tokens"), "--period", "1",
               "--seed", "0", "--state", str(state), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    while proc.poll() is None:
        try:
            if json.loads((state / "latest.json").read_text())["step"] >= 2:
                proc.send_signal(signal.SIGUSR1)
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.01)
    stderr = proc.communicate()[1]
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal")
    assert proc.returncode == 75, stderr[-3000:]
    stopped_at = json.loads((state / "latest.json").read_text())["step"]
    assert f"stopped by SIGUSR1 at step {stopped_at} of" in stderr and stopped_at >= 2
    rerun = subprocess.run(command, capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"at step {stopped_at}" in rerun.stderr
    a, b = weights(tmp_path / "full"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
