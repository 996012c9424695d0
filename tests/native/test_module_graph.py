"""vhdcore's modules depend one way (DESIGN §2, issue 15): the graph of its top-level module trees, read from the
`crate::` paths in its sources (a file under `src/chain/` belongs to `chain`; `super::` stays within a tree), has no
cycle, and the layers below never name the ones above."""

from __future__ import annotations

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "rust_core" / "crates" / "vhdcore" / "src"
CRATE_PATH = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")
# Lower layers first; a module may use only its own layer's trees (if no cycle) or lower ones.
LAYERS = [
    {"error", "rng"},
    {"format", "io"},
    {"source", "disk"},
    {"chain"},
    {"fs"},
    {"export", "image", "estimate"},
    {"writer", "coalesce"},
]


def module_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(SRC.rglob("*.rs")):
        relative = path.relative_to(SRC)
        if relative.name == "lib.rs" and len(relative.parts) == 1:
            continue
        node = relative.parts[0].removesuffix(".rs")
        code = "\n".join(line.split("//", 1)[0] for line in path.read_text().splitlines())
        graph.setdefault(node, set()).update(m for m in CRATE_PATH.findall(code) if m != node)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_vhdcore_modules_have_no_cycle() -> None:
    graph = module_graph()
    assert {"chain", "format", "image", "coalesce", "estimate"} <= graph.keys()
    cycle = find_cycle(graph)
    assert cycle is None, "module cycle: " + " -> ".join(cycle or [])


def test_lower_layers_never_name_higher_ones() -> None:
    rank = {module: i for i, layer in enumerate(LAYERS) for module in layer}
    graph = module_graph()
    assert graph.keys() <= rank.keys(), f"place the new module in LAYERS: {sorted(graph.keys() - rank.keys())}"
    upward = sorted((a, b) for a, uses in graph.items() for b in uses if rank[b] > rank[a])
    assert upward == [], f"modules that use a higher layer: {upward}"


def test_the_check_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
