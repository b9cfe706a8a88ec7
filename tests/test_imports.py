"""The library's import graph, read from the source (every import, at the top or inside a
function): no stage module (a `gradloc <stage>` command's module, cli.STAGES) imports
another stage's module, no module imports snakemake, and the graph has no cycle. What
several stages share lives in neutral modules (core, tokenfiles, hub, figures, models,
io, ...)."""

import ast
from pathlib import Path

from gradloc import cli

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def imported(name: str, path: Path) -> set[str]:
    """The gradloc modules (and any snakemake) that module `name` imports."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            candidates = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        out |= {c for c in candidates if c in MODULES or c.split(".")[0] == "snakemake"}
    return out - {name}


GRAPH = {m: imported(m, p) for m, p in MODULES.items()}
STAGES = {module.split(":")[0] for module, _ in cli.STAGES.values()}


def stage_of(module: str) -> str | None:
    """The stage a module belongs to: the stage module itself or a module inside its package
    (gradloc.report.tracked, the tracked-curves stage, is inside the report's)."""
    owners = [s for s in STAGES if module == s or module.startswith(s + ".")]
    return min(owners, key=len) if owners else None


def test_the_reader_sees_imports():
    assert "gradloc.engine" in GRAPH["gradloc.train"] and "gradloc.parts" in GRAPH["gradloc.train"]
    assert "gradloc.io" in GRAPH["gradloc.methods.masking"]  # a relative `from ..io import`
    assert "gradloc.tokenfiles" in GRAPH["gradloc.evaluate"]


def test_no_stage_module_imports_another_stage():
    crossing = sorted(f"{m} -> {d}" for m, deps in GRAPH.items() if m != "gradloc.cli" for d in deps
                      if stage_of(d) and stage_of(d) != stage_of(m))
    assert crossing == []


def test_the_library_never_imports_snakemake():
    assert sorted(m for m, deps in GRAPH.items() if any(d.split(".")[0] == "snakemake" for d in deps)) == []


def test_the_import_graph_has_no_cycle():
    # The package __init__s are imported on the way to their modules; a module importing
    # its own package (`from . import x`) is not a cycle.
    graph = {m: {d for d in deps if d in MODULES and not m.startswith(d + ".")} for m, deps in GRAPH.items()}
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(path[path.index(d):] + [d] if d in path else [m, d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []
