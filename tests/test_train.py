"""`gradloc train`: the loop end to end on a tiny GPT-2 and a tagged folder written here:
frozen weights stay bit-identical, runs are deterministic, a resumed run equals an
uninterrupted one, replay mixes base blocks, and the CLI path works."""

import csv
import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast

from gradloc import cli, train
from gradloc.io import InputError
from gradloc.models import layer_units, save_model

torch.set_num_threads(1)

COMMON = {"lr": 1e-2, "batch_size": 2, "seq_len": 32, "log_every": 2, "precision": "no"}
SELECTION = {"granularity": "block", "units": ["block.2", "block.3"], "rule": "mean",
             "lr_multipliers": {"block.0": 0.5, "block.1": 0.8, "block.2": 1.2, "block.3": 1.5}}


def char_tokenizer():
    vocab = {"<eos>": 0, **{chr(c): i + 1 for i, c in enumerate(range(32, 127))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """base_model/model, tagged/sequences.parquet (T0 base text, periods 1 and 2) and a selection."""
    root = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=96,
                                                        n_positions=64, bos_token_id=0, eos_token_id=0))
    save_model(model, char_tokenizer(), root / "base_model" / "model")
    rows = [("base", 0, f"Base {i}: river {i % 3} is long and wide.") for i in range(12)]
    rows += [("train", 1, f"New {i}: Alice {i} works at Acme now.") for i in range(8)]
    rows += [("heldout", 1, "Held out: Bob works at Zeta."), ("train", 2, "Later: Carol moved to Oslo.")]
    df = pd.DataFrame([{"seq_id": f"s{i}", "period": p, "split": s, "doc_id": f"d{i}", "origin": "diff",
                        "text": t, "knowledge_type": "none"} for i, (s, p, t) in enumerate(rows)])
    (root / "tagged").mkdir()
    df.to_parquet(root / "tagged" / "sequences.parquet")
    (root / "sel.json").write_text(json.dumps(SELECTION))
    return root


def run(world, out, method, state=None, selection=True, stop=None, **common):
    params = {"name": "m", "common": {**COMMON, **common}, "method": method, "_stop_after_steps": stop}
    return train.run(params, init=world / "base_model", tagged=world / "tagged",
                     selection=world / "sel.json" if selection else None, period=1, seed=0,
                     state=state, out=out)


def weights(folder):
    return load_file(folder / "model" / "model.safetensors")


def read_log(folder):
    with open(folder / "log.csv") as f:
        return list(csv.DictReader(f))


def test_tgl_fp_keeps_frozen_weights_bit_identical(world, tmp_path):
    metrics = run(world, tmp_path / "out", {"layers": "tgl_fp"})
    init, trained = weights(world / "base_model"), weights(tmp_path / "out")
    assert set(init) == set(trained)
    gpt2 = AutoModelForCausalLM.from_pretrained(world / "base_model" / "model")
    units = layer_units(gpt2, "block")
    trainable = {n for u in SELECTION["units"] for n in units[u]}
    for name in init:
        if name in trainable:
            assert not torch.equal(init[name], trained[name]), name
        else:
            assert torch.equal(init[name], trained[name]), name
    assert metrics["trained_units"] == ["block.2", "block.3"]
    assert metrics["trainable_params"] == sum(init[n].numel() for n in trainable)
    # AdamW keeps two moments (+ a step counter) for the trainable parameters only.
    assert 8 * metrics["trainable_params"] <= metrics["optimizer_state_bytes"] < 8 * metrics["trainable_params"] + 1000
    log = read_log(tmp_path / "out")
    assert list(log[0]) == ["step", "epoch", "loss", "lr", "tokens_per_s"]
    # 9 diff blocks of 32 tokens (8 sequences x ~37 characters), batch 2 -> 5 steps
    assert metrics["diff_blocks"] == 9 and metrics["steps"] == 5
    assert [int(r["step"]) for r in log] == [2, 4, 5]
    assert float(log[0]["lr"]) == pytest.approx(1e-2 * 4 / 5)  # linear decay, lr of the step logged


def test_same_seed_same_weights(world, tmp_path):
    method = {"layers": "all", "replay": {"ratio": 0.5}}
    run(world, tmp_path / "a", method, selection=False, epochs=2)
    run(world, tmp_path / "b", method, selection=False, epochs=2)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_log(tmp_path / "a")] == [r["loss"] for r in read_log(tmp_path / "b")]


