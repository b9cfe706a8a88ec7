"""What every figure shares: rows with numeric targets, the CSV and the printed table,
round-robin timing with paired ratios, and the GPT-2s the figures time.

A row's target is a number with an operator (`op`): `<=`, `>=`, `<`, `within` (|value /
target - 1| <= tol), `=` (equal up to a relative tol), `~` (for information: what the value
would be if the reasoning behind it held, never met or missed), or none.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import io
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # runs from a checkout without `pip install`
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

COLUMNS = ["figure", "setting", "value", "unit", "op", "target", "tol", "met", "machine"]
OPS = ("<=", ">=", "<", "within", "=", "~")
VOCAB = 2048  # the default config's tokenizer size: the LM head costs what it costs in the pipeline


def row(figure: int, setting: str, value: float, unit: str = "ratio", op: str = "", target: float | None = None,
        tol: float | None = None) -> dict:
    """One measured value; `op` and `target` (and `tol` for `within` / `=`) its target."""
    if op and op not in OPS:
        raise ValueError(f"unknown target operator {op!r}")
    if op and target is None:
        raise ValueError(f"{setting}: operator {op!r} without a target")
    if op in ("within", "=") and tol is None:
        raise ValueError(f"{setting}: {op!r} needs a tolerance")
    return {"figure": figure, "setting": setting, "value": float(value), "unit": unit, "op": op,
            "target": None if target is None else float(target), "tol": None if tol is None else float(tol)}


def meets(r: dict) -> str:
    """'yes' / 'no' against the row's target; '' without one or for `~` (information only)."""
    op, value, target, tol = r["op"], r["value"], r["target"], r["tol"]
    if not op or op == "~":
        return ""
    ok = {"<=": lambda: value <= target, ">=": lambda: value >= target, "<": lambda: value < target,
          "within": lambda: abs(value / target - 1) <= tol,
          "=": lambda: abs(value - target) <= tol * max(abs(target), 1e-12)}[op]()
    return "yes" if ok else "no"


def target_text(r: dict) -> str:
    if not r["op"]:
        return ""
    if r["op"] == "within":
        return f"{r['target']:.3g} ±{r['tol']:.0%}"
    if r["op"] == "=":
        return f"= {r['target']:.3g} (±{r['tol']:.0%})"
    return f"{r['op']} {r['target']:.3g}"


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


@contextlib.contextmanager
def silenced():
    """Progress bars and printed metrics of a training run kept off the table's output."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


# --- models ------------------------------------------------------------------------------

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


# --- output ------------------------------------------------------------------------------

def format_table(rows: list[dict]) -> str:
    head = ["fig", "setting", "value", "unit", "target", "met"]
    body = [[str(r["figure"]), r["setting"], f"{r['value']:.4g}", r["unit"], target_text(r), meets(r)] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *body]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def write_csv(rows: list[dict], path: Path, machine_desc: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    num = (lambda x: "" if x is None else f"{x:.6g}")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "value": num(r["value"]), "target": num(r["target"]), "tol": num(r["tol"]),
                             "met": meets(r), "machine": machine_desc})
    os.replace(tmp, path)


def read_csv(path: Path) -> list[dict]:
    """Rows of a results CSV with numbers as floats (target/tol None when empty)."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["figure"], r["value"] = int(r["figure"]), float(r["value"])
        r["target"], r["tol"] = (float(r[k]) if r[k] else None for k in ("target", "tol"))
    return rows
