"""The package's layout: layers that only point down (an order of the subpackages), no import
cycles, few files at the top of ``distill/``, lazy imports only where they keep the command
line's start-up fast."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("distill", "teachers", "students")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
    }


def imports_of(
    path: Path, modules: dict[str, Path], here: str | None = None
) -> list[tuple[str, int, bool]]:
    """(module imported, line, at module level?) for every import of a project module.

    ``from a.b import c`` imports ``a.b.c`` where that is a module, else ``a.b``. Parent
    packages that Python initialises on the way are not counted: a package's ``__init__`` may
    import its submodules without that being a cycle."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    here = here or module_name(path)
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: ``from .. import engine``, ``from .x import y``
                package = here.split(".")[
                    : len(here.split(".")) - node.level + (path.name == "__init__.py")
                ]
                base = ".".join([*package, *([node.module] if node.module else [])])
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        for name in names:
            if name in modules and name != here:
                found.append((name, node.lineno, id(node) in top_level))
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_no_module_imports_one_that_imports_it_back() -> None:
    """Every import counts, those inside functions too: a lazy import that closes a circle is
    a layering error that merely happens not to fail at import time."""
    modules = project_modules()
    graph = {name: {m for m, _, _ in imports_of(path, modules)} for name, path in modules.items()}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


# The layers, top to bottom: a module imports its own package and the layers below its own,
# never one beside or above it. ``distill`` is the package's face (it imports the registries).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("distill", "distill.__main__"),  # the package's face; ``python -m distill``
    ("distill.cli",),  # the command line
    ("distill.experiments", "distill.search"),  # many models: sweeps, searches, the demo
    ("distill.deploy", "distill.report"),  # a trained model outside training
    ("distill.engine",),  # training: step, loop, build, checkpoint, check
    ("distill.evaluation",),  # COCO mAP, size, compute, latency
    ("distill.kd",),  # the KD terms and feature kinds
    ("teachers", "students"),  # the builders
    ("distill.models", "distill.device"),  # the split forward, weights, cards; the Accelerator
    ("distill.data",),  # datasets
    ("distill.config",),  # YAML -> dataclasses
    ("distill.losses", "distill.fileio", "distill.shipped"),  # pure functions; files
)


def package_of(module: str) -> str:
    """The entry of ``LAYERS`` that holds ``module`` (its longest prefix there)."""
    names = [name for layer in LAYERS for name in layer]
    # ``distill`` holds only the package's own __init__ (its modules have their own layers)
    found = [n for n in names if module == n or (n != "distill" and module.startswith(n + "."))]
    if not found:
        raise KeyError(f"{module} is in no layer of tests/test_layout.py's LAYERS: place it")
    return max(found, key=len)


def climbing_imports(imports: dict[str, list[tuple[str, int]]]) -> list[str]:
    """The imports that do not point down: ``"a.b:12 imports c.d (layer 3 -> 1 up)"``.

    imports: {module: [(module it imports, line), ...]}"""
    floor = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    found = []
    for module, targets in sorted(imports.items()):
        here = package_of(module)
        for target, line in targets:
            there = package_of(target)
            if there != here and floor[there] <= floor[here]:
                found.append(
                    f"{module}:{line} imports {target}: {here} (layer {floor[here] + 1}) may "
                    f"import only the layers below it, and {there} is layer {floor[there] + 1}"
                )
    return found


def test_climbing_imports_names_the_arrow_that_climbs() -> None:
    assert climbing_imports({"distill.engine.step": [("distill.kd.combine", 3)]}) == []
    assert climbing_imports({"distill.engine.step": [("distill.engine.build", 3)]}) == []
    (up,) = climbing_imports({"distill.evaluation.cost": [("distill.deploy.export", 26)]})
    assert up.startswith("distill.evaluation.cost:26 imports distill.deploy.export")
    (beside,) = climbing_imports({"teachers": [("students.parts", 5)]})
    assert "teachers (layer 8)" in beside and "students is layer 8" in beside
    with pytest.raises(KeyError, match=r"distill\.newpackage\.x is in no layer"):
        climbing_imports({"distill.newpackage.x": []})


