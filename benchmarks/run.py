#!/usr/bin/env python
"""gradloc benchmarks: every figure as a ratio measured side by side in one run.

    python benchmarks/run.py [--quick] [--out benchmarks/results.csv]

1. profiling cost: per-example per-unit gradient norms of B sequences (one batched pass,
   `gradloc.profile.per_example_grad_norms`) and the naive loop (one backward per
   sequence), each divided by one plain batched forward+backward of the same batch;
2. targeted training: TGL-FP step time (k of L blocks trainable, frozen by
   `gradloc.methods.prepare`) / full step time, next to the analytical FLOP limit; and
   AdamW state bytes / full AdamW state bytes next to the trained-parameter share;
3. throughput: tokens/s of `gradloc.train.run` / tokens/s of Hugging Face `Trainer`;
4. pipeline overhead: `snakemake -n` wall time on the default config, and the share of a
   real run's wall time spent outside the stages' own work;
5. scaling: profiling and training-step time for three sequence counts and three model
   sizes, with the log-log growth exponent (1 = linear).

Baseline and candidate are interleaved (round robin), after a warm-up, and the median of
the repetitions is taken, because shared machines are noisy: ratios are what to compare,
absolute times vary. Models are GPT-2s built from `GPT2Config` (random init, vocabulary
2048 as the pipeline's default tokenizer, no dropout as the pipeline's base model).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import io
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # runs from a checkout without `pip install`
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

COLUMNS = ["figure", "setting", "value", "target", "unit", "machine"]
VOCAB = 2048  # the default config's tokenizer size: the LM head costs what it costs in the pipeline

# Sizes of each preset: (n_layer, n_embd) pairs, batch sizes, repetitions.
PRESETS = {
    "full": {
        "seq_len": 128, "reps": 3,
        "profile_sizes": [(4, 128), (8, 256)], "profile_batches": [8, 32],
        "train_size": (8, 256), "train_batch": 8, "train_reps": 6,
        "tput_size": (4, 128), "tput_batch": 8, "tput_steps": 24, "tput_reps": 5,
        "scale_counts": [8, 16, 32], "scale_count_size": (4, 128),
        "scale_sizes": [(2, 128), (4, 192), (8, 256)], "scale_size_batch": 8, "scale_reps": 4,
        "dry_reps": 3, "pipeline": True,
    },
    "quick": {
        "seq_len": 64, "reps": 2,
        "profile_sizes": [(4, 128), (8, 256)], "profile_batches": [8, 32],
        "train_size": (8, 128), "train_batch": 8, "train_reps": 4,
        "tput_size": (4, 128), "tput_batch": 8, "tput_steps": 12, "tput_reps": 3,
        "scale_counts": [8, 16, 32], "scale_count_size": (4, 128),
        "scale_sizes": [(2, 64), (4, 128), (8, 192)], "scale_size_batch": 8, "scale_reps": 3,
        "dry_reps": 2, "pipeline": True,
    },
    # the smoke test: every code path, seconds
    "tiny": {
        "seq_len": 16, "reps": 1,
        "profile_sizes": [(2, 32)], "profile_batches": [2, 4],
        "train_size": (4, 32), "train_batch": 2, "train_reps": 1,
        "tput_size": (2, 32), "tput_batch": 2, "tput_steps": 2, "tput_reps": 1,
        "scale_counts": [2, 4, 8], "scale_count_size": (2, 32),
        "scale_sizes": [(1, 32), (2, 32), (4, 32)], "scale_size_batch": 2, "scale_reps": 1,
        "dry_reps": 1, "pipeline": False, "slurm_probe": False,
    },
}


def row(figure: int, setting: str, value: float, target: str = "", unit: str = "ratio") -> dict:
    return {"figure": figure, "setting": setting, "value": float(value), "target": target, "unit": unit}


# --- machine and timing ------------------------------------------------------------------

def machine() -> str:
    """CPU model, cores, torch threads: the context every figure was measured in."""
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = re.search(r"^Model name:\s*(.+)$", out, re.M).group(1).strip()
    except (OSError, AttributeError, subprocess.SubprocessError):
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, CPU fp32, torch {torch.__version__}"


def interleaved(fns: dict, reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, calls round robin so that a burst of load from
    elsewhere hits every candidate alike; `warmup` rounds are run first and dropped. A
    function that returns a float reports its own time (see `warm`)."""
    times = {name: [] for name in fns}
    for r in range(warmup + reps):
        for name, fn in fns.items():
            gc.collect()
            t = time.perf_counter()
            own = fn()
            if r >= warmup:
                times[name].append(own if isinstance(own, float) else time.perf_counter() - t)
    return times


