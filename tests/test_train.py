"""`gradloc train`: the loop end to end on a tiny GPT-2 and a tagged folder written here:
frozen weights stay bit-identical, runs are deterministic, a resumed run equals an
uninterrupted one, replay mixes base blocks, and the CLI path works."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config

from gradloc import cli, engine, tokens, train
from gradloc.io import InputError
from gradloc.methods import masking, replay
from gradloc.models import layer_units, save_model
from helpers import char_tokenizer, make_subnet, tokens_world

torch.set_num_threads(1)

COMMON = {"lr": 1e-2, "batch_size": 2, "seq_len": 32, "log_every": 2, "precision": "no"}
SELECTION = {"granularity": "block", "units": ["block.2", "block.3"], "rule": "mean",
             "lr_multipliers": {"block.0": 0.5, "block.1": 0.8, "block.2": 1.2, "block.3": 1.5}}


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
    (root / "sel.json").write_text(json.dumps(SELECTION))
    tokens_world(root, root / "base_model", [{"period": p, "split": s, "text": t} for s, p, t in rows])
    return root


def run(world, out, method, state=None, selection=True, **common):
    params = {"name": "m", "common": {**COMMON, **common}, "method": method}
    return train.run(params, init=world / "base_model", tokens=world / "tokens",
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


def test_mask_subnet_trains_only_inside_the_mask(world, tmp_path):
    """The sparse update through the whole loop (accelerate, clipping, weight decay, save):
    every weight outside the mask is bit-identical in the saved checkpoint."""
    gpt2 = AutoModelForCausalLM.from_pretrained(world / "base_model" / "model")
    folder = make_subnet(gpt2, tmp_path / "subnet", {0: 0.05, 1: 0.4, 2: 0.1, 3: 0.3})
    params = {"name": "m", "common": {**COMMON, "weight_decay": 0.1}, "method": {"mask": "subnet", "replay": {}}}
    metrics = train.run(params, init=world / "base_model", tokens=world / "tokens", period=1, seed=0,
                        out=tmp_path / "out", subnet=folder)
    masks = masking.load_masks(folder, 1, gpt2)
    init, trained = weights(world / "base_model"), weights(tmp_path / "out")
    assert metrics["trainable_params"] == sum(int(m.sum()) for m in masks.values())
    changed = 0
    for name in init:
        m = masks.get(name, torch.zeros(init[name].shape, dtype=torch.bool))
        assert torch.equal(init[name][~m], trained[name][~m]), name
        changed += int((init[name][m] != trained[name][m]).sum())
    assert changed > 0.9 * metrics["trainable_params"]


def test_same_seed_same_weights(world, tmp_path):
    method = {"layers": "all", "replay": {"ratio": 0.5}}
    run(world, tmp_path / "a", method, selection=False, epochs=2)
    run(world, tmp_path / "b", method, selection=False, epochs=2)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_log(tmp_path / "a")] == [r["loss"] for r in read_log(tmp_path / "b")]


def train_command(world, out, method, state, **common):
    params = {"name": "m", "common": {**COMMON, **common}, "method": method}
    return [sys.executable, "-m", "gradloc", "train", "--params", json.dumps(params),
            "--init", str(world / "base_model"), "--tokens", str(world / "tokens"),
            "--selection", str(world / "sel.json"), "--period", "1", "--seed", "0",
            "--state", str(state), "--out", str(out)]


def kill_when_saved(command, state, step=2):
    """Start a real training process and SIGKILL it (as SLURM does on preemption) as soon
    as its saved state reaches `step`: stopped from outside, at whatever point it is."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    latest = state / "latest.json"
    while proc.poll() is None:
        try:
            if json.loads(latest.read_text())["step"] >= step:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode


@pytest.mark.parametrize("method", [{"layers": "tgl_alr"}, {"lora": {"dropout": 0.1}, "recadam": {}}])
def test_resume_equals_uninterrupted(world, tmp_path, method):
    """Killed after its first saved state (or later), rerun, the result equals an
    uninterrupted run's: weights bit-identical, the same log rows."""
    common = {"grad_accum": 2, "save_every": 2, "epochs": 3}
    run(world, tmp_path / "full", method, state=tmp_path / "state_full", **common)
    assert not (tmp_path / "state_full").exists(), "state is removed at the end"

    state = tmp_path / "state"
    command = train_command(world, tmp_path / "resumed", method, state, **common)
    if kill_when_saved(command, state) != -signal.SIGKILL:
        pytest.skip("the run finished before it could be killed")
    assert not (tmp_path / "resumed").exists(), "a killed job must leave no output"
    assert json.loads((state / "latest.json").read_text())["step"] >= 2
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    a, b = weights(tmp_path / "full"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(read_log(tmp_path / "full")) == strip(read_log(tmp_path / "resumed"))
    assert not state.exists()
    assert not list(tmp_path.glob(".resumed.tmp-*")), "the killed attempt's temporary output is cleaned up"


def test_state_of_other_settings_is_ignored(world, tmp_path):
    state = tmp_path / "state"
    run(world, tmp_path / "x0", {"layers": "all"}, selection=False, save_every=1, state=state)
    # a state of lr 1e-2 left behind (as a killed run would leave it)
    progress = {"step": 1, "tokens": 0, "elapsed": 0.0, "log": [], "fingerprint": "other", "dir": "step-00000001"}
    state.mkdir()
    (state / "latest.json").write_text(json.dumps(progress))
    run(world, tmp_path / "x", {"layers": "all"}, selection=False, save_every=1, state=state, lr=5e-3)
    run(world, tmp_path / "y", {"layers": "all"}, selection=False, lr=5e-3)
    a, b = weights(tmp_path / "x"), weights(tmp_path / "y")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_replay_mixes_fresh_base_blocks_each_epoch(world):
    tok = char_tokenizer()
    cfg = train.settings({"common": {"seq_len": 16}, "method": {"replay": {"ratio": 1.5}}})
    toks = tokens.load(world / "tokens", tok)
    diff_docs, base_docs = train.period_docs(toks, 1)
    diff = engine.cut_blocks(engine.with_eos(diff_docs, 0), 16, 0)
    job = train.Job(cfg=cfg, tokenizer=tok, toks=toks, rows=None, period=1, seed=0, inputs={}, docs=diff_docs,
                    types=[], base_docs=base_docs, eos=0, pad_id=0, n_diff=len(diff["input_ids"]))
    epochs = train.Epochs(diff, [replay.PART.mix(cfg["method"]["replay"], job)], seed=0)
    e0, e1 = epochs.build(0), epochs.build(1)
    n = len(diff["input_ids"])
    assert int(e0["source"].sum()) == round(1.5 * n) and len(e0["source"]) == n + round(1.5 * n)
    assert e0["source"][: n].sum() > 0, "replay blocks are shuffled in, not appended"
    text = lambda blocks: "".join(t for b in blocks for t in tok.convert_ids_to_tokens(b))  # noqa: E731
    replay_text = text(e0["input_ids"][e0["source"] == 1])
    assert "Base" in replay_text and "New" not in replay_text
    diff_text = text(e0["input_ids"][e0["source"] == 0])
    assert "New" in diff_text and "Base" not in diff_text
    assert not torch.equal(e0["input_ids"][e0["source"] == 1], e1["input_ids"][e1["source"] == 1])
    assert torch.equal(epochs.build(0)["input_ids"], e0["input_ids"])
    # rows of epoch 1 are addressed as epoch * size + i
    assert torch.equal(epochs.__getitems__([epochs.size + 3])["input_ids"][0], e1["input_ids"][3])


def test_blocks_keep_every_token_and_mask_the_padding():
    blocks = engine.cut_blocks([np.arange(1, 4), np.arange(4, 11)], 4, pad_id=0)
    assert blocks["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]]
    assert blocks["labels"][2].tolist() == [9, 10, -100, -100]


def test_k_adapter_run_continues_into_the_next_period(world, tmp_path):
    from gradloc.methods import KAdapterModel, load_checkpoint

    method = {"k_adapter": {"layers": [1, 2]}}
    run(world, tmp_path / "P1", method, selection=False)
    assert (tmp_path / "P1" / "model" / "k_adapter.safetensors").exists()
    assert all(torch.equal(v, weights(world / "base_model")[k]) for k, v in weights(tmp_path / "P1").items())
    params = {"name": "k", "common": COMMON, "method": method}
    train.run(params, init=tmp_path / "P1", tokens=world / "tokens", selection=None, period=2, seed=0,
              state=None, out=tmp_path / "P2")
    p1, _ = load_checkpoint(tmp_path / "P1")
    p2, _ = load_checkpoint(tmp_path / "P2")
    assert isinstance(p2, KAdapterModel)
    assert not torch.equal(p1.adapters[0].up.weight, p2.adapters[0].up.weight)


def test_bad_inputs_raise_input_errors(world, tmp_path):
    with pytest.raises(InputError, match=r"train: unknown key\(s\) \['lrr'\]; expected one of"):
        train.settings({"common": {"lrr": 1}})
    with pytest.raises(InputError, match="period == 7"):
        train.run({"common": COMMON}, init=world / "base_model", tokens=world / "tokens", period=7, out=tmp_path / "o")
    with pytest.raises(InputError, match="seq_len 128 exceeds"):
        run(world, tmp_path / "o", {}, seq_len=128)


def test_cli_trains_and_writes_the_documented_outputs(world, tmp_path):
    params = json.dumps({"name": "tgl_fp+mix_review", "common": {**COMMON, "seeds": [0], "methods": {}},
                         "method": {"layers": "tgl_fp", "replay": {"ratio": 1.0}, "epochs": 2}})
    out = tmp_path / "train" / "tgl_fp+mix_review" / "seed0" / "P1"
    rc = cli.main(["train", "--params", params, "--init", str(world / "base_model"), "--tokens", str(world / "tokens"),
                   "--selection", str(world / "sel.json"), "--period", "1", "--seed", "0",
                   "--state", str(tmp_path / "state"), "--out", str(out)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "tgl_fp+mix_review" and metrics["epochs"] == 2
    assert metrics["blocks_per_epoch"] == 2 * metrics["diff_blocks"]
    assert metrics["steps"] == 2 * 9  # 18 blocks per epoch, batch 2, two epochs
    assert len(read_log(out)) == 9
    rc = cli.main(["train", "--params", params, "--init", str(world / "base_model"), "--tokens", str(world / "tokens"),
                   "--period", "1", "--seed", "0", "--out", str(tmp_path / "o2")])
    assert rc == 2, "tgl_fp without --selection is an input error"


def test_several_seeds_in_one_process_equal_one_process_per_seed(world, tmp_path):
    """train.group_seeds: `--seed 0 1 --out A B` trains each seed in turn; the weights are
    bit-identical to separate runs (dropout on, so the seed matters), and the seeds differ."""
    params = json.dumps({"name": "m", "common": {**COMMON, "epochs": 2}, "method": {"replay": {"ratio": 1.0}}})
    common = ["train", "--params", params, "--init", str(world / "base_model"), "--tokens", str(world / "tokens"),
              "--period", "1"]
    assert cli.main(common + ["--seed", "0", "1", "--out", str(tmp_path / "g0"), str(tmp_path / "g1"),
                              "--state", str(tmp_path / "s0"), str(tmp_path / "s1")]) == 0
    for seed in (0, 1):
        assert cli.main(common + ["--seed", str(seed), "--out", str(tmp_path / f"one{seed}")]) == 0
        grouped, alone = weights(tmp_path / f"g{seed}"), weights(tmp_path / f"one{seed}")
        assert all(torch.equal(grouped[k], alone[k]) for k in alone)
        assert json.loads((tmp_path / f"g{seed}" / "metrics.json").read_text())["seed"] == seed
    assert not torch.equal(weights(tmp_path / "g0")["transformer.h.0.mlp.c_fc.weight"],
                           weights(tmp_path / "g1")["transformer.h.0.mlp.c_fc.weight"])
    assert not (tmp_path / "s0").exists() and not (tmp_path / "s1").exists(), "spent states are removed"


def test_several_seeds_need_one_output_each(world, tmp_path, capsys):
    params = json.dumps({"name": "m", "common": COMMON, "method": {}})
    rc = cli.main(["train", "--params", params, "--init", str(world / "base_model"), "--tokens", str(world / "tokens"),
                   "--period", "1", "--seed", "0", "1", "--out", str(tmp_path / "a")])
    assert rc == 2
    assert "train: 2 seed(s) but 1 --out folder(s); give one per seed" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_schedule_warmup_then_linear_or_cosine_decay():
    def lrs(name, total, warmup, steps, processes=1):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        sched = engine.make_scheduler(opt, name, total, warmup, processes)
        out = []
        for _ in range(max(steps) + 1):
            out.append(sched.get_last_lr()[0])
            for _ in range(processes):  # accelerate steps a prepared scheduler once per process
                sched.step()
        return [out[s] for s in steps]

    assert lrs("linear", 10, 2, (0, 1, 2, 6)) == [0.0, 0.5, 1.0, 0.5]
    assert lrs("linear", 10, 2, (0, 1, 2, 6), processes=2) == [0.0, 0.5, 1.0, 0.5]
    assert lrs("cosine", 10, 0, (0, 5, 10)) == pytest.approx([1.0, 0.5, 0.0])
    with pytest.raises(InputError, match="schedule"):
        train.settings({"common": {"schedule": "step"}})


def test_gpu_request_is_checked(monkeypatch):
    """A job that asked for GPUs fails clearly when CUDA sees fewer; CPU-only torch only warns."""
    from gradloc.engine import check_gpus
    from gradloc.io import InputError

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


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    """Data-parallel proof on CPU: `gradloc train` as 2 processes (torchrun + accelerate,
    gloo backend) with batch 2 each, and as 1 process with batch 4, see the same blocks
    per step. Every block is full (16 documents of exactly 32 tokens), so the mean of the
    two processes' mean losses equals the one process's mean loss, and the averaged
    gradients agree up to float summation order. Adam's update divides by sqrt(v), which
    magnifies those last-bit differences for tiny gradients, so weights are compared with
    atol 1e-4 (1% of one Adam step at lr 1e-2) after 8 steps; the losses match to 1e-6."""
    import socket

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=64,
                                                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                                        embd_pdrop=0.0, attn_pdrop=0.0))
    save_model(model, char_tokenizer(), tmp_path / "base_model" / "model")
    texts = [f"Fact {i:02d}: Alice{i:02d} lives in Oslo." for i in range(16)]  # 31 characters + EOS
    tokens_world(tmp_path, tmp_path / "base_model", [{"text": t} for t in texts])

    def train_with(processes, batch_size, out):
        params = {"name": "full", "common": {"lr": 1e-2, "batch_size": batch_size, "seq_len": 32, "precision": "no",
                                             "epochs": 2, "log_every": 1}, "method": {}}
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                    "--master_addr", "127.0.0.1", "--master_port", str(port)] if processes > 1 else [sys.executable]
        command = launcher + ["-m", "gradloc", "train", "--params", json.dumps(params),
                              "--init", str(tmp_path / "base_model"), "--tokens", str(tmp_path / "tokens"),
                              "--period", "1", "--seed", "0", "--out", str(out)]
        env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
        r = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads((out / "metrics.json").read_text())

    one = train_with(1, 4, tmp_path / "one")
    two = train_with(2, 2, tmp_path / "two")
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["steps"] == two["steps"] == 8 and one["tokens"] == two["tokens"]
    losses = lambda folder: [float(r["loss"]) for r in read_log(folder)]  # noqa: E731
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-6)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    assert any(not torch.equal(a[k], weights(tmp_path / "base_model")[k]) for k in a), "training moved the weights"


