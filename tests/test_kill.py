"""Kill anywhere, rerun, same bytes (issue 12).

For config/test.yaml, every rule's job is killed (SIGKILL) once in the middle of its work,
then Snakemake is run again until the pipeline completes; the final table.csv (less its
wall-clock columns) and every checkpoint must equal those of the session's uninterrupted
run (conftest `test_run`), byte for byte (on CPU). The killed run saves resumable state
often (`save_every`), so killed pretraining and training jobs resume from a saved step;
the test prints which logs show a resume.

Generic over the DAG: the rules, their log files and how long each job took come from
Snakemake's own records of the uninterrupted run (`.snakemake/metadata`), so a rule added
to the workflow is covered without editing this test. A watcher thread finds a rule's
job as the process whose stderr is that rule's log file (every rule redirects its
command's output to its `log:`), and kills it once it has run for 70% as long as the
same rule's job took in the uninterrupted run; a job with resumable state (`--state`) is
killed once its log shows two saved states instead, and must resume. A rule whose job
ended before its kill is forced to run again (`--forcerun`) with an earlier kill, so no
rule escapes.

Runs with `--cores 2 --keep-going`, so jobs are killed while others write beside them.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil  # installed with accelerate (a dependency of gradloc)
import pytest
import yaml

from helpers import ROOT

TEST_CONFIG = ROOT / "config" / "test.yaml"

pytestmark = pytest.mark.slow


def recorded_jobs(results: Path) -> list[dict]:
    """Snakemake's metadata records (rule, log, starttime, endtime) of the jobs whose
    outputs lie under `results`, one per job (a job with several outputs counted once)."""
    jobs = {}
    meta = ROOT / ".snakemake" / "metadata"
    for f in meta.rglob("*"):
        if not f.is_file():
            continue
        # the output path, urlsafe-base64, split into "@"-prefixed folders when long
        try:
            path = base64.urlsafe_b64decode("".join(x.lstrip("@") for x in f.relative_to(meta).parts)).decode()
        except ValueError:
            continue
        if not path.startswith(f"{results}/"):
            continue
        rec = json.loads(f.read_text())
        if rec.get("incomplete") or not rec.get("log"):
            continue
        jobs[(rec["rule"], tuple(rec["log"]))] = rec
    return list(jobs.values())


SAVED = "Saving current state to"  # accelerate's line for each state a job saves (`--state`)


class Killer(threading.Thread):
    """Kills the first job of each rule in `pending` once it has run `delay[rule]`
    seconds. A job is a descendant process of Snakemake whose stderr is a rule's log."""

    def __init__(self, snakemake: subprocess.Popen, log_rule: dict[str, str], delay: dict[str, float],
                 pending: set[str]):
        super().__init__(daemon=True)
        self.proc, self.log_rule, self.delay, self.pending = snakemake, log_rule, delay, pending
        self.killed: list[tuple[str, str, float]] = []  # (rule, log, seconds after start)
        self.seen: dict[int, tuple[str, float]] = {}  # pid -> (rule, first seen)
        self.after_save: list[str] = []  # logs of jobs killed after a saved state

    def job_rule(self, p: psutil.Process) -> str | None:
        try:
            return self.log_rule.get(os.readlink(f"/proc/{p.pid}/fd/2"))
        except OSError:
            return None

    def run(self):
        root = psutil.Process(self.proc.pid)
        while self.proc.poll() is None:
            try:
                children = root.children(recursive=True)
            except psutil.Error:
                break
            now = time.monotonic()
            for p in children:
                if p.pid not in self.seen:
                    rule = self.job_rule(p)
                    if rule is None:
                        continue
                    try:
                        start = p.create_time()
                    except psutil.Error:
                        continue
                    # create_time is wall clock; keep the start on the monotonic clock
                    self.seen[p.pid] = (rule, now - max(0.0, time.time() - start))
                rule, start = self.seen[p.pid]
                if rule not in self.pending:
                    continue
                try:
                    log = os.readlink(f"/proc/{p.pid}/fd/2")
                    resumable = "--state" in p.cmdline()
                    # a job with resumable state dies between two saved steps, so its rerun resumes
                    saved = resumable and Path(log).read_text(errors="replace").count(SAVED) >= 2
                except (OSError, psutil.Error):
                    continue
                if saved or now - start >= self.delay[rule] * (3 if resumable else 1):
                    try:
                        p.send_signal(signal.SIGKILL)
                    except psutil.Error:
                        continue
                    self.pending.discard(rule)
                    self.killed.append((rule, log, round(now - start, 2)))
                    if saved:
                        self.after_save.append(log)
            time.sleep(0.05)


