"""The conda environments pin exactly what pyproject.toml pins."""

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)$")


def pyproject_pins():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = list(data["dependencies"]) + [d for ds in data["optional-dependencies"].values() for d in ds]
    pins = {}
    for dep in deps:
        m = PIN.match(dep)
        assert m, f"pyproject.toml: {dep!r} is not pinned to an exact version"
        pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def env_pins(path):
    env = yaml.safe_load(path.read_text())
    pins = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for pip_dep in dep["pip"]:
                m = PIN.match(pip_dep)
                assert m, f"{path.name}: pip dependency {pip_dep!r} is not pinned exactly"
                pins[m.group(1).lower().replace("_", "-")] = m.group(2)
        else:
            assert re.match(r"^[\w\-]+=[\d.]+$", dep), f"{path.name}: conda dependency {dep!r} is not pinned"
    return pins


ENVS = sorted((ROOT / "envs").glob("*.yaml"))


def test_there_are_envs():
    assert {p.stem for p in ENVS} >= {"data", "train"}


@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_env_pins_agree_with_pyproject(path):
    project = pyproject_pins()
    for name, version in env_pins(path).items():
        assert name in project, f"{path.name}: {name} is not a dependency in pyproject.toml"
        assert project[name] == version, f"{path.name}: {name}=={version} but pyproject pins {project[name]}"


def test_every_rule_env_exists():
    for smk in (ROOT / "workflow/rules").glob("*.smk"):
        for env in re.findall(r'"\.\./\.\./(envs/[\w.]+)"', smk.read_text()):
            assert (ROOT / env).exists(), f"{smk.name} names {env}, which does not exist"


def test_installed_versions_match_pins():
    from importlib.metadata import PackageNotFoundError, version

    for name, pinned in pyproject_pins().items():
        try:
            got = version(name)
        except PackageNotFoundError:
            continue
        assert got.split("+")[0] == pinned, f"{name}: installed {got}, pinned {pinned}"
