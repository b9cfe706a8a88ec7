"""Fault rows of docs/reliability.md that no other test file covers: two Snakemake runs on
one results folder, and a disk that fills up while a stage writes its output."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, char_tokenizer, tiny_gpt2, tokens_world

pytestmark = pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")


def namespace_prefix() -> list[str] | None:
    """An `unshare` command line that gives a private mount namespace in which mounting a
    tmpfs works (root: --mount; others: also a user namespace), or None."""
    for prefix in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=16k tmpfs /mnt"],
                               capture_output=True)
        if probe.returncode == 0:
            return prefix
    return None


def on_small_disk(disk: Path, size: str, argv: list[str]) -> tuple[int, str, list[str]]:
    """Run `argv` with a `size` tmpfs mounted on `disk` (in a private mount namespace, so
    nothing outside sees it); returns (exit code, stderr, what is left on that disk)."""
    prefix = namespace_prefix()
    if prefix is None:
        pytest.skip("cannot mount a tmpfs here (no root and no user namespaces)")
    disk.mkdir()
    script = 'mount -t tmpfs -o size="$1" tmpfs "$2" || exit 99; d="$2"; shift 2; "$@"; rc=$?; ' \
             'echo "LEFT:$(ls -A "$d" | tr "\\n" " ")"; exit $rc'
    r = subprocess.run([*prefix, "sh", "-c", script, "sh", size, str(disk), *argv], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=300)
    assert r.returncode != 99, r.stderr
    left = r.stdout.rsplit("LEFT:", 1)[1].split()
    return r.returncode, r.stderr, left


def test_full_disk_during_download_is_one_line_and_leaves_nothing(tmp_path):
    disk = tmp_path / "disk"
    params = json.dumps({"source": "synthetic", "synthetic": {}})
    rc, err, left = on_small_disk(disk, "64k", [sys.executable, "-m", "gradloc", "download", "--params", params,
                                                "--out", str(disk / "corpus")])
    assert rc == 4, err[-2000:]
    assert err.strip().splitlines()[-1] == (f"gradloc download: error: no space left on device while writing "
                                            f"{disk / 'corpus'}; nothing was written, free space and rerun")
    assert left == []  # neither a corpus folder nor its temporary twin


def test_full_disk_while_saving_a_checkpoint(tmp_path):
    """A tiny GPT-2 (~240 kB of weights) trained for 2 steps and saved onto a 64 kB disk:
    safetensors' own error is recognised, and no checkpoint folder is left."""

    from gradloc.models import save_model

    save_model(tiny_gpt2(96, n_layer=2), char_tokenizer(), tmp_path / "base" / "model")
    tokens_world(tmp_path, tmp_path / "base", [{"text": f"Doc {i}: Alice {i} works at Acme now."} for i in range(4)])
    disk = tmp_path / "disk"
    params = json.dumps({"common": {"batch_size": 2, "seq_len": 32, "precision": "no"}, "method": {}})
    rc, err, left = on_small_disk(disk, "64k", [
        sys.executable, "-m", "gradloc", "train", "--params", params, "--init", str(tmp_path / "base"),
        "--tokens", str(tmp_path / "tokens"), "--period", "1", "--seed", "0", "--out", str(disk / "train")])
    assert rc == 4, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(f"gradloc train: error: no space left on device while writing "
                                                   f"{disk / 'train'};")
    assert left == []


def snakemake_run(work: Path, results: Path) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(work), "--configfile",
            str(ROOT / "config" / "test.yaml"), "--cores", "1", "--config", f"results={results}"]


def test_second_run_on_the_same_results_is_refused(tmp_path):
    """Run A holds Snakemake's lock (taken before its first job; A is then stopped, so
    nothing depends on how fast it is); run B on the same folder must refuse to start."""
    work, results = tmp_path / "work", tmp_path / "results"
    work.mkdir()
    a = subprocess.Popen(snakemake_run(work, results), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        locks = work / ".snakemake" / "locks"
        deadline = time.monotonic() + 300
        while not (locks.is_dir() and any(locks.iterdir())):
            assert a.poll() is None, "run A ended before taking its lock"
            assert time.monotonic() < deadline, "run A never took its lock"
            time.sleep(0.2)
        os.killpg(a.pid, signal.SIGSTOP)
        b = subprocess.run(snakemake_run(work, results), capture_output=True, text=True, timeout=300)
        assert b.returncode != 0
        assert "Directory cannot be locked" in b.stdout + b.stderr
    finally:
        os.killpg(a.pid, signal.SIGKILL)
        a.wait()
