"""The conda environments pin exactly what pyproject.toml pins."""

import re
from pathlib import Path

import pytest
import tomllib
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


# --- each rule's env provides what its stage commands import ------------------------------

import ast
import importlib.metadata
import sys

SRC = ROOT / "src"


def rules_with_envs():
    """(smk file, rule, env file, [stage], launcher?) for every rule (or checkpoint) with a `conda:` env; the stages
    are the `gradloc` subcommands its shell runs (`python -m gradloc STAGE` or the train
    rule's `{params.launcher} STAGE`)."""
    out = []
    for smk in sorted((ROOT / "workflow/rules").glob("*.smk")):
        for block in re.split(r"^(?=(?:rule|checkpoint) \w+:)", smk.read_text(), flags=re.M):
            name = re.match(r"(?:rule|checkpoint) (\w+):", block)
            env = re.search(r'conda:\s*"\.\./\.\./(envs/[\w.]+)"', block)
            if not (name and env):
                continue
            stages = re.findall(r"(?:-m gradloc|\{params\.launcher\})\s+([a-z][\w-]*)", block)
            out.append((smk.name, name.group(1), env.group(1), stages, "{params.launcher}" in block))
    return out


def module_file(module: str) -> Path | None:
    parts = module.split(".")
    for path in (SRC.joinpath(*parts, "__init__.py"), SRC.joinpath(*parts[:-1], parts[-1] + ".py")):
        if path.exists():
            return path
    return None


def imports_of(module: str) -> set[str]:
    """Top-level names of the third-party modules that `module` imports, following its
    imports within gradloc (module-level and inside functions alike: a stage's lazy
    imports run too)."""
    seen, todo, external = set(), [module], set()
    while todo:
        mod = todo.pop()
        if mod in seen or module_file(mod) is None:
            continue
        seen.add(mod)
        path = module_file(mod)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                    # `from . import x` may name a module
                    names = [base] + [f"{base}.{a.name}" for a in node.names]
                else:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[0] == "gradloc":
                    todo.append(name)
                elif name.split(".")[0] not in sys.stdlib_module_names and name.split(".")[0] != "__future__":
                    external.add(name.split(".")[0])
    return external


def env_distributions(path: Path) -> set[str]:
    env = yaml.safe_load(path.read_text())
    names = set()
    for dep in env["dependencies"]:
        for d in dep["pip"] if isinstance(dep, dict) else [dep]:
            names.add(re.split(r"[=<>!~ ]", d)[0].lower().replace("_", "-"))
    return names


def test_rules_with_envs_are_found():
    found = {rule: stages for _, rule, _, stages, _ in rules_with_envs()}
    assert found["train"] == ["train"] and found["download"] == ["download"] and found["split"] == ["split"]
    assert all(found.values()), f"rules whose shell runs no gradloc stage: {[r for r, s in found.items() if not s]}"


@pytest.mark.parametrize("smk,rule,env,stages,launcher", rules_with_envs(), ids=lambda v: v if isinstance(v, str) else "")
def test_env_provides_the_stage_imports(smk, rule, env, stages, launcher):
    from gradloc.cli import STAGES

    providers = importlib.metadata.packages_distributions()
    listed = env_distributions(ROOT / env)
    modules = imports_of("gradloc.__main__") | imports_of("gradloc.cli")
    for stage in stages:
        assert stage in STAGES, f"{smk}: rule {rule} runs `gradloc {stage}`, which is no stage"
        modules |= imports_of(STAGES[stage][0])
    needed = {"accelerate"} if launcher else set()
    missing = []
    for module in sorted(modules):
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        assert dists, f"{smk}: rule {rule} imports {module}, which no installed distribution provides"
        if not dists & listed:
            missing.append(f"{module} (from {'/'.join(sorted(dists))})")
    missing += [f"{d} (the launcher)" for d in needed - listed]
    assert not missing, f"{smk}: rule {rule} ({env}) runs {stages} importing {', '.join(missing)}, not in {env}"


def test_imports_of_follows_gradloc_imports():
    # basemodel reaches torch itself and jsonschema only through gradloc.schema
    assert {"torch", "jsonschema"} <= imports_of("gradloc.basemodel")
    assert "torch" not in imports_of("gradloc.split")


def test_one_device_choice():
    """Every model stage places its model with gradloc.models.device (train: accelerate,
    which makes the same choice); no stage has its own test for a GPU."""
    from gradloc import basemodel, evaluate, metatrain, models, profile

    assert metatrain.device is models.device and basemodel.device is models.device  # attention: basemodel's
    assert evaluate.device is models.device and profile.device is models.device
    own = [p.name for p in (SRC / "gradloc").rglob("*.py")
           if "cuda.is_available()" in p.read_text() and p.name not in ("models.py", "engine.py")]
    assert not own, f"these modules choose a device themselves: {own}"
