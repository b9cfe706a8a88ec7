"""General ability with lm-evaluation-harness: the shipped local task runs offline on a
tiny model through `gradloc lm-eval`, its results JSON is lm-eval's own, and the report's
table is the change from the base model with lm-eval's stderr. The slow test runs the
rules on config/test.yaml with the network off."""

import json
import shutil

import pytest
import yaml
from test_train import run as train
from test_train import world  # noqa: F401  (the tiny world fixture)

from gradloc import cli, lmeval
from helpers import ROOT, snakemake

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_shipped_task_offline_and_the_general_ability_table(world, tmp_path, monkeypatch):  # noqa: F811
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    train(world, tmp_path / "trained", {"layers": "all"}, selection=False, epochs=3)
    params = json.dumps({"tasks": ["gradloc_cloze"], "limit": 6})
    assert cli.main(["lm-eval", "--params", params, "--model", str(world / "base_model"), str(tmp_path / "trained"),
                     "--out", str(tmp_path / "lm" / "base"), str(tmp_path / "lm" / "m")]) == 0
    res = json.loads((tmp_path / "lm" / "m" / "results.json").read_text())
    assert res["results"]["gradloc_cloze"]["sample_len"] == 6
    assert 0 <= res["results"]["gradloc_cloze"]["acc,none"] <= 1
    # the base model's folder has no metrics.json: method base
    assert json.loads((tmp_path / "lm" / "base" / "summary.json").read_text())["method"] == "base"

    table = lmeval.general_table([tmp_path / "lm" / "base", tmp_path / "lm" / "m"])
    row = table[(table["metric"] == "acc")].iloc[0]
    base = json.loads((tmp_path / "lm" / "base" / "results.json").read_text())["results"]["gradloc_cloze"]
    assert row["method"] == "m" and row["period"] == 1
    assert row["delta"] == pytest.approx(res["results"]["gradloc_cloze"]["acc,none"] - base["acc,none"])
    assert row["stderr"] == pytest.approx(res["results"]["gradloc_cloze"]["acc_stderr,none"])
    assert "| m | gradloc_cloze | acc |" in lmeval.markdown(table)


def test_unknown_task_is_named(world, tmp_path):  # noqa: F811
    with pytest.raises(Exception, match="no_such_task"):
        lmeval.run({"tasks": ["no_such_task"], "include_path": str(tmp_path)}, model=world / "base_model",
                   out=tmp_path / "x")


@pytest.mark.parametrize("name", ["gradloc_cloze", "world_capitals"])
def test_shipped_task_data_is_well_formed(name):
    rows = [json.loads(x) for x in (lmeval.tasks_dir() / f"{name}.jsonl").read_text().splitlines()]
    assert len(rows) >= 50 and len({r["prefix"] for r in rows}) == len(rows)
    assert all(len(r["choices"]) == 4 and 0 <= r["label"] < 4 and len(set(r["choices"])) == 4 for r in rows)


def test_world_capitals_runs_offline_from_its_own_file(world, tmp_path, monkeypatch):  # noqa: F811
    """The general-knowledge task reads world_capitals.jsonl (dataset_kwargs), not the cloze."""
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    lmeval.run({"tasks": ["world_capitals"], "limit": 4}, model=world / "base_model", out=tmp_path / "lm")
    res = json.loads((tmp_path / "lm" / "results.json").read_text())
    assert res["results"]["world_capitals"]["sample_len"] == 4
    first = json.loads((lmeval.tasks_dir() / "world_capitals.jsonl").read_text().splitlines()[0])
    assert res["configs"]["world_capitals"]["dataset_kwargs"] == {"file": "world_capitals.jsonl"}
    assert first["prefix"].startswith("The capital of ")


@pytest.mark.slow
def test_rules_on_the_test_config_offline(test_run, tmp_path):
    """lm_eval on config/test.yaml's base model and final checkpoints, network off."""
    results = tmp_path / "results"
    shutil.copytree(test_run, results, symlinks=True)
    cfg = yaml.safe_load((ROOT / "config" / "test.yaml").read_text())
    cfg["lm_eval"] = {"tasks": ["gradloc_cloze"], "limit": 8}
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # the target before --config, which would take it for one more key=value pair
    r = snakemake(f"{results}/extras/general_ability.md", "--cores", "2", "--configfile", str(path),
                  "--config", f"results={results}", env=OFFLINE, timeout=1200)
    assert r.returncode == 0, r.stderr[-5000:]
    table = (results / "extras" / "general_ability.md").read_text()
    for m in cfg["train"]["methods"]:
        assert f"| {m} | gradloc_cloze | acc |" in table
    last = max(range(1, cfg["data"]["synthetic"]["n_snapshots"]))
    summary = json.loads((results / "lm_eval" / "full" / "seed0" / "summary.json").read_text())
    assert summary["period"] == last
