import pytest

from helpers import snakemake  # tests/ is on the path: pyproject.toml, [tool.pytest.ini_options]


def run_snakemake(*args, results, check=True, timeout=1200):
    """Run snakemake on this checkout with results under `results`; return the process."""
    return snakemake(*args, "--config", f"results={results}", check=check, timeout=timeout)


@pytest.fixture(scope="session")
def test_run(tmp_path_factory):
    """One complete run of config/test.yaml, shared by the tests that inspect or rerun it."""
    results = tmp_path_factory.mktemp("test_run") / "results"
    run_snakemake("--cores", "2", "--configfile", "config/test.yaml", results=results)
    return results