def warm(fn, n: int = 2):
    """A function for `interleaved` that runs `fn` once untimed, then reports the mean time
    of `n` more calls: the round robin must not charge a model for the cache its
    predecessor in the round evicted, as a training loop stepping one model never pays it."""
    def timed() -> float:
        fn()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n
    return timed


def median(xs) -> float:
    return statistics.median(xs)


def paired_ratio(times: dict, name: str, base: str) -> float:
    """Median over rounds of time(name) / time(base) in the same round: a slow drift of the
    machine's load cancels within a round."""
    return median([a / b for a, b in zip(times[name], times[base])])


def loglog_slope(xs, ys) -> float:
    """Least-squares slope of log y on log x: 1 = linear growth, 2 = quadratic."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


# --- models and steps --------------------------------------------------------------------

def gpt2(n_layer: int, n_embd: int, seq_len: int, seed: int = 0):
    """A randomly initialised GPT-2 (no hub), without dropout like the pipeline's base model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=max(1, n_embd // 64), vocab_size=VOCAB,
                        n_positions=seq_len, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(config)


def random_batch(batch: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq_len), generator=g)
    return ids, torch.ones_like(ids)


def plain_backward(model, ids, mask) -> None:
    """One ordinary batched forward + backward (weight gradients formed), the same loss as
    the profile's: sum over examples of each example's mean token loss."""
    from gradloc.profile import per_example_loss

    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    per_example_loss(logits, ids, mask).sum().backward()


def naive_grad_norms(model, ids, mask, units: dict[str, list[str]]) -> torch.Tensor:
    """(B, n_units) per-example unit gradient norms, one backward per sequence."""
    params = dict(model.named_parameters())
    rows = []
    for b in range(ids.shape[0]):
        plain_backward(model, ids[b:b + 1], mask[b:b + 1])
        rows.append(torch.stack([sum(params[n].grad.pow(2).sum() for n in names if params[n].grad is not None)
                                 for names in units.values()]).sqrt())
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


_ACCELERATOR = None


def accelerator():
    """One accelerate.Accelerator for every model here, as `gradloc.train.run` makes one."""
    global _ACCELERATOR
    if _ACCELERATOR is None:
        from accelerate import Accelerator

        _ACCELERATOR = Accelerator(mixed_precision="no", cpu=True)
    return _ACCELERATOR


def trainee(n_layer, n_embd, seq_len, blocks: list[int] | None):
    """(step(x), optimizer, trained parameter count) set up by the pipeline's own code:
    `methods.prepare` freezes (`blocks` None = full fine-tuning, else TGL-FP training those
    blocks), `methods.make_optimizer` builds AdamW, and step(x) is one `train.train_step`
    (forward, lm_loss, backward, clip 1.0, AdamW step) on the (B, T) batch x."""
    from gradloc import methods, train

    model = gpt2(n_layer, n_embd, seq_len)
    if blocks is None:
        prep = methods.prepare(model, {"layers": "all"})
    else:
        sel = {"granularity": "block", "units": [f"block.{i}" for i in blocks], "lr_multipliers": {}}
        prep = methods.prepare(model, {"layers": "tgl_fp"}, sel)
    optimizer = methods.make_optimizer(prep, lr=1e-4, weight_decay=0.01)
    acc = accelerator()
    model, optimizer = acc.prepare(prep.model, optimizer)
    model.train()
    trained = sum(p.numel() for g in prep.groups for p in g["params"])

    def step(x):
        data = {"input_ids": x, "labels": x}
        train.train_step(acc, model, optimizer, prep, data, torch.arange(len(x)), 1, 1.0)

    return step, optimizer, trained


# --- the analytical limit of targeted training --------------------------------------------

