"""The layering of the packages, frozen: ``model/`` imports nothing of ours, ``data/`` uses of
``model/`` only its constants, its file helpers and the tokenizer's loading, ``trainer/`` sits
on both, and no module imports a private name of another or closes a circle. Every import
counts, those inside functions too (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from conftest import ROOT

PACKAGES = ("model", "data", "trainer")

# What each package may import of ours: a package name stands for all of its modules.
MAY_IMPORT = {
    "model": {"model"},
    "data": {"data", "model.constants", "model.files", "model.tokenizer"},
    "trainer": {"trainer", "data", "model"},
}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def our_modules(root: Path) -> dict[str, Path]:
    return {
        module_name(root, path): path
        for package in PACKAGES
        for path in sorted((root / package).rglob("*.py"))
    }


def imports(root: Path, name: str, path: Path, modules: dict[str, Path]):
    """(imported module, imported names, line) for each import of ours in one file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] not in PACKAGES:
                continue
            names = [alias.name for alias in node.names]
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            if submodules:  # ``from data import sources``: the module itself
                yield from ((sub, [], node.lineno) for sub in submodules)
                names = [n for n in names if f"{base}.{n}" not in modules]
            if names or not submodules:
                yield base, names, node.lineno


def allowed(importer: str, imported: str) -> bool:
    rules = MAY_IMPORT[importer.split(".")[0]]
    return any(imported == rule or imported.startswith(rule + ".") for rule in rules)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the import graph, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def layering_problems(root: Path) -> list[str]:
    modules = our_modules(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    problems = []
    for name, path in modules.items():
        where = path.relative_to(root)
        for imported, names, line in imports(root, name, path, modules):
            if not allowed(name, imported):
                problems.append(f"{where}:{line}: {name} may not import {imported}")
            private = [n for n in names if n.startswith("_")]
            if private and imported != name:
                problems.append(f"{where}:{line}: private {', '.join(private)} of {imported}")
            if imported in modules and imported != name:
                graph[name].add(imported)
    if cycle := find_cycle(graph):
        problems.append("import circle: " + " -> ".join(cycle))
    return problems


def test_the_packages_are_layered():
    assert layering_problems(ROOT) == []


def test_a_planted_circle_an_upward_import_and_a_private_name_are_caught(tmp_path):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package)
    before = set(layering_problems(tmp_path))
    (tmp_path / "data" / "a.py").write_text("from data.b import thing\n")
    (tmp_path / "data" / "b.py").write_text("def f():\n    from data import a\n")
    (tmp_path / "model" / "up.py").write_text("import trainer.loop\n")
    (tmp_path / "trainer" / "peek.py").write_text("from model.config import _hidden\n")
    problems = set(layering_problems(tmp_path)) - before
    assert "import circle: data.a -> data.b -> data.a" in problems
    assert any("model.up may not import trainer.loop" in p for p in problems)
    assert any("private _hidden of model.config" in p for p in problems)
