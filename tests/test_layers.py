"""The package's shape: imports point one way, no import cycle, no file too long to read in one sitting.

Every `fastft` module is in one of two layers. The lower one knows recipes, data, models, the
run folder and the backends; the higher one holds the commands built on them. A lower module
never imports a higher one, and no two modules import each other, directly or through others,
counting imports inside functions too (they run as soon as the function does).
"""

import ast
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "fastft"
LOWER = {"fastft.errors", "fastft.recipe", "fastft.distributed", "fastft.models", "fastft.records", "fastft.tokenized",
         "fastft.data", "fastft.batching", "fastft.runs", "fastft.claim", "fastft.memory", "fastft.noise", "fastft.backends",
         "fastft.backends.hf", "fastft.backends.unsloth"}
HIGHER = {"fastft", "fastft.__main__", "fastft.cli", "fastft.train", "fastft.plan", "fastft.plan_report",
          "fastft.export", "fastft.merge", "fastft.generate", "fastft.evaluation", "fastft.bench",
          "fastft.bench_count", "fastft.bench_report", "fastft.run_report"}
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def fastft_imports(path: Path) -> set[str]:
    """The fastft modules `path` imports anywhere in it (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "fastft"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fastft":
            # `from fastft import merge` imports the module fastft.merge; `from fastft.data import x` imports fastft.data
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                      for a in node.names}
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: fastft_imports(path) - {name} for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    unplaced = sorted(set(MODULES) - LOWER - HIGHER)
    assert not unplaced, f"put {unplaced} in LOWER or HIGHER in tests/test_layers.py"


def test_lower_modules_never_import_higher_ones():
    upward = sorted(f"{m} imports {dep}" for m in LOWER & set(GRAPH) for dep in GRAPH[m] if dep in HIGHER)
    assert not upward, upward


def test_no_import_cycle():
    # Depth-first search; a module met again while still on the path closes a cycle.
    cycles, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for dep in sorted(GRAPH.get(m, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_the_cycle_finder_finds_a_cycle(monkeypatch):
    monkeypatch.setitem(GRAPH, "fastft.errors", {"fastft.cli"})  # cli reaches errors: now a loop
    with pytest.raises(AssertionError, match="fastft.errors"):
        test_no_import_cycle()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_over_500_lines(name):
    lines = len(MODULES[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines: split it by job"
