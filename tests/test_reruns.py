"""Exact reruns after config changes.

After one completed run of config/test.yaml (conftest's `test_run`), each test changes one setting (a modified
copy of the config, passed with --configfile) and asks `snakemake -n` which jobs would
run. Snakemake 9's default rerun triggers (mtime, params, input, software-env, code)
decide; every rule passes exactly its config slice as `params`, so the job sets below
are exact: nothing more, nothing less.

Jobs are named (rule, output path relative to the results folder), e.g.
("train", "train/lora/seed0/P2").
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, snakemake

TEST_CONFIG = ROOT / "config" / "test.yaml"

pytestmark = pytest.mark.slow


JOB_HEADER = re.compile(r"^(?:local)?(?:rule|checkpoint) (\S+):$")


def planned_jobs(output: str, results: Path) -> set[tuple[str, str]]:
    """(rule, first output relative to `results`) of every job in a dry run's listing.
    The target rule `all` has no output and is left out."""
    jobs, rule = set(), None
    for line in output.splitlines():
        m = JOB_HEADER.match(line)
        if m:
            rule = m.group(1)
            continue
        if rule and line.startswith("    output: "):
            first = line[len("    output: "):].split(", ")[0]
            jobs.add((rule, os.path.relpath(first, results)))
            rule = None
    return jobs


# --- The pipeline's jobs for a config, by stage --------------------------------------

def periods(cfg: dict) -> list[int]:
    return list(range(1, cfg["data"]["synthetic"]["n_snapshots"]))


def uses_selection(cfg: dict, method: str) -> bool:
    return cfg["train"]["methods"][method].get("layers", "all") != "all"


def train_and_eval(cfg: dict, methods) -> set[tuple[str, str]]:
    return {(rule, f"{folder}/{m}/seed{s}/P{p}")
            for m in methods for s in cfg["train"]["seeds"] for p in periods(cfg)
            for rule, folder in (("train", "train"), ("evaluate", "eval"))}


# the report, and what reads every checkpoint beside it: model cards with results and the
# tracker's curves (issue 23)
REPORT = {("report", "report/table.csv"), ("model_cards", "model_cards"), ("tracked_curves", "extras/tracked_train.png")}
DATA = {("download", "corpus"), ("split", "split"), ("tag", "tagged"), ("probes", "probes")}


def attention_jobs(cfg: dict) -> set[tuple[str, str]]:
    """The small model and per-period scores, when some method has an `augment` part."""
    if not any("augment" in m for m in cfg["train"]["methods"].values()):
        return set()
    return {("small_model", "small_model")} | {("attention", f"attention/P{p}") for p in periods(cfg)}


def camels_jobs(cfg: dict) -> set[tuple[str, str]]:
    """The small model (the weighting model's backbone) and the meta-training, when some
    method weights tokens with CaMeLS."""
    if not any((m.get("token_weighting") or {}).get("kind") == "camels" for m in cfg["train"]["methods"].values()):
        return set()
    return {("small_model", "small_model"), ("metatrain", "weighting_model")}


def all_jobs(cfg: dict) -> set[tuple[str, str]]:
    return (DATA | {("base_model", "base_model"), ("tokens", "tokens"), ("profile", "profile"), ("subnet", "subnet"),
                    ("select", "select/selection.json")} | attention_jobs(cfg) | camels_jobs(cfg)
            | {("evaluate_base", f"eval/base/P{p}") for p in periods(cfg)}
            | train_and_eval(cfg, cfg["train"]["methods"]) | REPORT)


# --- One completed run, then dry runs with one change each ---------------------------

@pytest.fixture(scope="module")
def completed(test_run, tmp_path_factory):
    """The session's completed run of config/test.yaml (conftest `test_run`), a folder for
    changed configs, and the config itself."""
    return tmp_path_factory.mktemp("reruns"), test_run, yaml.safe_load(TEST_CONFIG.read_text())


def dry_run_with(completed, change: dict) -> set[tuple[str, str]]:
    """Jobs `snakemake -n` plans after merging `change` (nested dict) into the config."""
    tmp, results, cfg = completed
    changed = copy.deepcopy(cfg)

    def merge(into, new):
        for k, v in new.items():
            if isinstance(v, dict) and isinstance(into.get(k), dict):
                merge(into[k], v)
            else:
                into[k] = v

    merge(changed, change)
    path = tmp / f"changed_{len(list(tmp.glob('changed_*')))}.yaml"
    path.write_text(yaml.safe_dump(changed))
    run = snakemake("-n", "--configfile", str(path), "--config", f"results={results}", timeout=300)
    assert run.returncode == 0, run.stderr[-5000:]
    return planned_jobs(run.stdout + run.stderr, results)


def test_nothing_reruns_without_a_change(completed):
    assert dry_run_with(completed, {}) == set()


def test_training_hyperparameter_reruns_training_evaluation_and_report(completed):
    _, _, cfg = completed
    jobs = dry_run_with(completed, {"train": {"lr": cfg["train"]["lr"] * 2}})
    assert jobs == train_and_eval(cfg, cfg["train"]["methods"]) | REPORT


def test_one_methods_setting_reruns_only_that_method(completed):
    _, _, cfg = completed
    assert cfg["train"]["methods"]["lora"]["lora"]["r"] != 8
    jobs = dry_run_with(completed, {"train": {"methods": {"lora": {"lora": {"r": 8}}}}})
    assert jobs == train_and_eval(cfg, ["lora"]) | REPORT


def test_layer_selection_reruns_selection_and_the_methods_that_use_it(completed):
    _, _, cfg = completed
    selective = [m for m in cfg["train"]["methods"] if uses_selection(cfg, m)]
    # Both kinds must exist, or the test would not show that `full`/`lora` are spared.
    assert selective and len(selective) < len(cfg["train"]["methods"])
    assert cfg["select"]["rule"] != "topk"
    jobs = dry_run_with(completed, {"select": {"rule": "topk", "k": 2}})
    assert jobs == {("select", "select/selection.json")} | train_and_eval(cfg, selective) | REPORT
    # Spelled out: no data, base model, profile, base evaluation, full or lora training.
    rules = {rule for rule, _ in jobs}
    assert rules == {"select", "train", "evaluate", "report", "model_cards", "tracked_curves"}
    assert not any(m in out.split("/") for _, out in jobs for m in ("full", "lora"))


def test_data_generation_value_reruns_everything(completed):
    _, _, cfg = completed
    jobs = dry_run_with(completed, {"data": {"synthetic": {"seed": cfg["data"]["synthetic"]["seed"] + 1}}})
    assert jobs == all_jobs(cfg)


def test_job_model_matches_the_workflow(tmp_path):
    """all_jobs() above is the real DAG: a dry run into an empty folder plans exactly it."""
    cfg = yaml.safe_load(TEST_CONFIG.read_text())
    results = tmp_path / "results"
    run = snakemake("-n", "--configfile", str(TEST_CONFIG), "--config", f"results={results}", timeout=300)
    assert run.returncode == 0, run.stderr[-5000:]
    assert planned_jobs(run.stdout + run.stderr, results) == all_jobs(cfg)


def test_small_model_setting_reruns_the_scores_and_the_token_dropout_methods(completed):
    _, _, cfg = completed
    augmented = [m for m, v in cfg["train"]["methods"].items() if "augment" in v]
    assert augmented and len(augmented) < len(cfg["train"]["methods"])
    camels = [m for m, v in cfg["train"]["methods"].items() if "token_weighting" in v]
    jobs = dry_run_with(completed, {"attention": {"small_model": {"steps": 7}}})
    # the small model is also the CaMeLS weighting model's backbone
    assert jobs == attention_jobs(cfg) | camels_jobs(cfg) | train_and_eval(cfg, augmented + camels) | REPORT


def test_camels_setting_reruns_the_meta_training_and_its_methods(completed):
    _, _, cfg = completed
    camels = [m for m, v in cfg["train"]["methods"].items() if (v.get("token_weighting") or {}).get("kind") == "camels"]
    if not camels:
        pytest.skip("config/test.yaml has no camels method (its world leaves no T0 entity outside the evaluation probes)")
    jobs = dry_run_with(completed, {"camels": {"outer_steps": 3}})
    assert jobs == {("metatrain", "weighting_model")} | train_and_eval(cfg, camels) | REPORT


def test_subnet_setting_reruns_the_subnet_its_methods_and_the_report(completed):
    _, _, cfg = completed
    users = [m for m, v in cfg["train"]["methods"].items() if "subnet" in (v.get("layers"), v.get("mask"))]
    assert users and len(users) < len(cfg["train"]["methods"])
    jobs = dry_run_with(completed, {"subnet": {"steps": cfg["subnet"]["steps"] + 1}})
    assert jobs == {("subnet", "subnet")} | train_and_eval(cfg, users) | REPORT


def test_report_setting_reruns_only_the_report(completed):
    jobs = dry_run_with(completed, {"report": {"title": "another title"}})
    assert jobs == {("report", "report/table.csv")}


def test_grouping_seeds_or_not_reruns_nothing(completed):
    """train.group_seeds changes how jobs are cut, not what they compute: the folders and
    the training params are the same, so switching it reruns no job."""
    _, _, cfg = completed
    assert cfg["train"]["group_seeds"] is True
    assert dry_run_with(completed, {"train": {"group_seeds": False}}) == set()


@pytest.mark.parametrize("change", [{"control": "base", "loss": "sequence"}, {"control": "unchanged_diff"},
                                    {"salient": "subject"}, {"new_pool": "any"}, {"infoboxes": "keep"},
                                    {"bootstrap_unit": "sequence"}, {"permutations": 0},
                                    {"salient": "subject", "new_pool": "any", "infoboxes": "keep",
                                     "bootstrap_unit": "sequence"}])
def test_profile_control_and_loss_rerun_profile_selection_and_its_methods(completed, change):
    """The pre-issue-11 profile (`control: base`, whole-sequence loss) and the pre-issue-24
    pools and bootstrap (`salient: subject`, `new_pool: any`, `infoboxes: keep`,
    `bootstrap_unit: sequence`) stay reachable; like any profile setting (the permutation
    test's count too: tests.json is in the profile folder) it reruns the profile, the
    selection and the methods that use it."""
    _, _, cfg = completed
    selective = [m for m in cfg["train"]["methods"] if uses_selection(cfg, m)]
    jobs = dry_run_with(completed, {"profile": change})
    expect = ({("profile", "profile"), ("select", "select/selection.json")}
              | train_and_eval(cfg, selective) | REPORT)
    assert jobs == expect


def test_evaluation_setting_reruns_every_evaluation_and_the_report(completed):
    """`evaluate.candidates` (the fact-level ranking) changes what evaluation scores, not
    what trains."""
    _, _, cfg = completed
    jobs = dry_run_with(completed, {"evaluate": {"candidates": 5}})
    evals = {j for j in train_and_eval(cfg, cfg["train"]["methods"]) if j[0] == "evaluate"}
    assert jobs == (evals | {("evaluate_base", f"eval/base/P{p}") for p in periods(cfg)}
                    | REPORT - {("tracked_curves", "extras/tracked_train.png")})  # curves: from training only


def test_negative_control_setting_reruns_only_the_control(completed):
    _, _, cfg = completed
    assert cfg["train"]["methods"]["negative_control"]["permute_objects"]["seed"] != 1
    jobs = dry_run_with(completed, {"train": {"methods": {"negative_control": {"permute_objects": {"seed": 1}}}}})
    assert jobs == train_and_eval(cfg, ["negative_control"]) | REPORT


def test_switching_the_tracker_reruns_nothing(completed):
    """tracking reaches the jobs in $GRADLOC_TRACKING, not in params or commands: without a
    tracker only the figures drawn from its runs leave the targets."""
    assert dry_run_with(completed, {"tracking": {"backend": "none"}}) == set()
    # another folder: only the figures drawn from it
    assert dry_run_with(completed, {"tracking": {"dir": "/elsewhere"}}) == {("tracked_curves", "extras/tracked_train.png")}


def test_lm_eval_adds_only_its_own_jobs(completed):
    _, _, cfg = completed
    jobs = dry_run_with(completed, {"lm_eval": {"tasks": ["gradloc_cloze"], "limit": 8}})
    assert jobs == ({("lm_eval_base", "lm_eval/base"), ("general_ability", "extras/general_ability.csv")}
                    | {("lm_eval", f"lm_eval/{m}/seed{cfg['train']['seeds'][0]}") for m in cfg["train"]["methods"]})


def test_null_layers_add_only_the_null_methods(completed):
    """train.null_layers adds methods null_0.. (layers: subset) beside the others: their jobs
    and the report's, none of the configured methods' (their params leave null_layers out)."""
    _, _, cfg = completed
    assert "null_layers" not in cfg["train"]
    jobs = dry_run_with(completed, {"train": {"null_layers": {"count": 2, "seed": 0}}})
    assert jobs == train_and_eval(cfg, ["null_0", "null_1"]) | REPORT
