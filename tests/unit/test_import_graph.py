"""The Python packages depend one way (DESIGN §2, issue 15): the imports of every module under functions/ and
statemachine/ (read with ast, at module level and inside functions alike; only `if TYPE_CHECKING:` imports are left
out, as they never run) form no cycle between packages, and the domain never imports the layers above it."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP_PACKAGES = ("functions", "statemachine")
DOMAIN = ("functions.imaging", "functions.catalog", "functions.state", "functions.storage")
ABOVE_DOMAIN = ("statemachine", "functions.api", "functions.handlers")
"""What domain modules never import: the engine, the CLI and the HTTP server (statemachine), the API, the handlers."""
BELOW_IMAGING = ("functions.state", "functions.storage")
IMAGING = ("functions.imaging", "functions.catalog")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """Every module an import statement of `tree` names (`from a import b` names `a.b` too: b may be a module),
    relative imports resolved; statements under `if TYPE_CHECKING:` skipped (their `else:` kept)."""
    if isinstance(tree, ast.If) and is_type_checking(tree.test):
        for node in tree.orelse:
            yield from imported_modules(node, module, is_package)
        return
    if isinstance(tree, ast.Import):
        yield from (alias.name for alias in tree.names)
    elif isinstance(tree, ast.ImportFrom):
        base = tree.module or ""
        if tree.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - (tree.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        yield base
        yield from (f"{base}.{alias.name}" for alias in tree.names if alias.name != "*")
    for child in ast.iter_child_nodes(tree):
        yield from imported_modules(child, module, is_package)


def package_of(module: str) -> str:
    """The node of the graph: `functions.imaging` for functions/imaging/*.py, `statemachine.engine` for
    statemachine/engine.py, `statemachine.cli` for the CLI package."""
    return ".".join(module.split(".")[:2])


def sources() -> Iterator[Path]:
    for top in TOP_PACKAGES:
        yield from sorted((ROOT / top).rglob("*.py"))


def import_edges() -> dict[str, set[tuple[str, str]]]:
    """For each importing module, the (imported module, importing package) pairs of our own packages."""
    known = {module_name(path) for path in sources()}
    edges: dict[str, set[tuple[str, str]]] = {}
    for path in sources():
        module = module_name(path)
        tree = ast.parse(path.read_text(), filename=str(path))
        found = edges.setdefault(module, set())
        for name in imported_modules(tree, module, path.name == "__init__.py"):
            if name in known and name.split(".")[0] in TOP_PACKAGES:
                found.add((name, package_of(module)))
    return edges


def package_graph() -> dict[str, dict[str, set[str]]]:
    """package → imported package → the modules whose imports make that edge (self-edges left out)."""
    graph: dict[str, dict[str, set[str]]] = {}
    for module, imports in import_edges().items():
        source = package_of(module)
        graph.setdefault(source, {})
        for name, _ in imports:
            target = package_of(name)
            if target != source and target not in TOP_PACKAGES and source not in TOP_PACKAGES:
                graph[source].setdefault(target, set()).add(module)
    return graph


def cycles(graph: dict[str, dict[str, set[str]]]) -> list[list[str]]:
    """The strongly connected components of more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def under(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == package or module.startswith(f"{package}.") for package in packages)


def test_the_graph_is_read() -> None:
    graph = package_graph()
    assert "functions.imaging" in graph["functions.catalog"]
    assert "functions.state" in graph["functions.imaging"]
    assert "functions.imaging" in graph["functions.handlers"]


def test_no_cycle_between_packages() -> None:
    graph = package_graph()
    described = [
        " ↔ ".join(component)
        + ": "
        + "; ".join(
            f"{source} → {target} in {', '.join(sorted(graph[source][target]))}"
            for source in component
            for target in component
            if target in graph[source]
        )
        for component in cycles(graph)
    ]
    assert not described, "import cycles between packages:\n" + "\n".join(described)


@pytest.mark.parametrize(
    ("importers", "forbidden"),
    [(DOMAIN, ABOVE_DOMAIN), (BELOW_IMAGING, IMAGING)],
    ids=["domain-never-imports-engine-cli-api-handlers", "state-and-storage-never-import-imaging-or-catalog"],
)
def test_layering(importers: tuple[str, ...], forbidden: tuple[str, ...]) -> None:
    wrong = sorted(
        f"{module} imports {name}"
        for module, imports in import_edges().items()
        if under(module, importers)
        for name, _ in imports
        if under(name, forbidden)
    )
    assert not wrong, "imports against DESIGN §2:\n" + "\n".join(wrong)


def test_the_checks_catch_a_cycle_and_a_function_level_import() -> None:
    graph = {"a": {"b": {"a.x"}}, "b": {"c": {"b.y"}}, "c": {"a": {"c.z"}}, "d": {"a": {"d.w"}}}
    assert cycles(graph) == [["a", "b", "c"]]
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from functions.api import app\n"
        "def f():\n    from statemachine import engine\n"
        "from . import sibling\n"
    )
    names = set(imported_modules(tree, "functions.imaging.jobs", is_package=False))
    assert "statemachine.engine" in names
    assert "functions.imaging.sibling" in names
    assert not any(name.startswith("functions.api") for name in names)