def step_flops(n_layer: int, n_embd: int, seq_len: int, vocab: int, trainable: list[int] | None) -> float:
    """Matmul FLOPs per token of one training step (elementwise work is not counted).

    A block's forward is w + a: w = 24 d^2 for its weight matmuls (qkv 3d^2, out d^2, MLP
    8d^2 multiply-adds), a = 4 T d for attention (scores and weighted sum, no weights).
    The head is h = 2 d V; the embedding lookup costs nothing. Backward: the input-gradient
    of a block costs w + 2a (both operands of the attention matmuls), its weight-gradient w,
    so a fully trained block costs 3x its forward. Full training (`trainable` None): every
    input- and weight-gradient. TGL-FP training blocks `trainable` (embeddings and the tied
    head frozen): forward through all L blocks and the head; input-gradients of the head and
    of the blocks above the lowest trainable one m; weight-gradients of trainable blocks only.
    """
    d, T = n_embd, seq_len
    w, a, h = 24 * d * d, 4 * T * d, 2 * d * vocab
    forward = n_layer * (w + a) + h
    if trainable is None:
        return forward + (n_layer * (w + 2 * a) + h) + (n_layer * w + h)
    m = min(trainable)
    return forward + (h + (n_layer - 1 - m) * (w + 2 * a)) + len(trainable) * w


