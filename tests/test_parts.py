"""A new method is one file: tests/parts/l2_init.py defines a part (an L2 pull to the
initial weights) outside gradloc and registers it through the config's `parts:` list.
It trains by hand and through snakemake on config/test.yaml with no other file edited;
the registry refuses parts it cannot run."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train import (
    COMMON,
    world,  # noqa: F401  (the tiny world fixture)
)

from gradloc import parts, train, workflow
from gradloc.io import InputError
from helpers import ROOT, snakemake

PART_FILE = ROOT / "tests" / "parts" / "l2_init.py"


def distance(folder, base):
    a, b = load_file(folder / "model" / "model.safetensors"), load_file(base / "model" / "model.safetensors")
    return sum(float(((a[k] - b[k]) ** 2).sum()) for k in a)


def test_the_part_pulls_training_towards_the_initial_weights(world, tmp_path):  # noqa: F811
    def run(name, method):
        params = {"name": name, "common": {**COMMON, "epochs": 3}, "method": method, "parts": [str(PART_FILE)]}
        return train.run(params, init=world / "base_model", tokens=world / "tokens", period=1, seed=0,
                         out=tmp_path / name)

    full = run("full", {})
    pulled = run("l2", {"l2_init": {"weight": 50.0}})
    assert pulled["method_config"] == {"layers": "all", "l2_init": {"weight": 50.0}}
    assert pulled["l2_init"]["steps"] == pulled["steps"] == full["steps"]  # after_step ran once per step
    base = world / "base_model"
    assert distance(tmp_path / "l2", base) < 0.5 * distance(tmp_path / "full", base)
    assert pulled["final_loss"] > full["final_loss"]  # the pull costs fit to the diff


def test_unknown_parts_and_bad_entries_are_named(tmp_path):
    c = yaml.safe_load((ROOT / "config" / "test.yaml").read_text())
    part = tmp_path / "noop.py"
    part.write_text("from gradloc.parts import Part, register\n"
                    "register(Part('noop_part', schema={'type': 'object', 'additionalProperties': False}))\n")
    c["train"]["methods"] = {"x": {"noop_part": {}}}
    with pytest.raises(InputError, match=r"train.methods.x: unknown key\(s\) \['noop_part'\]"):
        workflow.check(dict(c))  # the part's file is not listed
    workflow.check({**c, "parts": [str(part)]})
    with pytest.raises(InputError, match=r"parts: nope.py: no such file"):
        workflow.check({**c, "parts": ["nope.py"]})
    c["train"]["methods"] = {"l2": {"l2_init": {"weight": -1}}}
    with pytest.raises(InputError, match=r"train.methods.l2.l2_init.weight: -1 is less than the minimum of 0"):
        workflow.check({**c, "parts": [str(PART_FILE)]})
    with pytest.raises(InputError, match="no schema given"):
        parts.register(parts.Part("no_schema_anywhere"))
    parts.register(parts.Part("needs_a_ghost", schema={"type": "object"}, needs=lambda e, m: ["ghost"]))
    with pytest.raises(InputError, match=r"unknown input\(s\) \['ghost'\]"):
        parts.needs({"layers": "all", "needs_a_ghost": {}})


def test_a_new_part_runs_through_the_workflow(tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "test.yaml").read_text())
    cfg["parts"] = ["tests/parts/l2_init.py"]
    cfg["train"]["methods"] = {"full": {}, "l2": {"l2_init": {"weight": 50.0}}}
    path = tmp_path / "l2.yaml"
    path.write_text(yaml.safe_dump(cfg))
    R = tmp_path / "r"
    snakemake("--configfile", str(path), "--config", f"results={R}", "--cores", "2", check=True)
    log = (R / "logs" / "train" / "l2" / "P1.log").read_text()
    command = next(line for line in log.splitlines() if line.startswith("command: gradloc train"))
    assert '"parts":["tests/parts/l2_init.py"]' in command and '"l2_init":{"weight":50.0}' in command
    metrics = json.loads((R / "train" / "l2" / "seed0" / "P1" / "metrics.json").read_text())
    assert metrics["l2_init"]["steps"] == metrics["steps"] > 0
    base = R / "base_model"
    for p in (1, 2):  # period 2 starts from period 1: the pull is to that period's start
        start = base if p == 1 else R / "train" / "l2" / "seed0" / f"P{p - 1}"
        start_full = base if p == 1 else R / "train" / "full" / "seed0" / f"P{p - 1}"
        assert distance(R / "train" / "l2" / "seed0" / f"P{p}", start) < \
            distance(R / "train" / "full" / "seed0" / f"P{p}", start_full)
    table = (R / "report" / "table.md").read_text()
    assert "l2" in table and "full" in table
    assert torch.isfinite(torch.tensor(metrics["final_loss"]))


def test_an_installed_package_registers_through_the_entry_point(tmp_path):
    """A distribution with a `gradloc.parts` entry point (here a bare .dist-info on the
    path, as pip leaves one) is loaded without any `parts:` list."""
    (tmp_path / "my_part.py").write_text(
        "from gradloc.parts import Part, register\n"
        "register(Part('my_part', schema={'type': 'object'}, needs=lambda entry, method: ['tagged']))\n")
    info = tmp_path / "my_part-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-part\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[gradloc.parts]\nmy_part = my_part\n")
    code = "from gradloc import parts; print(parts.needs({'layers': 'all', 'my_part': {}}))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['tagged']"
