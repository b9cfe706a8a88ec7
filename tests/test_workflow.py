"""gradloc.workflow, the logic the Snakemake rules glue together, without snakemake: the
one config check, the periods, each method's inputs from the registry of parts, the
config slices that decide reruns, and the targets."""

import copy
import json

import pytest
import yaml

from gradloc import workflow
from gradloc.io import InputError
from helpers import ROOT


def config(name="test", **train):
    c = yaml.safe_load((ROOT / "config" / f"{name}.yaml").read_text())
    c["train"].update(train)
    return workflow.check(c)


def test_check_fills_defaults_and_names_every_bad_key():
    c = config()
    assert c["train"]["methods"]["full"]["layers"] == "all"  # a default of $defs.method
    bad = yaml.safe_load((ROOT / "config" / "test.yaml").read_text())
    bad["profile"]["n_sequence"] = 8
    bad["train"]["methods"]["full"] = {"layers": "tgl"}
    with pytest.raises(InputError) as e:
        workflow.check(bad)
    lines = str(e.value).splitlines()
    assert lines[0] == "invalid configuration:"
    assert any(line.startswith("  profile: unknown key(s) ['n_sequence']") for line in lines)
    assert any(line.startswith("  train.methods.full.layers: 'tgl' is not one of") for line in lines)


def test_a_cross_part_conflict_fails_before_any_job():
    with pytest.raises(InputError, match="one adapter"):
        config(methods={"x": {"lora": {}, "k_adapter": {}}})
    c = yaml.safe_load((ROOT / "config" / "test.yaml").read_text())
    c["subnet"]["periods"] = [1]
    c["train"]["methods"] = {"s": {"mask": "subnet"}}
    with pytest.raises(InputError, match=r"subnet.periods: .*add period\(s\) \[2\]"):
        workflow.check(c)


def test_each_method_reads_what_its_parts_need():
    plan = workflow.Plan(config(methods={
        "full": {}, "tgl_fp": {"layers": "tgl_fp"}, "sal": {"token_weighting": {"kind": "salient_spans"}},
        "camels": {"token_weighting": {"kind": "camels"}}, "aug": {"augment": {"kind": "random"}},
        "sub": {"layers": "subnet"}}))
    R = plan.R
    assert plan.method_inputs("full", 1) == {}
    assert plan.method_inputs("tgl_fp", 1) == {"selection": f"{R}/select/selection.json"}
    assert plan.method_inputs("sal", 1) == {"tagged": f"{R}/tagged", "corpus": f"{R}/corpus"}
    assert list(plan.method_inputs("camels", 1)) == ["tagged", "corpus", "weighting_model"]
    assert plan.method_inputs("aug", 2) == {"attention": f"{R}/attention/P2"}
    assert list(plan.method_inputs("sub", 1)) == ["selection", "subnet"]
    assert plan.input_args(plan.method_inputs("camels", 1)) == (
        f"--tagged {R}/tagged --corpus {R}/corpus --weighting-model {R}/weighting_model")
    assert plan.input_args(plan.method_inputs("camels", 1), ["weighting_model"]) == f"--weighting-model {R}/weighting_model"
    assert plan.uses("weighting_model") and plan.uses("attention")
    assert f"{R}/weighting_model" in plan.tracked_inputs() and f"{R}/small_model" in plan.tracked_inputs()


def test_editing_one_method_changes_only_its_params():
    a = workflow.Plan(config())
    c = copy.deepcopy(a.config)
    name = a.methods[0]
    c["train"]["methods"][name]["lr"] = 0.5
    b = workflow.Plan(c)
    assert a.train_params(name) != b.train_params(name)
    assert all(a.train_params(m) == b.train_params(m) for m in a.methods[1:])
    p = json.loads(b.train_params(name))
    assert set(p) == {"name", "common", "method"} and "methods" not in p["common"]
    c["parts"] = ["my_part.py"]  # the part files travel with every train job
    assert json.loads(workflow.Plan(c).train_params(name))["parts"] == ["my_part.py"]