def placements(n_layer: int) -> list[tuple[str, list[int]]]:
    """k = L/4 and L/2 blocks, at the bottom and at the top."""
    out = []
    for k in sorted({max(1, n_layer // 4), max(1, n_layer // 2)}):
        out.append((f"k={k}/{n_layer} lower", list(range(k))))
        out.append((f"k={k}/{n_layer} upper", list(range(n_layer - k, n_layer))))
    return out


# --- figure 1: profiling cost --------------------------------------------------------------

def fig_profiling(sizes, batches, seq_len: int, reps: int) -> list[dict]:
    from gradloc.models import layer_units
    from gradloc.profile import per_example_grad_norms

    rows = []
    for n_layer, n_embd in sizes:
        model = gpt2(n_layer, n_embd, seq_len).eval()
        units = layer_units(model, "block")
        for B in batches:
            ids, mask = random_batch(B, seq_len)
            ours = per_example_grad_norms(model, ids, mask, units)
            naive = naive_grad_norms(model, ids, mask, units)
            err = float(((ours - naive).abs() / naive.abs().clamp(min=1e-12)).max())
            t = interleaved({"plain": lambda: plain_backward(model, ids, mask),
                             "ours": lambda: per_example_grad_norms(model, ids, mask, units),
                             "naive": lambda: naive_grad_norms(model, ids, mask, units)}, reps)
            base = median(t["plain"])
            s = f"{n_layer}x{n_embd}, B={B}, T={seq_len}"
            rows.append(row(1, f"ours / plain fwd+bwd, {s}", paired_ratio(t, "ours", "plain"), "<=1.5"))
            rows.append(row(1, f"naive loop / plain fwd+bwd, {s}", paired_ratio(t, "naive", "plain"), f"~{B}"))
            rows.append(row(1, f"plain fwd+bwd time, {s}", base, "", "s"))
            rows.append(row(1, f"ours vs naive max relative difference, {s}", err, "<1e-3", "rel"))
        del model
    return rows


# --- figure 2: targeted training speed and optimizer state -------------------------------

def fig_targeted(size, batch: int, seq_len: int, reps: int) -> list[dict]:
    n_layer, n_embd = size
    configs = {"full": None, **dict(placements(n_layer))}
    from gradloc.train import optimizer_state_bytes

    trainees = {name: trainee(n_layer, n_embd, seq_len, blocks) for name, blocks in configs.items()}
    x, _ = random_batch(batch, seq_len)
    fns = {name: warm(lambda step=step: step(x)) for name, (step, _, _) in trainees.items()}
    t = interleaved(fns, reps)
    full_t = median(t["full"])
    full_flops = step_flops(n_layer, n_embd, seq_len, VOCAB, None)
    full_state = optimizer_state_bytes(trainees["full"][1])
    full_params = trainees["full"][2]
    s0 = f"{n_layer}x{n_embd}, B={batch}, T={seq_len}"
    rows = [row(2, f"full step time, {s0}", full_t, "", "s"),
            row(2, f"full AdamW state, {s0}", full_state / 2**20, "", "MiB")]
    for name, blocks in configs.items():
        if blocks is None:
            continue
        _, opt, trained = trainees[name]
        limit = step_flops(n_layer, n_embd, seq_len, VOCAB, blocks) / full_flops
        measured = paired_ratio(t, name, "full")
        rows.append(row(2, f"TGL-FP step / full step, {name}, {s0}", measured, f"{limit:.3f}±10%"))
        rows.append(row(2, f"analytical limit, {name}", limit, "", "ratio"))
        rows.append(row(2, f"AdamW state / full, {name}", optimizer_state_bytes(opt) / full_state,
                        f"={trained / full_params:.3f} (trained params share)"))
    return rows


# --- figure 3: throughput against Hugging Face Trainer -----------------------------------

def _char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, **{chr(c): i + 1 for i, c in enumerate(range(32, 127))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


@contextlib.contextmanager
def silenced():
    """Progress bars and printed metrics of a training run kept off the table's output."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def synthetic_world(root: Path, size, seq_len: int, n_blocks: int) -> tuple[Path, Path]:
    """A base_model folder (GPT-2 + character tokenizer) and a tagged folder whose period-1
    diff is `n_blocks` blocks of `seq_len` characters (one token per character)."""
    import numpy as np
    import pandas as pd

    from gradloc.models import save_model

    save_model(gpt2(*size, seq_len), _char_tokenizer(), root / "base_model" / "model")
    rng = np.random.default_rng(0)
    words = ["river", "alice", "works", "at", "acme", "moved", "to", "oslo", "born", "in", "the", "of"]
    doc_len = seq_len * 4 - 1  # + EOS: four blocks per document, none padded
    texts = []
    for _ in range(math.ceil(n_blocks / 4)):
        text = " ".join(rng.choice(words, doc_len))
        texts.append(text[:doc_len])
    rows = [{"seq_id": f"s{i}", "period": 1, "split": "train", "doc_id": f"d{i}", "origin": "diff",
             "text": t, "knowledge_type": "none"} for i, t in enumerate(texts)]
    rows.append({"seq_id": "b0", "period": 0, "split": "base", "doc_id": "b0", "origin": "base",
                 "text": "base text", "knowledge_type": "none"})
    (root / "tagged").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(root / "tagged" / "sequences.parquet")
    return root / "base_model", root / "tagged"


def ours_throughput(init: Path, tagged: Path, out: Path, batch: int, seq_len: int) -> tuple[int, float]:
    """(tokens, seconds of the training loop) of `gradloc.train.run`, full fine-tuning."""
    from gradloc import train

    shutil.rmtree(out, ignore_errors=True)
    params = {"name": "full", "method": {},
              "common": {"lr": 1e-4, "epochs": 1, "batch_size": batch, "seq_len": seq_len, "precision": "no",
                         "grad_clip": 1.0, "weight_decay": 0.01, "warmup_ratio": 0.0, "log_every": 10**9}}
    with silenced():  # the progress bar
        metrics = train.run(params, init=init, tagged=tagged, period=1, seed=0, out=out)
    return int(metrics["tokens"]), float(metrics["wall_time_s"])


def trainer_throughput(init: Path, tagged: Path, out: Path, batch: int, seq_len: int) -> tuple[int, float]:
    """(tokens, `train_runtime`) of transformers.Trainer on the same blocks, model, batch,
    fp32 CPU, AdamW lr 1e-4 wd 0.01, clip 1.0, linear schedule, one epoch (Trainer's own
    defaults otherwise)."""
    from transformers import Trainer, TrainingArguments

    from gradloc import train
    from gradloc.models import load_model

    model, tokenizer = load_model(init / "model", dtype=torch.float32)
    diff, _ = train.load_texts(tagged, 1)
    blocks = train.cut_blocks(train.tokenize(diff, tokenizer), seq_len, tokenizer.pad_token_id or 0)
    data = [{"input_ids": x, "labels": y, "attention_mask": (y != -100).long()}
            for x, y in zip(blocks["input_ids"], blocks["labels"])]
    tokens = int((blocks["labels"][:, 1:] != -100).sum())
    shutil.rmtree(out, ignore_errors=True)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch, num_train_epochs=1,
                             learning_rate=1e-4, weight_decay=0.01, max_grad_norm=1.0, lr_scheduler_type="linear",
                             warmup_steps=0, logging_strategy="no", save_strategy="no", report_to="none",
                             use_cpu=True, disable_tqdm=True, seed=0, dataloader_pin_memory=False)
    with silenced():  # Trainer prints its metrics
        result = Trainer(model=model, args=args, train_dataset=data).train()
    return tokens, float(result.metrics["train_runtime"])


def fig_throughput(size, batch: int, seq_len: int, steps: int, reps: int, workdir: Path) -> list[dict]:
    init, tagged = synthetic_world(workdir / "world", size, seq_len, steps * batch)
    got = {"ours": [], "trainer": []}

    def ours():
        got["ours"].append(ours_throughput(init, tagged, workdir / "ours", batch, seq_len))

    def trainer():
        got["trainer"].append(trainer_throughput(init, tagged, workdir / "trainer", batch, seq_len))

    interleaved({"ours": ours, "trainer": trainer}, reps)
    rates = {k: [tok / sec for tok, sec in v[1:]] for k, v in got.items()}  # [0] is the warm-up
    tok_s = {k: median(v) for k, v in rates.items()}
    ratio = median([a / b for a, b in zip(rates["ours"], rates["trainer"])])
    s = f"{size[0]}x{size[1]}, B={batch}, T={seq_len}, {steps} steps, full fine-tuning"
    return [row(3, f"gradloc train / HF Trainer tokens/s, {s}", ratio, ">=1.0"),
            row(3, f"gradloc train tokens/s, {s}", tok_s["ours"], "", "tokens/s"),
            row(3, f"HF Trainer tokens/s, {s}", tok_s["trainer"], "", "tokens/s")]


# --- figure 4: pipeline overhead ---------------------------------------------------------

def snakemake_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "snakemake", *args]


def dry_run_seconds(results: Path, reps: int, env: dict | None = None) -> tuple[float, int]:
    """Median wall time of `snakemake -n` on the default config (all methods and seeds)
    with an empty results folder (every job planned), and the number of jobs."""
    times, n_jobs = [], 0
    for _ in range(reps):
        t = time.perf_counter()
        r = subprocess.run(snakemake_cmd("-n", "--cores", "2", "--config", f"results={results}"),
                           cwd=ROOT, env=env or PIPELINE_ENV, capture_output=True, text=True, timeout=300)
        times.append(time.perf_counter() - t)
        if r.returncode != 0:
            raise RuntimeError(f"snakemake -n failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        m = re.search(r"^total\s+(\d+)", r.stdout + r.stderr, re.M)
        n_jobs = int(m.group(1)) if m else 0
    return median(times), n_jobs


PIPELINE_ENV = None  # the environment before quiet_libraries()

# Stands in for `python` on the jobs' PATH: times the interpreter's start, the imports a
# stage needs, and the stage's own work, then runs the stage as `python -m gradloc` would.
TIMED_JOB = r'''
import os, sys, time
t_start = float(os.environ.pop("GRADLOC_BENCH_T0", time.time()))
args = sys.argv[1:]
if args[:2] != ["-m", "gradloc"]:
    os.execv(sys.executable, [sys.executable, *args])
import importlib, json
from gradloc import cli
stage = args[2] if len(args) > 2 else None
if stage in cli.STAGES:
    importlib.import_module(cli.STAGES[stage][0])
    if "torch" in sys.modules:  # every torch stage loads a model: its import is start-up too
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
t_imported = time.time()
rc = 1
try:
    rc = cli.main(args[2:])
finally:
    with open(os.environ["GRADLOC_BENCH_LOG"], "a") as f:
        f.write(json.dumps({"id": int(os.environ["GRADLOC_BENCH_ID"]), "stage": stage, "start": t_start,
                            "imported": t_imported, "end": time.time(), "rc": rc}) + "\n")
sys.exit(rc)
'''


def union_seconds(intervals) -> float:
    """Length of the union of (start, end) intervals: time during which any of them ran."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + (cur_e - cur_s if cur_e is not None else 0.0)


def overhead_shares(jobs: list[dict], t_begin: float, t_end: float) -> dict:
    """Shares of the run's wall time during which no stage did its own work, split into
    `scheduler` (no job process alive: Snakemake's start, DAG, job selection, checkpoint
    re-evaluation) and `job_overhead` (job processes alive but none working: starting Python
    and importing, or tearing the interpreter down after the work). Each job: `start`
    (process start), `imported`, `end` (work done), `exit` (process gone; `end` if unknown)."""
    wall = t_end - t_begin
    exits = [j.get("exit", j["end"]) for j in jobs]
    alive = union_seconds([(j["start"], e) for j, e in zip(jobs, exits)])
    working = union_seconds([(j["imported"], j["end"]) for j in jobs])
    mean = (lambda xs: statistics.mean(xs) if xs else 0.0)
    return {"wall_s": wall, "jobs": len(jobs),
            "outside": 1 - working / wall, "scheduler": 1 - alive / wall, "job_overhead": (alive - working) / wall,
            "first_job_s": min(j["start"] for j in jobs) - t_begin if jobs else 0.0,
            "startup_s": mean([j["imported"] - j["start"] for j in jobs]),
            "teardown_s": mean([e - j["end"] for j, e in zip(jobs, exits)]),
            "overhead_share_of_job_time": (sum(e - j["start"] - (j["end"] - j["imported"]) for j, e in zip(jobs, exits))
                                           / max(sum(e - j["start"] for j, e in zip(jobs, exits)), 1e-9))}


def timing_shim(workdir: Path) -> tuple[dict, Path]:
    """(environment, log): with the environment, `python` on PATH is a shell script that
    runs TIMED_JOB, and records when the interpreter has exited (its teardown counts too)."""
    shim = workdir / "shim"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "timed_job.py").write_text(TIMED_JOB)
    (shim / "python").write_text(
        "#!/bin/sh\nexport GRADLOC_BENCH_ID=$$\n"
        f'GRADLOC_BENCH_T0=$(date +%s.%N) "{sys.executable}" "{shim / "timed_job.py"}" "$@"\n'
        'rc=$?\nprintf \'{"id": %s, "exit": %s}\\n\' "$$" "$(date +%s.%N)" >> "$GRADLOC_BENCH_LOG"\nexit $rc\n')
    (shim / "python").chmod(0o755)
    log = workdir / "jobs.jsonl"
    log.unlink(missing_ok=True)
    env = dict(PIPELINE_ENV or os.environ)
    env.update(PATH=f"{shim}{os.pathsep}{env.get('PATH', '')}", GRADLOC_BENCH_LOG=str(log),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH", "")])))
    return env, log


def read_job_log(log: Path) -> list[dict]:
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    exits = {r["id"]: r["exit"] for r in records if "exit" in r}
    return [{**r, "exit": exits.get(r["id"], r["end"])} for r in records if "stage" in r]


def timed_pipeline_run(configfile: str, workdir: Path, cores: int = 2) -> dict:
    """Run Snakemake on `configfile` into workdir/results with every job timed."""
    env, log = timing_shim(workdir)
    t_begin = time.time()
    r = subprocess.run(snakemake_cmd("--cores", str(cores), "--configfile", configfile,
                                     "--config", f"results={workdir / 'results'}"),
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    t_end = time.time()
    if r.returncode != 0:
        raise RuntimeError(f"snakemake run failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    jobs = read_job_log(log)
    if not jobs:
        raise RuntimeError("no job was timed: did the rules stop calling `python -m gradloc`?")
    return overhead_shares(jobs, t_begin, t_end)


def slurm_probe_seconds() -> float | None:
    """Seconds of `scontrol show config`, which the SLURM executor plugin runs (timeout 10 s)
    when Snakemake imports it, i.e. at every Snakemake start; None without scontrol."""
    if not shutil.which("scontrol"):
        return None
    t = time.perf_counter()
    try:
        subprocess.run(["scontrol", "show", "config"], capture_output=True, timeout=10)
    except subprocess.TimeoutExpired:
        pass
    return time.perf_counter() - t


def without_scontrol(workdir: Path) -> dict:
    """The environment with an `scontrol` that fails at once, as on a machine without SLURM."""
    stub = workdir / "no_slurm"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "scontrol").write_text("#!/bin/sh\nexit 1\n")
    (stub / "scontrol").chmod(0o755)
    env = dict(PIPELINE_ENV or os.environ)
    return {**env, "PATH": f"{stub}{os.pathsep}{env.get('PATH', '')}"}


def fig_pipeline(workdir: Path, dry_reps: int, run_config: str | None, slurm_probe: bool = True) -> list[dict]:
    dry, n_jobs = dry_run_seconds(workdir / "dry_results", dry_reps)
    rows = [row(4, f"snakemake -n, config/config.yaml ({n_jobs} jobs)", dry, "<3", "s")]
    probe = slurm_probe_seconds() if slurm_probe else None
    if probe is not None:  # a SLURM client without a reachable controller stalls every start
        rows.append(row(4, "  of which the SLURM plugin's `scontrol show config` probe", probe, "", "s"))
        stubbed, _ = dry_run_seconds(workdir / "dry_results", dry_reps, without_scontrol(workdir))
        rows.append(row(4, "snakemake -n, config/config.yaml, scontrol stubbed out", stubbed, "<3", "s"))
    if run_config:
        o = timed_pipeline_run(run_config, workdir / "run")
        s = f"{run_config}, {o['jobs']} jobs, {o['wall_s']:.0f} s wall"
        rows += [row(4, f"share of wall time outside stage work, {s}", o["outside"], "<0.05", "share"),
                 row(4, f"  of which Snakemake alone (no job process alive), {s}", o["scheduler"], "", "share"),
                 row(4, f"  of which job start-up and exit, no job working, {s}", o["job_overhead"], "", "share"),
                 row(4, f"Snakemake start to first job, {run_config}", o["first_job_s"], "", "s"),
                 row(4, f"mean job start-up (Python + imports), {run_config}", o["startup_s"], "", "s"),
                 row(4, f"mean job exit (interpreter teardown), {run_config}", o["teardown_s"], "", "s"),
                 row(4, f"start-up + exit share of summed job time, {run_config}",
                     o["overhead_share_of_job_time"], "", "share")]
    return rows


# --- figure 5: scaling -------------------------------------------------------------------

def fig_scaling(counts, count_size, sizes, size_batch: int, seq_len: int, reps: int) -> list[dict]:
    """Profiling and full training-step time against sequence count (at one model size)
    and against model size (at one count); size = forward matmul FLOPs per token."""
    from gradloc.models import layer_units
    from gradloc.profile import per_example_grad_norms

    rows = []

    def series(label: str, points):  # points: [(x, x label, model size, batch)]
        # Every point's models first, then all calls round robin: the growth compares points.
        fns, models = {}, {}
        for x, _, size, B in points:
            if size not in models:
                model = gpt2(*size, seq_len).eval()
                models[size] = (model, layer_units(model, "block"), trainee(*size, seq_len, None)[0])
            model, units, step = models[size]
            ids, mask = random_batch(B, seq_len)
            fns[("profile", x)] = warm(lambda model=model, ids=ids, mask=mask, units=units:
                                       per_example_grad_norms(model, ids, mask, units), 1)
            fns[("step", x)] = warm(lambda step=step, ids=ids: step(ids), 1)
        t = interleaved(fns, reps)
        xs = [p[0] for p in points]
        for kind, name in (("profile", "profile"), ("step", "train step")):
            ys = [median(t[(kind, x)]) for x in xs]
            rows.extend(row(5, f"{name} time, {label}={p[1]}", y, "", "s") for p, y in zip(points, ys))
            # the slope of each round's points, median over rounds (paired, like the ratios)
            slope = median([loglog_slope(xs, [t[(kind, x)][r] for x in xs]) for r in range(reps)])
            rows.append(row(5, f"{name} growth exponent vs {label}", slope, "<=1.1", "exponent"))
        del models, fns

    series("sequences", [(n, f"{n} ({count_size[0]}x{count_size[1]}, T={seq_len})", count_size, n) for n in counts])
    flops = [step_flops(L, d, seq_len, VOCAB, None) / 3 for L, d in sizes]
    series("model FLOPs/token", [(f, f"{f / 1e6:.2f}M ({L}x{d}, B={size_batch})", (L, d), size_batch)
                                 for f, (L, d) in zip(flops, sizes)])
    return rows


# --- output ------------------------------------------------------------------------------

def meets(value: float, target: str) -> str:
    """'yes'/'no' for a parseable target, '' for none or informative ones (~B, =share)."""
    t = target.split(" ")[0]
    try:
        if t.startswith("<="):
            return "yes" if value <= float(t[2:]) else "no"
        if t.startswith("<"):
            return "yes" if value < float(t[1:]) else "no"
        if t.startswith(">="):
            return "yes" if value >= float(t[2:]) else "no"
        if "±" in t:
            limit, tol = t.split("±")
            return "yes" if abs(value / float(limit) - 1) <= float(tol.rstrip("%")) / 100 else "no"
        if t.startswith("="):
            return "yes" if abs(value - float(t[1:])) <= 0.01 * max(abs(float(t[1:])), 1e-9) + 1e-3 else "no"
    except ValueError:
        pass
    return ""


def format_table(rows: list[dict]) -> str:
    head = ["fig", "setting", "value", "unit", "target", "met"]
    body = [[str(r["figure"]), r["setting"], f"{r['value']:.4g}", r["unit"], r["target"], meets(r["value"], r["target"])]
            for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *body]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def write_csv(rows: list[dict], path: Path, machine_desc: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "value": f"{r['value']:.6g}", "machine": machine_desc})
    os.replace(tmp, path)


def run_all(preset: dict, workdir: Path, figures=(1, 2, 3, 4, 5), pipeline_config: str | None = None) -> list[dict]:
    p, T = preset, preset["seq_len"]
    rows = []
    steps = {
        1: lambda: fig_profiling(p["profile_sizes"], p["profile_batches"], T, p["reps"]),
        2: lambda: fig_targeted(p["train_size"], p["train_batch"], T, p["train_reps"]),
        3: lambda: fig_throughput(p["tput_size"], p["tput_batch"], T, p["tput_steps"], p["tput_reps"],
                                  workdir / "throughput"),
        4: lambda: fig_pipeline(workdir / "pipeline", p["dry_reps"], pipeline_config if p["pipeline"] else None,
                                p.get("slurm_probe", True)),
        5: lambda: fig_scaling(p["scale_counts"], p["scale_count_size"], p["scale_sizes"], p["scale_size_batch"],
                               T, p["scale_reps"]),
    }
    for fig in figures:
        t = time.perf_counter()
        print(f"figure {fig} ...", file=sys.stderr, flush=True)
        rows += steps[fig]()
        print(f"figure {fig} done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return rows


def quiet_libraries() -> None:
    """No progress bars or advice from the libraries between the figures (the pipeline
    run of figure 4 gets the original environment)."""
    global PIPELINE_ENV
    PIPELINE_ENV = dict(os.environ)
    os.environ.update(TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions (about 3 min "
                    "plus the config/test.yaml pipeline run)")
    ap.add_argument("--preset", choices=sorted(PRESETS), help=argparse.SUPPRESS)  # tiny: the smoke test
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.csv")
    ap.add_argument("--figures", default="1,2,3,4,5", help="comma-separated figures to run (default all)")
    ap.add_argument("--pipeline-config", default="config/test.yaml",
                    help="config of the timed pipeline run of figure 4 (the default config takes hours on a "
                         "CPU); 'none' skips the run, keeping the dry-run timing")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: stable ratios on a shared machine; 0 = torch's default)")
    ap.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one, removed)")
    args = ap.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    quiet_libraries()
    preset = PRESETS[args.preset or ("quick" if args.quick else "full")]
    figures = [int(f) for f in args.figures.split(",") if f.strip()]
    run_config = None if args.pipeline_config.lower() == "none" else args.pipeline_config
    desc = machine()
    print(f"machine: {desc}", file=sys.stderr)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gradloc-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        rows = run_all(preset, workdir, figures, run_config)
    write_csv(rows, args.out, desc)
    print(format_table(rows))
    print(f"\n{len(rows)} figures in {time.perf_counter() - t0:.0f} s on {desc}; written to {args.out}")
    return rows


if __name__ == "__main__":
    main()
