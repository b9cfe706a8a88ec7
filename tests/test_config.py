"""Config validation: the shipped configs pass, typos and bad values fail naming the key."""

import copy
import json
import re

import jsonschema
import pytest
import yaml

from gradloc import cli, schema
from helpers import ROOT, job_counts, snakemake

SCHEMA = yaml.safe_load((ROOT / "src/gradloc/config.schema.yaml").read_text())
CONFIGS = ["config", "extended", "test", "paper"]


def load(name):
    return yaml.safe_load((ROOT / f"config/{name}.yaml").read_text())


def errors(config):
    return [
        (".".join(map(str, e.path)), e.message)
        for e in jsonschema.Draft202012Validator(SCHEMA).iter_errors(config)
    ]


def test_schema_is_valid_draft_2020_12():
    assert SCHEMA["$schema"].endswith("2020-12/schema")
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_validate(name):
    assert errors(load(name)) == []


@pytest.mark.parametrize(
    "path, value, key, words",
    [
        (("train", "lr_rate"), 1e-4, "train", "lr_rate"),  # typo of a key
        (("split", "heldout_fraction"), 0.9, "split.heldout_fraction", "0.5"),
        (("data", "source"), "wikipedia", "data.source", "wikipedia"),
        (("model", "architecture", "n_layer"), 0, "model.architecture.n_layer", "minimum"),
        (("train", "methods", "tgl_fp", "layers"), "tgl", "train.methods.tgl_fp.layers", "tgl"),
        (("train", "methods", "lora", "lora", "rank"), 4, "train.methods.lora.lora", "rank"),
        (("select", "rule"), "median", "select.rule", "median"),
    ],
)
def test_bad_values_name_their_key(path, value, key, words):
    config = copy.deepcopy(load("config"))
    node = config
    for k in path[:-1]:
        node = node.setdefault(k, {})
    node[path[-1]] = value
    found = errors(config)
    assert found, f"{path} = {value!r} should be rejected"
    assert any(k == key and words in msg for k, msg in found), found


def test_defaults_are_filled_in():
    from snakemake.utils import validate

    config = {"data": {"source": "synthetic"}, "train": {"methods": {"full": {}, "lora": {"lora": {}}}}}
    validate(config, str(ROOT / "src/gradloc/config.schema.yaml"), set_default=True)
    assert config["data"]["synthetic"]["n_entities"] == 240
    assert config["model"]["architecture"]["n_layer"] == 6
    assert config["train"]["seeds"] == [0, 1]
    assert config["train"]["methods"]["full"]["layers"] == "all"
    assert config["train"]["methods"]["lora"]["lora"] == {"r": 4, "alpha": 16, "dropout": 0.0, "targets": "attention"}