def test_periods_and_targets():
    plan = workflow.Plan(config())
    n = plan.config["data"]["synthetic"]["n_snapshots"] - 1
    assert plan.periods() == list(range(1, n + 1))
    assert len(plan.report_evals()) == n * (1 + len(plan.methods) * len(plan.seeds))
    assert plan.all_targets()[-1] == f"{plan.R}/report/table.md"
    local = workflow.Plan({**plan.config, "data": {"source": "local"}})
    with pytest.raises(InputError, match="manifest"):
        local.periods()


def test_periods_of_local_data_come_from_the_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"periods": [{"index": 1}, {"index": 2}, {"index": 3}]}))
    plan = workflow.Plan({**config(), "data": {"source": "local"}}, manifest=lambda: tmp_path / "manifest.json")
    assert plan.periods() == [1, 2, 3]


def test_grouped_seeds_make_one_job_per_method_and_period():
    plan = workflow.Plan(config(group_seeds=True, seeds=[0, 1]))
    assert plan.train_pattern("train") == [f"{plan.R}/train/{{method}}/seed{s}/P{{period}}" for s in (0, 1)]
    assert "{seed}" not in plan.train_job_path("logs/train", ".log")
    one = workflow.Plan(config(group_seeds=False, seeds=[0, 1]))
    assert one.train_pattern("train") == [f"{one.R}/train/{{method}}/seed{{seed}}/P{{period}}"]


def test_the_train_rule_passes_every_part_input():
    """training.smk passes the part inputs in four groups (its command stays the one earlier
    versions ran); together they must be every name in gradloc.parts.INPUTS."""
    import re

    from gradloc import parts

    text = (ROOT / "workflow" / "rules" / "training.smk").read_text()
    groups = [re.findall(r'"(\w+)"', g) for g in re.findall(r"P\.input_args\(input, \[([^\]]*)\]\)", text)]
    names = [n for g in groups for n in g]
    assert sorted(names) == sorted(parts.INPUTS) and len(names) == len(set(names))


def test_null_layers_expand_to_null_methods_and_leave_the_others_unchanged():
    a = workflow.Plan(config())
    assert not any(m.startswith("null_") for m in a.methods) and workflow.null_methods(a.config) == {}
    b = workflow.Plan(config(null_layers={"count": 3, "seed": 7}))
    assert b.methods == a.methods + ["null_0", "null_1", "null_2"]
    assert json.loads(b.train_params("null_2"))["method"] == {
        "layers": "subset", "subset": {"index": 2, "count": 3, "seed": 7, "size": None}}
    # the configured methods' params (their job hashes) do not change, nor do their inputs
    assert all(a.train_params(m) == b.train_params(m) for m in a.methods)
    assert "null_layers" not in json.loads(b.train_params("null_0"))["common"]
    assert b.method_inputs("null_0", 1) == {"selection": f"{b.R}/select/selection.json"}
    assert f"{b.R}/eval/null_1/seed0/P2" in b.report_evals()
    # count 0 or null: off
    assert workflow.Plan(config(null_layers={"count": 0})).methods == a.methods
    assert workflow.Plan(config(null_layers=None)).methods == a.methods


def test_null_layers_stop_at_every_subset_when_the_config_knows_them():
    from math import comb

    c = config(null_layers={"count": 20, "size": 1})
    layers = c["model"]["architecture"]["n_layer"]
    nulls = workflow.null_methods(c)
    assert len(nulls) == min(20, comb(layers, 1)) == layers
    with pytest.raises(InputError, match="train.null_layers.size"):
        config(null_layers={"size": layers + 1})
    with pytest.raises(InputError, match="null_layers"):
        config(methods={"null_0": {}}, null_layers={"count": 1})
    with pytest.raises(InputError, match="train.null_layers: unknown key"):
        config(null_layers={"cuont": 2})