def table_without_timings(path: Path) -> bytes:
    """table.csv less its wall-clock columns (wall_time_s_*): the one thing no two runs share."""
    rows = list(csv.reader(io.StringIO(path.read_text())))
    keep = [i for i, name in enumerate(rows[0]) if not name.startswith("wall_time_s")]
    assert len(keep) < len(rows[0]), "table.csv has no wall_time_s columns: drop this exception"
    return "\n".join(",".join(row[i] for i in keep) for row in rows).encode()


def files(results: Path) -> dict[str, bytes]:
    out = {"report/table.csv": table_without_timings(results / "report" / "table.csv")}
    for f in sorted([*results.glob("train/**/model.safetensors"), *results.glob("base_model/**/model.safetensors")]):
        out[str(f.relative_to(results))] = f.read_bytes()
    return out


def test_killed_jobs_rerun_to_the_same_bytes(test_run, tmp_path):
    reference = test_run
    jobs = recorded_jobs(reference)
    rules = {j["rule"] for j in jobs}
    assert {"base_model", "train", "evaluate", "report"} <= rules, rules
    durations: dict[str, list[float]] = {}
    for j in jobs:
        durations.setdefault(j["rule"], []).append(j["endtime"] - j["starttime"])
    # late enough to be past the imports (a few seconds of every job), early enough that
    # the job is rarely over before it (a missed rule is forced to run again, below)
    fraction = 0.7  # of the rule's shortest job in the uninterrupted run
    # Kill at half the rule's shortest job: the first job of a rule may be any of them.
    delay = {r: fraction * min(d) for r, d in durations.items()}

    # The same config, saving resumable state often, so a killed pretraining or training
    # job resumes from a saved step (saving must not change any result either).
    cfg = yaml.safe_load(TEST_CONFIG.read_text())
    cfg["model"]["pretrain"]["save_every"] = 2
    cfg["train"]["save_every"] = 1
    config = tmp_path / "test_save_often.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))  # method order is row order
    results = tmp_path / "results"
    ref_logs = {str(Path(log).relative_to(reference)): j["rule"] for j in jobs for log in j["log"]}
    log_rule = {str(results / rel): rule for rel, rule in ref_logs.items()}
    pending = set(rules)
    history, forcerun, after_save = [], [], []
    for attempt in range(3 * len(rules)):
        cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--keep-going", "--configfile", str(config),
               "--config", f"results={results}"]
        if forcerun:
            cmd += ["--forcerun", *forcerun]
        out = tmp_path / f"snakemake_{attempt}.log"
        with open(out, "w") as f:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
            killer = Killer(proc, log_rule, delay, pending)
            killer.start()
            rc = proc.wait(timeout=1800)
            killer.join()
        history.append((rc, killer.killed, forcerun))
        after_save += killer.after_save
        if rc != 0 and not killer.killed:
            pytest.fail(f"snakemake failed without a kill (attempt {attempt}):\n{out.read_text()[-6000:]}")
        if rc == 0 and not pending:
            break
        if rc == 0:  # the remaining rules' jobs ended before their kill: force them, kill earlier
            forcerun = sorted(pending)
            for r in pending:
                delay[r] /= 2
        # After a kill, forced rules stay forced until a run succeeds: Snakemake would
        # otherwise skip a forced job whose downstream outputs exist from before.
    else:
        pytest.fail(f"not done after {len(history)} runs: {history}")
    resumed = sorted(str(f.relative_to(results)) for f in (results / "logs").rglob("*.log")
                     if "resuming from" in f.read_text(errors="replace"))
    print("runs (rc, killed (rule, log, seconds), forced):", *history, f"resumed from saved state: {resumed}",
          sep="\n")
    assert not pending
    # every job killed after saving state resumed from it (its rerun's log says so)
    assert after_save, "no job with resumable state (--state) was killed after a saved step"
    assert set(after_save) <= {str(results / r) for r in resumed}
    # no half-written output left behind by a killed attempt
    assert [str(p) for p in results.rglob(".*.tmp-*")] == []
    got, want = files(results), files(reference)
    assert sorted(got) == sorted(want)
    assert [name for name in want if got[name] != want[name]] == []