def test_relative_imports_are_read_too(tmp_path: Path) -> None:
    source = tmp_path / "x.py"
    source.write_text("from .. import engine\nfrom ..engine.step import train_step\n")
    modules = {"distill.engine": Path(), "distill.engine.step": Path()}
    found = imports_of(source, modules, here="distill.evaluation.x")
    assert found == [("distill.engine", 1, True), ("distill.engine.step", 2, True)]
    assert climbing_imports({"distill.evaluation.x": [(m, n) for m, n, _ in found]})


def test_layers_only_point_down() -> None:
    """Every project module sits in a layer of ``LAYERS`` and imports (at any depth of its
    code) only its own package and the layers below."""
    modules = project_modules()
    imports = {
        name: [(m, line) for m, line, _ in imports_of(path, modules)]
        for name, path in modules.items()
    }
    climbing = climbing_imports(imports)
    assert not climbing, "imports that climb:\n" + "\n".join(climbing)


def test_few_files_at_the_top_of_the_package() -> None:
    top = sorted(p.name for p in (REPO / "distill").glob("*.py"))
    assert len(top) <= 8, top


# Modules whose imports inside functions keep ``distill --help`` and the CLI's start-up fast: the
# command line imports TensorBoard and matplotlib only when a command that needs them runs (at
# the top they add 0.7-1.1 s, x1.16-1.22, to ``distill --help``; tests/test_cli.py checks that
# they stay out).
LAZY_ALLOWED = {"distill.cli"}


def test_lazy_imports_only_where_they_keep_start_up_fast() -> None:
    """Project imports inside functions are for the CLI's start-up alone, each with its reason,
    ``# lazy: what it loads``, on its line or the line above."""
    modules = project_modules()
    offenders = []
    for name, path in modules.items():
        lines = path.read_text().splitlines()
        for imported, lineno, top in sorted(set(imports_of(path, modules))):
            if top:
                continue
            first = lineno - 1  # the import's line, then up through the imports above it
            while first > 0 and lines[first - 1].lstrip().startswith(("from ", "import ")):
                first -= 1
            near = " ".join(lines[max(first - 1, 0) : lineno])
            if name not in LAZY_ALLOWED or not re.search(r"# lazy: \w", near):
                offenders.append(f"{name}:{lineno} imports {imported}")
    assert not offenders, "\n".join(offenders)


# What the lazy imports keep out of the CLI's start-up: third-party packages that cost seconds.
# (optuna: 0.26 s, distill search's alone)
SLOW_TO_IMPORT = ("torch.utils.tensorboard", "tensorboard", "matplotlib", "optuna")


def test_each_lazy_import_keeps_a_slow_package_out() -> None:
    """A lazy import of a module that loads none of SLOW_TO_IMPORT (through the module-level
    imports of it, of the project modules it imports and of their packages) buys nothing:
    import it at the top."""
    modules = project_modules()
    graph = {n: {m for m, _, top in imports_of(p, modules) if top} for n, p in modules.items()}
    slow = {name for name, path in modules.items() if imports_slow_package(path)}
    offenders = []
    for name in LAZY_ALLOWED:
        for imported, lineno, top in imports_of(modules[name], modules):
            if not top and not reachable(imported, graph) & slow:
                offenders.append(f"{name}:{lineno} imports {imported}, which loads none of them")
    assert not offenders, "\n".join(offenders)


def imports_slow_package(path: Path) -> bool:
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module]
        else:
            continue
        if any(n == s or n.startswith(f"{s}.") for n in names for s in SLOW_TO_IMPORT):
            return True
    return False


def reachable(start: str, graph: dict[str, set[str]]) -> set[str]:
    """The modules that importing ``start`` runs: its module-level imports, theirs, and the
    packages above each of them."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for here in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
            if here in graph and here not in seen:
                seen.add(here)
                todo.extend(graph[here])
    return seen
