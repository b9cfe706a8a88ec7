"""Figure 4, pipeline overhead: wall time of `snakemake -n` on the default config (every
job planned), then a real run of a config in a scratch results folder with `python` on
the jobs' PATH replaced by a timing shim. Per job the shim records the process start, the
end of the stage's imports (its module, plus the `transformers` classes it loads: auto
model and tokenizer for torch stages, the tokenizer for `tokens`), the end of the stage's
work and the interpreter's exit, and whether the job imported torch. "Outside stage work"
= wall time during which no job was doing its own work."""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .common import ROOT, median, row

PIPELINE_ENV = None  # the environment before run.quiet_libraries(): the jobs get the original one
TORCH_STAGES = {"base-model", "profile", "train", "evaluate", "attention", "subnet", "metatrain"}  # model stages

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
    if stage == "tokens":  # loads the base model's tokenizer: that import is start-up too
        from transformers import AutoTokenizer  # noqa: F401
    elif "torch" in sys.modules:  # every torch stage loads a model
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
t_imported = time.time()
rc = 1
try:
    rc = cli.main(args[2:])
finally:
    with open(os.environ["GRADLOC_BENCH_LOG"], "a") as f:
        f.write(json.dumps({"id": int(os.environ["GRADLOC_BENCH_ID"]), "stage": stage, "start": t_start,
                            "imported": t_imported, "end": time.time(), "rc": rc,
                            "torch": "torch" in sys.modules}) + "\n")
sys.exit(rc)
'''


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


def stage_summary(jobs: list[dict]) -> dict[str, dict]:
    """Per stage: jobs, mean start-up, work and exit seconds, and how many imported torch."""
    out = {}
    for stage in sorted({j["stage"] for j in jobs}):
        js = [j for j in jobs if j["stage"] == stage]
        out[stage] = {"jobs": len(js), "startup_s": statistics.mean(j["imported"] - j["start"] for j in js),
                      "work_s": statistics.mean(j["end"] - j["imported"] for j in js),
                      "exit_s": statistics.mean(j.get("exit", j["end"]) - j["end"] for j in js),
                      "torch": sum(bool(j.get("torch")) for j in js)}
    return out


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


def timed_pipeline_run(configfile: str, workdir: Path, cores: int = 2) -> tuple[dict, dict]:
    """Run Snakemake on `configfile` into workdir/results with every job timed:
    (overhead shares, per-stage summary)."""
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
    return overhead_shares(jobs, t_begin, t_end), stage_summary(jobs)


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


def run(workdir: Path, dry_reps: int, run_config: str | None, slurm_probe: bool = True) -> list[dict]:
    dry, n_jobs = dry_run_seconds(workdir / "dry_results", dry_reps)
    rows = [row(4, f"snakemake -n, config/config.yaml ({n_jobs} jobs)", dry, "s", op="<", target=3)]
    probe = slurm_probe_seconds() if slurm_probe else None
    if probe is not None:  # a SLURM client without a reachable controller stalls every start
        rows.append(row(4, "  of which the SLURM plugin's `scontrol show config` probe", probe, "s"))
        stubbed, _ = dry_run_seconds(workdir / "dry_results", dry_reps, without_scontrol(workdir))
        rows.append(row(4, "snakemake -n, config/config.yaml, scontrol stubbed out", stubbed, "s", op="<", target=3))
    if run_config:
        o, stages = timed_pipeline_run(run_config, workdir / "run")
        s = f"{run_config}, {o['jobs']} jobs, {o['wall_s']:.0f} s wall"
        rows += [row(4, f"share of wall time outside stage work, {s}", o["outside"], "share", op="<", target=0.10),
                 row(4, f"  of which Snakemake alone (no job process alive), {s}", o["scheduler"], "share"),
                 row(4, f"  of which job start-up and exit, no job working, {s}", o["job_overhead"], "share"),
                 row(4, f"Snakemake start to first job, {run_config}", o["first_job_s"], "s"),
                 row(4, f"mean job start-up (Python + imports), {run_config}", o["startup_s"], "s"),
                 row(4, f"mean job exit (interpreter teardown), {run_config}", o["teardown_s"], "s"),
                 row(4, f"start-up + exit share of summed job time, {run_config}",
                     o["overhead_share_of_job_time"], "share")]
        for stage, st in stages.items():
            rows += [row(4, f"stage {stage} ({st['jobs']} jobs): mean start-up", st["startup_s"], "s"),
                     row(4, f"stage {stage}: mean work", st["work_s"], "s"),
                     row(4, f"stage {stage}: mean exit", st["exit_s"], "s")]
            if stage not in TORCH_STAGES:  # the issue: data stages should not import torch
                rows.append(row(4, f"stage {stage}: jobs that imported torch", st["torch"], "jobs", op="<=", target=0))
    return rows
