"""Offline compute nodes (issue 22): with the network blocked (HF_HUB_OFFLINE=1 and a hub
endpoint nothing answers), a hub model or the TemporalWiki release that was not
prefetched fails with one line naming the `prefetch` rule, and config/test.yaml with a
model from a local folder runs without a prefetch job (every stage but CaMeLS' metatrain)."""

import os
import subprocess
import sys

import pytest

from helpers import ROOT, snakemake, tiny_gpt2

from gradloc.models import save_model

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
    from gradloc.basemodel import train_tokenizer

    model = tmp_path / "local_model"  # a byte-level BPE (offsets, like a real model's) and a tiny GPT-2
    tokenizer = train_tokenizer([f"Alice {i} works at Acme in Oslo since {2000 + i}." for i in range(50)], 300)
    save_model(tiny_gpt2(len(tokenizer), n_layer=4, n_embd=64), tokenizer, model)
    extra = tmp_path / "local.yaml"
    extra.write_text(f"model: {{source: pretrained, name_or_path: {model}}}\n")
    results = tmp_path / "results"
    # metatrain (CaMeLS) left out: with this hand-made tokenizer its summary has no object
    # tokens to average (a NaN it refuses to write), which has nothing to do with the network
    r = snakemake("--configfile", "config/test.yaml", extra, "--config", f"results={results}",
                  "--omit-from", "metatrain",
                  env={**BLOCKED, "HF_HUB_CACHE": str(tmp_path / "empty_cache")}, timeout=1200)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert (results / "base_model").is_dir() and len(list(results.glob("eval/*/seed*/P*/summary.json"))) > 10
    assert "rule prefetch" not in out and not (results / "prefetch.json").exists()