@pytest.mark.parametrize("method", [{"layers": "tgl_alr"}, {"lora": {"dropout": 0.1}, "recadam": {}}])
def test_resume_equals_uninterrupted(world, tmp_path, method):
    run(world, tmp_path / "full", method, grad_accum=2, save_every=2, state=tmp_path / "state_full")
    assert not (tmp_path / "state_full").exists(), "state is removed at the end"

    state = tmp_path / "state"
    with pytest.raises(RuntimeError, match="stopped after 3"):
        run(world, tmp_path / "resumed", method, grad_accum=2, save_every=2, state=state, stop=3)
    assert json.loads((state / "latest.json").read_text())["step"] == 2
    assert not (tmp_path / "resumed").exists()
    run(world, tmp_path / "resumed", method, grad_accum=2, save_every=2, state=state)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(read_log(tmp_path / "full")) == strip(read_log(tmp_path / "resumed"))
    assert not state.exists()


def test_state_of_other_settings_is_ignored(world, tmp_path):
    state = tmp_path / "state"
    with pytest.raises(RuntimeError):
        run(world, tmp_path / "x", {"layers": "all"}, selection=False, save_every=1, state=state,
            stop=1)
    run(world, tmp_path / "x", {"layers": "all"}, selection=False, save_every=1, state=state, lr=5e-3)
    run(world, tmp_path / "y", {"layers": "all"}, selection=False, lr=5e-3)
    a, b = weights(tmp_path / "x"), weights(tmp_path / "y")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_replay_mixes_fresh_base_blocks_each_epoch(world):
    tok = char_tokenizer()
    cfg = train.settings({"common": {"seq_len": 16}, "method": {"replay": {"ratio": 1.5}}})
    diff_texts, base_texts = train.load_texts(world / "tagged", 1)
    diff = train.cut_blocks(train.tokenize(diff_texts, tok), 16, 0)
    e0 = train.build_epoch(diff, base_texts, tok, cfg, epoch=0, seed=0)
    e1 = train.build_epoch(diff, base_texts, tok, cfg, epoch=1, seed=0)
    n = len(diff["input_ids"])
    assert int(e0["source"].sum()) == round(1.5 * n) and len(e0["source"]) == n + round(1.5 * n)
    assert e0["source"][: n].sum() > 0, "replay blocks are shuffled in, not appended"
    text = lambda blocks: "".join(t for b in blocks for t in tok.convert_ids_to_tokens(b))  # noqa: E731
    replay_text = text(e0["input_ids"][e0["source"] == 1])
    assert "Base" in replay_text and "New" not in replay_text
    diff_text = text(e0["input_ids"][e0["source"] == 0])
    assert "New" in diff_text and "Base" not in diff_text
    assert not torch.equal(e0["input_ids"][e0["source"] == 1], e1["input_ids"][e1["source"] == 1])
    again = train.build_epoch(diff, base_texts, tok, cfg, epoch=0, seed=0)
    assert torch.equal(again["input_ids"], e0["input_ids"])


