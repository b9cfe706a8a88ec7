"""No test answers in training (issue 20): change evaluation probes' objects, and no
training input changes.

1. The DAG: of every job a `train` job depends on, only the allow-listed rules below
   read the probes folder, each for a reason that leaves period >= 1 objects unread; the
   attention scores, the training itself and every token-weighting method take the
   corpus instead (config/test.yaml and the default config, dry runs).
2. The content: on config/test.yaml, one probe of each period-1 set gets another
   object, and every allow-listed stage gives the same training input by hand: the
   subnetwork masks (the stage itself), the base model's weights, CaMeLS' episodes and
   the profile's sequences.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from gradloc import schema
from helpers import ROOT, snakemake

# rule -> why it may read the probes although training depends on it
ALLOWED = {
    "base_model": "period-0 probes, scored for metrics.json after the weights are trained",
    "small_model": "the same stage as base_model (its metrics only)",
    "profile": "only with profile.source: probes; every shipped config profiles the diff",
    "metatrain": "period-0 probes; of later periods only the subjects of uptake probes, to leave them out",
    "subnet": "subject ids only: the subjects whose facts the masks must not train on",
}
JOB = re.compile(r"^(?:local)?(?:rule|checkpoint) (\S+):$")


def dry_run_jobs(configfile: Path, results: Path) -> list[dict]:
    """Every job of a forced dry run: {rule, input: [paths], output: [paths]}."""
    r = snakemake("-n", "--forceall", "--configfile", configfile, "--config", f"results={results}", check=True,
                  timeout=300)
    jobs = []
    for line in r.stdout.splitlines():
        m = JOB.match(line)
        if m:
            jobs.append({"rule": m.group(1), "input": [], "output": []})
        elif jobs and line.startswith(("    input: ", "    output: ")):
            key, _, paths = line.strip().partition(": ")
            jobs[-1][key] = paths.split(", ")
    return jobs


def probe_readers_feeding_training(jobs: list[dict], results: Path) -> set[str]:
    """Rules of the train jobs and of their ancestors that take the probes folder."""
    producer = {o: j for j in jobs for o in j["output"]}
    probes = str(results / "probes")
    seen, todo = set(), [j for j in jobs if j["rule"] == "train"]
    assert todo, "no train job planned"
    readers = set()
    while todo:
        job = todo.pop()
        if id(job) in seen:
            continue
        seen.add(id(job))
        if probes in job["input"]:
            readers.add(job["rule"])
        todo += [producer[i] for i in job["input"] if i in producer]
    return readers


@pytest.mark.parametrize("configfile", ["config/test.yaml", "config/config.yaml", "config/extended.yaml"])
def test_only_allow_listed_stages_that_feed_training_read_the_probes(configfile, tmp_path):
    results = tmp_path / "results"
    jobs = dry_run_jobs(ROOT / configfile, results)
    readers = probe_readers_feeding_training(jobs, results)
    assert readers <= set(ALLOWED), f"{sorted(readers - set(ALLOWED))} read the evaluation probes and feed training"
    assert "subnet" in readers  # the walk reaches the probes at all
    # evaluation reads them (the parser sees inputs); attention and train take the corpus instead
    assert any(str(results / "probes") in j["input"] for j in jobs if j["rule"] == "evaluate")
    for j in jobs:
        if j["rule"] in ("attention", "train") and (j["rule"] == "attention" or "tagged" in str(j["input"])):
            assert str(results / "corpus") in j["input"], j
        if j["rule"] == "profile":  # salient: object takes the updated objects from the corpus' triples
            assert str(results / "corpus") in j["input"], j
    cfg = yaml.safe_load((ROOT / configfile).read_text())
    assert schema.fill("profile", cfg.get("profile"))["source"] == "diff", ALLOWED["profile"]
    if configfile != "config/test.yaml":  # they have salient_spans and the token-dropout methods
        assert {"attention", "train"} <= {j["rule"] for j in jobs}


# --- content: change evaluation probes' objects --------------------------------------------------

SUBNET = {"periods": [1], "steps": 2, "seeds": [0], "n_facts": 8, "n_control": 8, "n_lm": 2, "n_heldout": 2,
          "seq_len": 32, "known_only": False}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """config/test.yaml up to the base model and tokens; `probes_changed`: the probes with
    one probe of each period-1 set holding another object (and statement)."""
    root = tmp_path_factory.mktemp("answers")
    results = root / "results"
    snakemake("--cores", "2", "--configfile", ROOT / "config" / "test.yaml", "--config", f"results={results}",
              "--", results / "probes", results / "tokens", results / "base_model", check=True)
    pr = pd.read_parquet(results / "probes" / "probes.parquet")
    changed = pr.copy()
    for s in ("updated", "new", "outdated", "unchanged"):
        i = changed.index[(changed["period"] == 1) & (changed["set"] == s)][0]
        changed.loc[i, "object"] = "Zorblax Quenthorpe"
        changed.loc[i, "statement"] = changed.loc[i, "prefix"] + " Zorblax Quenthorpe"
    (root / "probes_changed").mkdir()
    changed.to_parquet(root / "probes_changed" / "probes.parquet")
    assert (changed["object"] != pr["object"]).sum() == 4
    return results, root / "probes_changed"


def masks(folder: Path) -> dict:
    from gradloc.core import unpack

    out = {}
    for f in sorted((folder / "masks").glob("*.npz")):
        with np.load(f) as z:
            out[f.name] = unpack(z)
    return out


def untimed(metrics: dict) -> dict:
    return {k: ([{a: b for a, b in r.items() if a != "train_time_s"} for r in v] if k == "runs" else v)
            for k, v in metrics.items() if k not in ("wall_time_s", "train_time_s")}


@pytest.mark.slow
def test_changed_probe_objects_change_no_training_input(world, tmp_path):
    from gradloc import basemodel, metatrain, profile, subnet
    from gradloc.models import checkpoint_dir, load_model
    from gradloc.tokens import load as load_tokens

    results, changed = world
    # the subnetwork masks (layers: subnet, mask: subnet): the stage itself, twice (in this
    # process: the stages are deterministic on a CPU)
    for name, probes in (("a", results / "probes"), ("b", changed)):
        subnet.run(SUBNET, model=results / "base_model", corpus=results / "corpus", probes=probes,
                   tokens=results / "tokens", out=tmp_path / name)
    a, b = masks(tmp_path / "a"), masks(tmp_path / "b")
    assert a.keys() == b.keys() == {"outdated_P1_seed0.npz", "unchanged_P1_seed0.npz"}
    assert all(np.array_equal(a[f][n], b[f][n]) for f in a for n in a[f])
    for f in ("density.csv", "removal.csv"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    ma, mb = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in "ab")
    assert untimed(ma) == untimed(mb)
    assert ma["oracle"] is False and ma["eval_probes_sharing_a_fact"] == ma["eval_probes_sharing_a_subject"] == 0
    assert min(ma["n_facts"].values()) >= 2

    # the base model: weights identical (probes are scored after training, period 0 only)
    base = {**yaml.safe_load((ROOT / "config" / "test.yaml").read_text())["model"]}
    base["pretrain"] = {**base["pretrain"], "steps": 2}
    try:
        for name, probes in (("ba", results / "probes"), ("bb", changed)):
            basemodel.run(base, corpus=results / "corpus", split=results / "split", probes=probes,
                          out=tmp_path / name)
    finally:
        torch.use_deterministic_algorithms(False)  # basemodel.run sets it for the process
    ta, tb = (tmp_path / n / "model" / "model.safetensors" for n in ("ba", "bb"))
    assert ta.read_bytes() == tb.read_bytes()

    # CaMeLS' meta-training episodes and the profile's sequences
    _, tokenizer = load_model(checkpoint_dir(results / "base_model"))
    toks = load_tokens(results / "tokens", tokenizer)
    cfg = schema.fill("camels", {})
    ea, eb = (metatrain.episodes_data(toks, tokenizer, results / "tagged", p, cfg) for p in (results / "probes", changed))
    assert ea == eb
    # (salient: object, the default: the updated objects from the corpus' triples)
    p = schema.fill("profile", {"source": "diff", "n_sequences": 8, "seed": 0})
    assert p["salient"] == "object"
    sa = profile.diagnostic_sequences(p, results / "tokens", tmp_path / "no such folder", tokenizer,
                                      model_dir=results / "base_model", tagged=results / "tagged",
                                      corpus=results / "corpus")
    sb = profile.diagnostic_sequences(p, results / "tokens", changed, tokenizer, model_dir=results / "base_model",
                                      tagged=results / "tagged", corpus=results / "corpus")
    assert sa.equals(sb)
    upd = sa[sa["knowledge_type"] == "updated"]
    assert len(upd) and all(sum(m) > 0 for m in upd["mask"])  # the object path ran and marked tokens
