import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_snakemake(*args, results, check=True, timeout=1200):
    """Run snakemake on this checkout with results under `results`; return the process."""
    cmd = [sys.executable, "-m", "snakemake", *args, "--config", f"results={results}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}")
    return r


@pytest.fixture(scope="session")
def test_run(tmp_path_factory):
    """One complete run of config/test.yaml, shared by the tests that inspect or rerun it."""
    results = tmp_path_factory.mktemp("test_run") / "results"
    run_snakemake("--cores", "2", "--configfile", "config/test.yaml", results=results)
    return results
