"""config/paper.yaml planned against TemporalWiki in its released layout (issue 10):
a Snakemake dry run with data.temporalwiki.local_dir pointing at the real-layout
fixture plans every job of the reproduction; the same config without the base fails
at config time, before any job, naming the setting."""

import json

import twiki_layout as tw
import yaml

from helpers import ROOT, job_counts, snakemake

PAPER = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())


def dry_run(tmp_path, data):
    """`--configfile config/paper.yaml local.yaml`: the second file overrides `data` only."""
    override = tmp_path / "local.yaml"
    override.write_text(json.dumps({"data": data, "results": str(tmp_path / "results")}))
    return snakemake("-n", "--configfile", "config/paper.yaml", override, timeout=600)


def test_paper_dry_run_plans_the_full_job_set(tmp_path):
    root = tw.write_release(tmp_path / "twiki", zipped=True)
    data = {**PAPER["data"], "temporalwiki": {**PAPER["data"]["temporalwiki"], "local_dir": str(root)}}
    r = dry_run(tmp_path, data)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    counts = job_counts(r.stdout + r.stderr)
    methods, seeds, periods = len(PAPER["train"]["methods"]), len(PAPER["train"]["seeds"]), 4
    # one train job per seed (GPU jobs in parallel); one evaluate job per method and period
    assert counts["train"] == methods * seeds * periods == 108
    assert counts["evaluate"] == methods * periods and counts["evaluate_base"] == periods
    for rule in ("download", "split", "tag", "probes", "base_model", "tokens", "profile", "select", "report"):
        assert counts[rule] == 1, (rule, counts)


def test_paper_without_base_fails_before_any_job(tmp_path):
    root = tw.write_release(tmp_path / "twiki", base=False)
    data = {**PAPER["data"], "temporalwiki": {**PAPER["data"]["temporalwiki"], "local_dir": str(root),
                                               "download_base": False}}
    r = dry_run(tmp_path, data)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "data.temporalwiki.download_base is false" in out and "replay in train.methods" in out
    assert "Fix: set data.temporalwiki.download_base: true" in out
    assert not (tmp_path / "results").exists()


def test_paper_effective_batch_is_the_stated_64():
    """The comment's statement, the config's numbers and the engine's batches agree:
    batch_size x grad_accum x GPUs (the train rule's default gpu=1) = 64."""
    import re

    stated = int(re.search(r"Effective global batch (\d+)", (ROOT / "config" / "paper.yaml").read_text()).group(1))
    train = PAPER["train"]
    assert stated == 64 == train["batch_size"] * train["grad_accum"] * 1
    assert re.search(r"^\s+gpu=1,$", (ROOT / "workflow/rules/training.smk").read_text(), flags=re.M)


def test_engine_steps_consume_batch_size_x_grad_accum_blocks(tmp_path):
    """One optimizer step = batch_size x grad_accum blocks on one process (accelerate's
    gradient accumulation), so steps = ceil(blocks / 8) for 2 x 4."""
    import math

    from gradloc import train
    from helpers import tiny_train_world

    world = tiny_train_world(tmp_path / "world")
    common = {"lr": 1e-3, "batch_size": 2, "grad_accum": 4, "seq_len": 16, "precision": "no", "epochs": 2}
    m = train.run({"name": "m", "common": common, "method": {"layers": "all"}}, init=world / "base_model",
                  tokens=world / "tokens", period=1, seed=0, out=tmp_path / "out")
    assert m["diff_blocks"] > 8 and m["steps"] == 2 * math.ceil(m["diff_blocks"] / 8)
