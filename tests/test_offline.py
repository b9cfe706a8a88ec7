"""Offline compute nodes (issue 22): with the network blocked (HF_HUB_OFFLINE=1 and a hub
endpoint nothing answers), a hub model or the TemporalWiki release that was not
prefetched fails with one line naming the `prefetch` rule, and config/test.yaml with a
model from a local folder runs end to end without a prefetch job."""

import os
import subprocess
import sys

import pytest

from helpers import ROOT, snakemake

BLOCKED = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9",
           "PYTHONPATH": str(ROOT / "src")}


def blocked_env(tmp_path):
    return {**os.environ, **BLOCKED, "HF_HUB_CACHE": str(tmp_path / "empty_cache")}


def test_hub_model_not_prefetched_fails_naming_the_prefetch_rule(tmp_path):
    code = ("from gradloc.models import load_model\nfrom gradloc.io import InputError\n"
            "try:\n    load_model('openai-community/gpt2', revision='607a30d783dfa663caf39e06633721c8d4cfcd7e')\n"
            "except InputError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=blocked_env(tmp_path),
                       timeout=120)
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout + r.stderr[-2000:]
    assert "model openai-community/gpt2 (revision 607a30d" in lines[0] and "`prefetch` rule" in lines[0]


def test_dataset_not_prefetched_fails_in_one_line_naming_the_prefetch_rule(tmp_path):
    params = '{"source": "temporalwiki", "temporalwiki": {"periods": ["0801-0901"]}}'
    r = subprocess.run([sys.executable, "-m", "gradloc", "download", "--params", params, "--out",
                        str(tmp_path / "corpus")], capture_output=True, text=True, env=blocked_env(tmp_path),
                       timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("gradloc download: error: dataset seonghyeonye/TemporalWiki") and "`prefetch` rule" in last


@pytest.mark.slow
def test_test_config_with_a_local_model_runs_offline(tmp_path):
    # the local model: the scratch base model config/test.yaml trains (a model that suits the data)
    first = tmp_path / "first"
    r = snakemake("--configfile", "config/test.yaml", "--config", f"results={first}", "--cores", "2",
                  first / "base_model", env=BLOCKED, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    model = first / "base_model" / "model"
    extra = tmp_path / "local.yaml"
    extra.write_text(f"model: {{source: pretrained, name_or_path: {model}}}\n")
    results = tmp_path / "results"
    r = snakemake("--configfile", "config/test.yaml", extra, "--config", f"results={results}", "--cores", "2",
                  env={**BLOCKED, "HF_HUB_CACHE": str(tmp_path / "empty_cache")}, timeout=1200)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert (results / "report" / "table.csv").exists()
    assert "rule prefetch" not in out and not (results / "prefetch.json").exists()