def test_blocks_keep_every_token_and_mask_the_padding():
    blocks = train.cut_blocks([np.arange(1, 4), np.arange(4, 11)], 4, pad_id=0)
    assert blocks["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]]
    assert blocks["labels"][2].tolist() == [9, 10, -100, -100]


def test_k_adapter_run_continues_into_the_next_period(world, tmp_path):
    from gradloc.methods import KAdapterModel, load_checkpoint

    method = {"k_adapter": {"layers": [1, 2]}}
    run(world, tmp_path / "P1", method, selection=False)
    assert (tmp_path / "P1" / "model" / "k_adapter.safetensors").exists()
    assert all(torch.equal(v, weights(world / "base_model")[k]) for k, v in weights(tmp_path / "P1").items())
    params = {"name": "k", "common": COMMON, "method": method}
    train.run(params, init=tmp_path / "P1", tagged=world / "tagged", selection=None, period=2, seed=0,
              state=None, out=tmp_path / "P2")
    p1, _ = load_checkpoint(tmp_path / "P1")
    p2, _ = load_checkpoint(tmp_path / "P2")
    assert isinstance(p2, KAdapterModel)
    assert not torch.equal(p1.adapters[0].up.weight, p2.adapters[0].up.weight)


def test_bad_inputs_raise_input_errors(world, tmp_path):
    with pytest.raises(InputError, match="unknown key"):
        train.settings({"common": {"lrr": 1}})
    with pytest.raises(InputError, match="period == 7"):
        train.run({"common": COMMON}, init=world / "base_model", tagged=world / "tagged", period=7, out=tmp_path / "o")
    with pytest.raises(InputError, match="seq_len 128 exceeds"):
        run(world, tmp_path / "o", {}, seq_len=128)


def test_cli_trains_and_writes_the_documented_outputs(world, tmp_path):
    params = json.dumps({"name": "tgl_fp+mix_review", "common": {**COMMON, "seeds": [0], "methods": {}},
                         "method": {"layers": "tgl_fp", "replay": {"ratio": 1.0}, "epochs": 2}})
    out = tmp_path / "train" / "tgl_fp+mix_review" / "seed0" / "P1"
    rc = cli.main(["train", "--params", params, "--init", str(world / "base_model"), "--tagged", str(world / "tagged"),
                   "--selection", str(world / "sel.json"), "--period", "1", "--seed", "0",
                   "--state", str(tmp_path / "state"), "--out", str(out)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "tgl_fp+mix_review" and metrics["epochs"] == 2
    assert metrics["blocks_per_epoch"] == 2 * metrics["diff_blocks"]
    assert metrics["steps"] == 2 * 9  # 18 blocks per epoch, batch 2, two epochs
    assert len(read_log(out)) == 9
    rc = cli.main(["train", "--params", params, "--init", str(world / "base_model"), "--tagged", str(world / "tagged"),
                   "--period", "1", "--seed", "0", "--out", str(tmp_path / "o2")])
    assert rc == 2, "tgl_fp without --selection is an input error"


def test_schedule_warmup_then_linear_or_cosine_decay():
    linear = train.lr_lambda(total=10, warmup=2, schedule="linear")
    assert [linear(s) for s in (0, 1, 2, 6)] == [0.5, 1.0, 1.0, 0.5]
    cosine = train.lr_lambda(total=10, warmup=0, schedule="cosine")
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)
    with pytest.raises(InputError, match="schedule"):
        train.settings({"common": {"schedule": "step"}})


def test_gpu_request_is_checked(monkeypatch):
    """A job that asked for GPUs fails clearly when CUDA sees fewer; CPU-only torch only warns."""
    from gradloc.io import InputError
    from gradloc.train import check_gpus

    check_gpus(0, 1)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_gpus(1, 1)
    with pytest.raises(InputError, match="asked for 2 GPU\\(s\\) but CUDA sees 1"):
        check_gpus(2, 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(InputError, match="accelerate launch --multi_gpu --num_processes 4"):
        check_gpus(4, 1)
    check_gpus(4, 4)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_gpus(2, 1)  # CPU-only build: warns, trains on CPU


def test_sigkill_then_rerun_equals_uninterrupted(world, tmp_path):
    """A training job killed with SIGKILL (as SLURM does on preemption) leaves no output,
    and rerunning the same command continues from the saved state to the same weights."""
    import signal
    import subprocess
    import sys
    import time

    method = {"layers": "tgl_alr"}
    run(world, tmp_path / "full", method, save_every=2)

    def command(extra):
        params = {"name": "m", "common": {**COMMON, "save_every": 2}, "method": method, **extra}
        return [sys.executable, "-m", "gradloc", "train", "--params", json.dumps(params),
                "--init", str(world / "base_model"), "--tagged", str(world / "tagged"),
                "--selection", str(world / "sel.json"), "--period", "1", "--seed", "0",
                "--state", str(tmp_path / "state"), "--out", str(tmp_path / "killed")]

    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command({"_hang_after_steps": 2}), stderr=subprocess.PIPE, text=True, env=env)
    # Wait (no timing assumption: read the process's own word) until it hangs past step 2.
    for line in proc.stderr:
        if "hanging after step" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed").exists(), "a killed job must leave no output"
    assert json.loads((tmp_path / "state" / "latest.json").read_text())["step"] == 2

    subprocess.run(command({}), check=True, env=env, capture_output=True)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "killed" / "metrics.json").read_text())["steps"] == \
        json.loads((tmp_path / "full" / "metrics.json").read_text())["steps"]
    assert not (tmp_path / "state").exists()
    assert not list(tmp_path.glob(".killed.tmp-*")), "the killed attempt's temporary output is cleaned up"
