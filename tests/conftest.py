import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

from helpers import snakemake  # noqa: E402


def run_snakemake(*args, results, check=True, timeout=1200):
    """Run snakemake on this checkout with results under `results`; return the process."""
    return snakemake(*args, "--config", f"results={results}", check=check, timeout=timeout)


@pytest.fixture(scope="session")
def test_run(tmp_path_factory):
    """One complete run of config/test.yaml, shared by the tests that inspect or rerun it."""
    results = tmp_path_factory.mktemp("test_run") / "results"
    run_snakemake("--cores", "2", "--configfile", "config/test.yaml", results=results)
    return results