@pytest.mark.parametrize("name", CONFIGS)
def test_dry_run_builds_the_dag(name, tmp_path):
    r = snakemake("-n", "--configfile", f"config/{name}.yaml", "--config", f"results={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    for rule in ["download", "split", "tag", "probes", "base_model", "profile", "select", "train", "report"]:
        assert f"\n{rule} " in out, f"rule {rule} missing from the dry run of {name}"


@pytest.mark.parametrize("group", [True, False])
def test_group_seeds_plans_one_train_job_per_method_and_period(group, tmp_path):
    """The extended config's 3 seeds: grouped, one train job per (method, period) runs `--seed 0 1 2`
    with an init, a state and an out per seed; otherwise one job per seed. Evaluation is one
    job per (method, period) either way."""
    cfg = load("extended")
    cfg["train"]["group_seeds"] = group
    cfg["train"].pop("null_layers")  # its null_* methods are planned like any other (tests/test_workflow.py)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = snakemake("-n", "-p", "--configfile", str(path), "--config", f"results={tmp_path}/r")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    counts, methods, seeds = job_counts(out), len(cfg["train"]["methods"]), cfg["train"]["seeds"]
    assert seeds == [0, 1, 2]
    assert counts["train"] == methods * 2 * (1 if group else 3) and counts["evaluate"] == methods * 2
    command = next(line for line in out.splitlines() if "gradloc train" in line and '"name":"full"' in line
                   and "--period 2" in line)
    r_ = f"{tmp_path}/r"
    if group:
        assert "--seed 0 1 2 " in command
        assert f"--init {r_}/train/full/seed0/P1 {r_}/train/full/seed1/P1 {r_}/train/full/seed2/P1 " in command
        assert f"--out {r_}/train/full/seed0/P2 {r_}/train/full/seed1/P2 {r_}/train/full/seed2/P2 " in command
        assert f"--state {r_}/.train_state/full/seed0/P2 {r_}/.train_state/full/seed1/P2 " in command
    else:
        assert re.search(r"--seed \d --state \S+ --gpus 1 --out \S+ >", command), command
    evaluate = next(line for line in out.splitlines() if "gradloc evaluate" in line and "/train/full/" in line)
    assert f"--model {r_}/train/full/seed0/P" in evaluate and "seed2" in evaluate


def test_typo_fails_before_any_job(tmp_path):
    bad = load("test")
    bad["profile"]["n_sequence"] = 8
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    r = snakemake("-n", "--configfile", str(path), "--config", f"results={tmp_path}/r")
    assert r.returncode != 0
    assert "profile: unknown key(s) ['n_sequence']; expected one of" in r.stdout + r.stderr
    assert not (tmp_path / "r").exists()


def test_subnet_methods_need_masks_of_every_trained_period(tmp_path):
    bad = load("test")
    bad["subnet"]["periods"] = [1]  # the test world has periods 1 and 2
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    r = snakemake("-n", "--configfile", str(path), "--config", f"results={tmp_path}/r")
    assert r.returncode != 0
    assert "subnet.periods: methods ['subnet+mix_review'] train where each period's subnetwork points; " \
           "add period(s) [2]" in r.stdout + r.stderr


def stage_argv(stage: str, params: dict) -> list[str]:
    """`gradloc STAGE --params PARAMS` with every required argument pointing nowhere: the
    params are checked before any input is read."""
    argv = [stage, "--params", json.dumps(params)]
    for text, _ in cli.STAGES[stage][1]:
        name, kw = cli.spec(text)
        flag = f"--{name.replace('_', '-')}"
        argv += [flag, "1"] if kw.get("type") is int else [flag, f"/nonexistent/{name}"]
    return argv


@pytest.mark.parametrize("stage", list(cli.STAGES))
def test_every_stage_cli_names_an_unknown_key(stage, capsys):
    assert cli.main(stage_argv(stage, {"bogus_key": 1})) == 2
    err = capsys.readouterr().err
    assert f"gradloc {stage}: error:" in err and "'bogus_key'" in err


@pytest.mark.parametrize("params, where", [
    ({"common": {"lr": 1e-3, "bogus_key": 1}}, "train: unknown key(s) ['bogus_key']"),
    ({"method": {"lora": {"rank": 4}}}, "method.lora: unknown key(s) ['rank']"),
])
def test_train_cli_names_a_nested_unknown_key(params, where, capsys):
    assert cli.main(stage_argv("train", params)) == 2
    assert where in capsys.readouterr().err


def test_hand_run_fills_the_same_defaults_as_snakemake():
    """A stage run by hand gets exactly the defaults Snakemake's validation fills in."""
    from snakemake.utils import validate

    config = {"data": {"source": "synthetic"}, "train": {"methods": {"full": {}}}}
    validate(config, str(ROOT / "src/gradloc/config.schema.yaml"), set_default=True)
    for section in ("split", "tagging", "probes", "model", "profile", "select", "attention", "evaluate", "report"):
        assert schema.fill(section, {}) == config[section], section
    assert schema.fill("data.synthetic", {}) == config["data"]["synthetic"]
    assert schema.fill("$defs.method", {}) == config["train"]["methods"]["full"]


def test_lint_is_clean():
    r = snakemake("--lint")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Congratulations" in r.stdout + r.stderr
