"""The SLURM profile against a real SLURM cluster (not a mock).

Runs when a cluster answers `sinfo`, or when GRADLOC_SLURM_TEST=1: then, if no cluster is
up, the `cluster` fixture starts the single-node one of .ci/slurm/start.sh (as root) and
stops exactly the daemons it started when the tests end.

Every run goes through `--profile profiles/slurm` with only the site values overridden
(the cluster's partition and an account, through the profile's environment variables).
Each Snakemake job must show up as a completed SLURM job (`scontrol show job`, and the
cluster's job-completion log where it has one), GPU rules must have asked SLURM for a GPU
and others not, and the pipeline's numbers must equal those of a local run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from helpers import snakemake

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "slurm"
ACCOUNT = "gradloc-ci"
GPU_RULES = {"base_model", "small_model", "profile", "subnet", "attention", "metatrain", "train"}
REQUIRED = os.environ.get("GRADLOC_SLURM_TEST") == "1"

pytestmark = pytest.mark.skipif(not REQUIRED and shutil.which("sinfo") is None,
                                reason="no SLURM here (set GRADLOC_SLURM_TEST=1 to start one)")


def cluster_partition() -> str | None:
    """The default partition of a running cluster, or None when none answers."""
    if shutil.which("sinfo") is None:
        return None
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%P %t"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return None
    if r.returncode != 0:
        return None
    usable = [line.split() for line in r.stdout.splitlines()
              if line.split()[-1] in ("idle", "mix", "alloc", "comp")]
    default = [p.rstrip("*") for p, _ in usable if p.endswith("*")]
    return (default or [p for p, _ in usable] or [None])[0]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The partition to submit to; starts (and afterwards stops) a cluster if needed."""
    partition = cluster_partition()
    if partition is not None:
        yield partition
        return
    if not REQUIRED:
        pytest.skip("no SLURM cluster answers sinfo (set GRADLOC_SLURM_TEST=1 to start one)")
    if os.geteuid() != 0:
        pytest.fail("GRADLOC_SLURM_TEST=1 but no cluster is up, and starting one needs root")
    env = dict(os.environ, GRADLOC_SLURM_DIR=str(tmp_path_factory.mktemp("slurm_state")))
    start = subprocess.run([REPO / ".ci/slurm/start.sh"], env=env, capture_output=True, text=True, timeout=600)
    try:
        assert start.returncode == 0, f".ci/slurm/start.sh failed:\n{start.stderr[-4000:]}"
        partition = cluster_partition()
        assert partition, "cluster started but sinfo shows no usable partition"
        yield partition
    finally:
        stop = subprocess.run([REPO / ".ci/slurm/stop.sh"], env=env, capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stderr


def slurm_command(cluster: str, tmp: Path, *args: str) -> tuple[list[str], dict]:
    """`snakemake --profile profiles/slurm` as a user would run it, overriding only the site
    values, plus faster status polling for short test jobs and no retries (fail fast)."""
    env = dict(os.environ, GRADLOC_SLURM_ACCOUNT=ACCOUNT,
               GRADLOC_SLURM_CPU_PARTITION=cluster, GRADLOC_SLURM_GPU_PARTITION=cluster)
    cmd = [sys.executable, "-m", "snakemake", "--profile", str(PROFILE),
           "--slurm-logdir", str(tmp / "slurm_logs"),
           "--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2",
           "--retries", "0", *args]
    return cmd, env


def snakemake_slurm(cluster: str, tmp: Path, *args: str, cwd: Path = REPO, timeout: int = 1500):
    cmd, env = slurm_command(cluster, tmp, *args)
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    (tmp / "snakemake_slurm.log").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r.stdout + r.stderr


SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")
JOB_HEADER = re.compile(r"^(local)?(rule|checkpoint) (\S+):$")


def submitted_jobs(log: str) -> dict[str, tuple[str, str]]:
    """SLURM job id -> (rule, Snakemake job id), from the run's own log."""
    rule_of = {}  # Snakemake job id -> rule, from the job blocks
    rule = None
    for line in log.splitlines():
        m = JOB_HEADER.match(line)
        if m:
            rule = None if m.group(1) else m.group(3)  # local jobs are not submitted
        elif rule and line.startswith("    jobid: "):
            rule_of[line.split()[-1]] = rule
            rule = None
    jobs = {slurm_id: (rule_of.get(sm_id), sm_id) for sm_id, slurm_id, _ in SUBMITTED.findall(log)}
    # Every non-local Snakemake job was submitted, exactly once.
    assert sorted(sm for _, sm in jobs.values()) == sorted(rule_of), (rule_of, jobs)
    return jobs


def scontrol_job(slurm_id: str) -> dict[str, str]:
    r = subprocess.run(["scontrol", "-o", "show", "job", slurm_id], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"SLURM has no record of job {slurm_id}: {r.stderr}"
    return dict(re.findall(r"(\w+)=(\S*)", r.stdout))


def jobcomp_records() -> dict[str, dict[str, str]] | None:
    """The cluster's job-completion log (jobcomp/filetxt), by job id; None without one."""
    r = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    conf = dict(re.findall(r"^(\w+)\s*=\s*(.*?)\s*$", r.stdout, flags=re.M))
    if conf.get("JobCompType") != "jobcomp/filetxt" or not os.path.isfile(conf.get("JobCompLoc", "")):
        return None
    records = {}
    for line in Path(conf["JobCompLoc"]).read_text().splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        records[fields["JobId"]] = fields
    return records


def check_slurm_jobs(jobs: dict[str, tuple[str, str]], partition: str, logdir: Path) -> None:
    """Each job completed on SLURM with the profile's settings; GPUs exactly for GPU rules."""
    jobcomp = jobcomp_records()
    for slurm_id, (rule, _) in jobs.items():
        info = scontrol_job(slurm_id)
        where = f"SLURM job {slurm_id} (rule {rule})"
        assert info["JobState"] == "COMPLETED", (where, info["JobState"])
        assert re.fullmatch(rf"rule_{re.escape(rule)}(_wildcards_\S+)?", info["Comment"]), (where, info["Comment"])
        assert info["Partition"] == partition, where
        assert info["Account"] == ACCOUNT, where
        gpus = re.search(r"gpu[:=](\d+)", info.get("TresPerJob", "") + " " + info.get("TresPerNode", ""))
        if rule in GPU_RULES:
            assert gpus and int(gpus.group(1)) >= 1, (where, "asked for no GPU", info.get("TresPerJob"))
        else:
            assert gpus is None, (where, "asked for a GPU", info.get("TresPerJob"))
        if jobcomp is not None:
            assert jobcomp[slurm_id]["JobState"] == "COMPLETED", where
        # The profile keeps the SLURM log of successful jobs too.
        assert list(logdir.glob(f"rule_{rule}/**/{slurm_id}.log")), (where, "no SLURM log")


def test_toy_workflow_runs_as_slurm_jobs_with_a_gpu(cluster, tmp_path):
    """Two rules, one asking for a GPU: proves the profile and the cluster on their own."""
    (tmp_path / "Snakefile").write_text(
        'rule all:\n    input: "out/train.txt"\n\n'
        'rule download:\n    output: "out/data.txt"\n'
        '    shell: "echo $SLURM_JOB_ID $SLURM_JOB_PARTITION > {output}"\n\n'
        'rule train:\n    input: "out/data.txt"\n    output: "out/train.txt"\n'
        '    resources: gpu=1\n'
        '    shell: "echo $SLURM_JOB_ID gpus=$CUDA_VISIBLE_DEVICES > {output}"\n')
    log = snakemake_slurm(cluster, tmp_path, cwd=tmp_path, timeout=300)
    jobs = submitted_jobs(log)
    assert sorted(rule for rule, _ in jobs.values()) == ["download", "train"]
    check_slurm_jobs(jobs, cluster, tmp_path / "slurm_logs")
    by_rule = {rule: slurm_id for slurm_id, (rule, _) in jobs.items()}
    # The shell commands ran inside those SLURM jobs, and the GPU job got a device.
    assert (tmp_path / "out/data.txt").read_text().split() == [by_rule["download"], cluster]
    job_id, gpus = (tmp_path / "out/train.txt").read_text().split()
    assert job_id == by_rule["train"] and re.fullmatch(r"gpus=\d+(,\d+)*", gpus), gpus


def test_preempted_job_is_requeued_and_the_workflow_finishes(cluster, tmp_path):
    """SLURM takes a running job away (`scontrol requeue`, what preemption and node failure
    do: the job is killed and queued again under the same id). The profile submitted it
    with --requeue and Snakemake retries nothing here (--retries 0), so the workflow
    finishes only if Snakemake waits for SLURM's second attempt (which SLURM holds back
    for about two minutes)."""
    (tmp_path / "Snakefile").write_text(
        'rule train:\n    output: "out/train.txt"\n    resources: gpu=1\n'
        '    shell: "echo $SLURM_JOB_ID >> attempts.txt; '
        'if [ $(wc -l < attempts.txt) = 1 ]; then touch running; sleep 600; fi; echo done > {output}"\n')
    cmd, env = slurm_command(cluster, tmp_path)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "running").exists():  # the first attempt has started its work
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.5)
        job_id = (tmp_path / "attempts.txt").read_text().split()[0]
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
        out, _ = proc.communicate(timeout=900)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert (tmp_path / "attempts.txt").read_text().split() == [job_id, job_id]  # SLURM ran it twice
    assert (tmp_path / "out/train.txt").read_text() == "done\n"
    info = scontrol_job(job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info


def comparable_table(path: Path) -> pd.DataFrame:
    """report/table.csv without what measures the machine rather than the method."""
    table = pd.read_csv(path, keep_default_na=False)
    table = table.drop(columns=[c for c in table.columns if c.startswith("wall_time_s")])
    if "best" in table.columns:
        table["best"] = [";".join(c for c in str(b).split(";") if not c.startswith("wall_time_s"))
                         for b in table["best"]]
    return table


@pytest.mark.slow
def test_pipeline_through_slurm_equals_local_run(cluster, test_run, tmp_path):
    results = tmp_path / "results"
    log = snakemake_slurm(cluster, tmp_path, "--configfile", "config/test.yaml",
                          "--config", f"results={results}")
    jobs = submitted_jobs(log)
    rules = sorted(rule for rule, _ in jobs.values())
    # Every job of the pipeline was a SLURM job (only the target rule `all` ran locally):
    # the same jobs per rule as a local dry run of the same config plans.
    dry = snakemake("-n", "--configfile", "config/test.yaml", "--config", f"results={tmp_path / 'dry'}")
    out = dry.stdout + dry.stderr
    stats = out[out.index("Job stats:"):]
    planned = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M)
               if m.group(1) not in ("all", "total")}
    assert Counter(rules) == planned and {"base_model", "train", "report"} <= set(planned)
    check_slurm_jobs(jobs, cluster, tmp_path / "slurm_logs")

    # Same seeds, same numbers: every evaluation summary and the report table.
    local_summaries = sorted(p.relative_to(test_run) for p in test_run.glob("eval/**/summary.json"))
    slurm_summaries = sorted(p.relative_to(results) for p in results.glob("eval/**/summary.json"))
    assert slurm_summaries == local_summaries and local_summaries
    for rel in local_summaries:
        assert json.loads((results / rel).read_text()) == json.loads((test_run / rel).read_text()), rel
    pd.testing.assert_frame_equal(comparable_table(results / "report/table.csv"),
                                  comparable_table(test_run / "report/table.csv"))


