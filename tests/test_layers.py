"""The package's tiers: every import inside `diverse_vit_hf` (top-level, deferred inside a function, or only for type
checking) goes from a tier to a tier below it, tiers on one level stay independent, and no module imports itself back
through others. Read from the source with `ast`, so an import that only runs on some path counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "diverse_vit_hf"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / PACKAGE

# Lowest first. A tier may import from any tier on an earlier line; tiers on one line must not import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("utils",),
    ("losses",),
    ("models", "data"),
    ("analysis",),
    ("hub",),
    ("trainer",),
    ("scripts",),
)
# The package's `__init__.py` assembles the public API from every tier; nothing inside imports it.
TOP_LEVEL = PACKAGE


def module_name(path: Path, package_dir: Path) -> str:
    parts = path.relative_to(package_dir.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, name: str, modules: set[str]) -> set[str]:
    """The package's modules that `path` (module `name`) imports; `from . import x` counts the submodule `x`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == PACKAGE:
                target = node.module
            else:
                continue
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in modules)
    return {module for module in found if module in modules}


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    names = {path: module_name(path, package_dir) for path in sorted(package_dir.rglob("*.py"))}
    modules = set(names.values())
    return {name: imported_modules(path, name, modules) - {name} for path, name in names.items()}


def tier_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    level = {tier: index for index, tiers in enumerate(LAYERS) for tier in tiers}
    problems = []
    for module, imports in sorted(graph.items()):
        source = tier_of(module)
        if source is None:
            continue
        if source not in level:
            problems.append(f"{module} is in no tier: move it into one of {sorted(level)}")
            continue
        for target in sorted(imports):
            destination = tier_of(target)
            if destination is None:
                problems.append(f"{module} imports the package's __init__ ({target}); import the defining module")
            elif destination != source and (destination not in level or level[destination] >= level[source]):
                problems.append(f"{module} ({source}) imports {target} ({destination}), which is not below it")
    return problems


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A module cycle as a list that starts and ends with the same module, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            # A package's __init__ importing its own submodules is how it re-exports, not a cycle.
            if module == target.rpartition(".")[0]:
                continue
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_every_module_is_in_a_tier_and_imports_only_from_below():
    graph = import_graph()
    assert len(graph) > 40, "the package's modules were not found"
    assert layer_violations(graph) == []


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_the_tiers_exist_and_the_public_api_imports_from_them():
    graph = import_graph()
    tiers = {tier_of(module) for module in graph} - {None}
    assert tiers == {tier for tiers in LAYERS for tier in tiers}
    assert {tier_of(target) for target in graph[TOP_LEVEL]} >= {"losses", "models", "trainer"}


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # a tier importing upwards
        ({"models/a.py": "from ..trainer.b import x\n", "trainer/b.py": ""}, "not below it"),
        # a deferred import inside a function counts
        ({"losses/a.py": "def f():\n    from diverse_vit_hf.hub import b\n", "hub/b.py": ""}, "not below it"),
        # siblings on one level stay independent
        ({"models/a.py": "from ..data import b\n", "data/b.py": ""}, "not below it"),
        # a flat module outside the tiers
        ({"flat.py": "", "utils/b.py": ""}, "in no tier"),
    ],
)
def test_layer_check_finds_violations(tmp_path, files, expected):
    root = tmp_path / PACKAGE
    for relative, text in {"__init__.py": "", **files}.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(text)
    problems = layer_violations(import_graph(root))
    assert any(expected in problem for problem in problems), problems


def test_cycle_check_finds_a_cycle_through_a_type_checking_import(tmp_path):
    root = tmp_path / PACKAGE
    (root / "analysis").mkdir(parents=True)
    for path in (root / "__init__.py", root / "analysis" / "__init__.py"):
        path.touch()
    (root / "analysis" / "report.py").write_text("from .plotting import plot\n")
    (root / "analysis" / "plotting.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .report import Report\n"
    )
    cycle = find_cycle(import_graph(root))
    assert cycle is not None and set(cycle) == {f"{PACKAGE}.analysis.report", f"{PACKAGE}.analysis.plotting"}
