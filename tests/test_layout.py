"""The house rule from DESIGN.md: imports flow one way between rooms, with no circles.

jobs -> rlhf -> synthesis -> curation -> deploy -> conversion -> training -> platform -> moe ->
dense -> base
(base: the top-level modules). Every import counts, including those inside functions and under
TYPE_CHECKING: a lazy import is still a dependency a reader has to follow."""

from __future__ import annotations

import ast
from pathlib import Path

import upcycle

ROOMS = ["jobs", "rlhf", "synthesis", "curation", "deploy", "conversion", "training", "platform",
         "moe", "dense"]  # fmt: skip
PACKAGE = Path(upcycle.__file__).parent


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the upcycle modules it imports (`from upcycle.x import y` imports y where y is a
    submodule, else x)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.startswith("upcycle"):
                    for alias in node.names:
                        submodule = f"{node.module}.{alias.name}"
                        found.add(submodule if submodule in modules else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("upcycle.")}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _rank(module: str) -> int:
    parts = module.split(".")
    room = parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ROOMS) else ""
    return ROOMS.index(room) if room else len(ROOMS)


def test_imports_flow_down_the_rooms():
    upward = [
        f"{importer} imports {imported}"
        for importer, targets in _imports().items()
        for imported in targets
        if _rank(imported) < _rank(importer)
    ]
    assert not upward, "imports against the room order:\n" + "\n".join(sorted(upward))


def test_no_import_circles():
    graph = _imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(circles)