def train_workflow(tmp_path: Path, epochs: int) -> tuple[dict, Path]:
    """A workflow of one `train` rule (the profile's train settings apply) running the real
    `gradloc train` on a tiny model, resumable state outside the output, both attempts'
    logs appended to train.log. Returns (its params, the output folder)."""
    from helpers import tiny_train_world

    world = tiny_train_world(tmp_path / "world")
    params = {"name": "m", "method": {"layers": "all"},
              "common": {"lr": 1e-2, "batch_size": 2, "seq_len": 32, "log_every": 50, "precision": "no",
                         "epochs": epochs, "save_every": 25}}
    (tmp_path / "params.json").write_text(json.dumps(params))
    (tmp_path / "Snakefile").write_text(
        'rule train:\n    output: directory("out/model")\n    threads: 1\n    resources: gpu=0\n'
        f'    shell: "echo $SLURM_JOB_ID >> attempts.txt; OMP_NUM_THREADS=1 PYTHONPATH={REPO / "src"} '
        f"{sys.executable} -m gradloc train --params @params.json --init {world / 'base_model'} "
        f'--tokens {world / "tokens"} --period 1 --seed 0 --state state --out {{output}} >> train.log 2>&1"\n')
    return params, world


def interrupt_training(cluster: str, tmp_path: Path, interrupt, *args: str) -> str:
    """Run the train workflow through the profile; once the job has saved a state,
    `interrupt(job_id)`; return Snakemake's output once the workflow finished."""
    cmd, env = slurm_command(cluster, tmp_path, *args)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "state" / "latest.json").exists():
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.monotonic() < deadline, "the job never saved a state"
            time.sleep(0.2)
        interrupt((tmp_path / "attempts.txt").read_text().split()[0])
        out, _ = proc.communicate(timeout=900)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-4000:] + (tmp_path / "train.log").read_text()[-4000:]
    return out