def test_diverging_run_stops_naming_the_step_and_leaves_no_output(world, tmp_path, capsys):
    """lr 1e6 without clipping diverges: the run stops at the first non-finite loss with
    an error naming the step, lr and precision; no output folder, and the state saved
    before it stays."""
    state = tmp_path / "state"
    argv = ["train", "--params", json.dumps({"name": "m", "common": {**COMMON, "lr": 1e6, "grad_clip": None,
                                                                       "save_every": 1, "log_every": 50,
                                                                       "epochs": 4},
                                              "method": {}}),
            "--init", str(world / "base_model"), "--tokens", str(world / "tokens"), "--period", "1",
            "--seed", "0", "--state", str(state), "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 3
    err = capsys.readouterr().err
    m = re.search(r"non-finite loss or gradient norm at step (\d+) \(lr ([^,]+), precision no\); last finite loss", err)
    assert m, err[-2000:]
    assert not (tmp_path / "out").exists()
    saved = json.loads((state / "latest.json").read_text())["step"]
    assert saved == int(m.group(1)) - 1, "the state from just before the bad step is kept"


def test_current_replay_replays_the_latest_versions_of_the_base_documents(tmp_path):
    """`replay.source: current` replays each base document as the corpus' latest full version
    up to the trained period (never the replaced value); a document changed without a full
    version is left out; `base` (the default) replays T0 as it was."""
    import pandas as pd

    tok = char_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=96,
                                                        n_positions=64, bos_token_id=0, eos_token_id=0))
    save_model(model, tok, tmp_path / "base_model" / "model")
    rows = [{"seq_id": f"P0:D{i}:0", "period": 0, "split": "base", "text": f"Base {i} stays."} for i in range(3)]
    rows += [{"seq_id": "P0:D9:0", "period": 0, "split": "base", "text": "Dan works at Acme."},
             {"seq_id": "P1:D9:0", "period": 1, "split": "train", "text": "Dan works at Zeta."},
             {"seq_id": "P2:D0:0", "period": 2, "split": "train", "text": "Base 0 moved."}]
    toks = tokens.load(tokens_world(tmp_path, tmp_path / "base_model", rows), tok)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pd.DataFrame([{"doc_id": r["seq_id"].split(":")[1], "snapshot": 0, "title": "t", "text": r["text"], "kind": "full"}
                  for r in rows[:4]] + [{"doc_id": "D9", "snapshot": 1, "title": "t", "text": "Dan works at Zeta.",
                                         "kind": "full"}]).to_parquet(corpus / "documents.parquet")
    text = lambda docs: sorted("".join(tok.convert_ids_to_tokens(d)) for d in docs)  # noqa: E731
    assert replay.doc_id("P1:E0001_2:0") == "E0001_2" and replay.doc_id("s3") == "s3"
    assert text(replay.current_docs(toks, 1, corpus, tok)) == ["Base 0 stays.", "Base 1 stays.", "Base 2 stays.",
                                                               "Dan works at Zeta."]
    # period 2 changed D0 and the corpus has no full version of it: left out, never the old text
    assert text(replay.current_docs(toks, 2, corpus, tok)) == ["Base 1 stays.", "Base 2 stays.", "Dan works at Zeta."]
    with pytest.raises(InputError, match="needs --corpus"):
        replay.current_docs(toks, 1, None, tok)
    _, base_docs = train.period_docs(toks, 1)
    assert "Dan works at Acme." in text(base_docs), "source: base (the default) replays T0 as it was"
    assert replay.PART.needs({"ratio": 1.0, "source": "current"}, {}) == ["corpus"]
    assert replay.PART.needs({"ratio": 1.0}, {}) == []
