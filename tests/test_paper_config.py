"""config/paper.yaml planned against TemporalWiki in its released layout (issue 10):
a Snakemake dry run with data.temporalwiki.local_dir pointing at the real-layout
fixture plans every job of the reproduction; the same config without the base fails
at config time, before any job, naming the setting."""

import json

import yaml

import twiki_layout as tw
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