def check_resumed_equal(tmp_path: Path, params: dict, world: Path, signal_name: str) -> None:
    from safetensors.torch import load_file

    log = (tmp_path / "train.log").read_text()
    stopped = re.search(rf"stopped by {signal_name} at step (\d+) of (\d+): state saved in state; exit 75", log)
    assert stopped, log[-4000:]
    resumed = re.search(r"resuming from state at step (\d+)", log)
    assert resumed and int(resumed.group(1)) == int(stopped.group(1)) > 0, log[-4000:]
    assert int(stopped.group(1)) < int(stopped.group(2))
    # the uninterrupted run: the same command, the same single thread (a thread count changes float sums)
    subprocess.run([sys.executable, "-m", "gradloc", "train", "--params", "@params.json", "--init",
                    str(world / "base_model"), "--tokens", str(world / "tokens"), "--period", "1", "--seed", "0",
                    "--out", "uninterrupted"], cwd=tmp_path, check=True, capture_output=True, timeout=600,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")})
    a = load_file(tmp_path / "uninterrupted/model/model.safetensors")
    b = load_file(tmp_path / "out/model/model/model.safetensors")
    assert a.keys() == b.keys() and all(torch_equal(a[k], b[k]) for k in a), "resumed weights differ"


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_requeued_training_resumes_to_the_same_weights(cluster, tmp_path):
    """`scontrol requeue` mid-training (SIGTERM to the job, then SLURM runs it again under
    the same id): the first attempt saves and stops, the second resumes at that step, and
    the weights equal an uninterrupted run's."""
    params, world = train_workflow(tmp_path, epochs=100)
    interrupt_training(cluster, tmp_path, lambda job: subprocess.run(["scontrol", "requeue", job], check=True,
                                                                     timeout=30))
    attempts = (tmp_path / "attempts.txt").read_text().split()
    assert len(attempts) == 2 and attempts[0] == attempts[1], attempts  # SLURM ran the same job twice
    check_resumed_equal(tmp_path, params, world, "SIGTERM")


def test_usr1_to_the_batch_shell_stops_training_and_the_retry_resumes(cluster, tmp_path):
    """`scancel --signal=USR1 --batch`, what the profile's `--signal=B:USR1@300` does ahead
    of the time limit: the batch shell ends, SLURM stops the job's processes with SIGTERM,
    training saves and stops; Snakemake's retry resumes it to the same weights."""
    params, world = train_workflow(tmp_path, epochs=100)
    interrupt_training(cluster, tmp_path,
                       lambda job: subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True,
                                                  timeout=30), "--retries", "1")
    attempts = (tmp_path / "attempts.txt").read_text().split()
    assert len(attempts) == 2 and attempts[0] != attempts[1], attempts  # a new job, the retry
    check_resumed_equal(tmp_path, params, world, "SIGTERM")
