"""The package's import graph: no cycles, and dependencies point one way (ARCHITECTURE.md).

    cli -> reproduce -> training, evaluation, report(s) -> attacks, framework, data, probe -> layers, models

and errors, files, config, plotting are base modules anyone may import.  Read from the source
with ``ast`` (nothing is imported), function-level imports included: an import moved into a
function to dodge a cycle is still the same dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

#: floors, bottom (0) to top; a module may import its own floor and those below
FLOORS: list[tuple[str, ...]] = [
    ("abnn.errors", "abnn.files", "abnn.config", "abnn.plotting"),
    ("abnn.layers", "abnn.models"),
    ("abnn", "abnn.attacks", "abnn.framework", "abnn.data", "abnn.probe"),
    ("abnn.training", "abnn.evaluation", "abnn.reports", "abnn.runs", "abnn.benchmark"),
    ("abnn.reproduce", "abnn.gpucheck"),
    ("abnn.cli", "abnn.flags"),
]

#: what floors still owe (issue 22): nothing now; an entry may only go, never come
KNOWN_UPWARD: set[tuple[str, str]] = set()
KNOWN_CYCLES: list[set[str]] = []


def _name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in (SRC / "abnn").rglob("*.py")}


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The package modules an import statement loads (a name imported from a package that is not
    a submodule counts as the package)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "abnn"]
    if node.level == 0:
        if not (node.module or "").split(".")[0] == "abnn":
            return []
        base = node.module
    else:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module] |= set(_targets(module, path.name == "__init__.py", node)) - {module}
    return graph


def floor(module: str) -> int:
    for i, names in enumerate(FLOORS):
        if any(module == n or (n != "abnn" and module.startswith(n + ".")) for n in names):
            return i
    raise AssertionError(f"{module} is on no floor: add it to FLOORS")


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while not comp or w != v:
                w = stack.pop()
                comp.add(w)
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_is_on_a_floor() -> None:
    for module in MODULES:
        floor(module)


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert [c for c in found if c not in KNOWN_CYCLES] == []


def test_no_upward_imports() -> None:
    up = {(m, t) for m, targets in import_graph().items() for t in targets if floor(t) > floor(m)}
    assert sorted(up - KNOWN_UPWARD) == []


def test_lower_floors_have_no_cycle_and_no_upward_import() -> None:
    """attacks, data, framework and evaluation owe nothing: none of them is in a known exception."""
    mine = ("abnn.attacks", "abnn.data", "abnn.framework", "abnn.evaluation")
    owed = {m for m, _ in KNOWN_UPWARD} | set().union(*KNOWN_CYCLES)
    assert not [m for m in owed if m.startswith(mine)]
    # the registry is the mechanism only: it imports no attack
    assert import_graph()["abnn.attacks.registry"] == {"abnn.attacks.base"}
