"""No import circles in edgefa: not between its parts (subpackages and top-level modules), not
between its modules. Every import counts, the ones inside functions too (a lazy import hides a
circle, it does not break it). Read with `ast`, nothing is imported."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from source_imports import PACKAGE, REPO, imported, module_of, part_of

Edges = dict[tuple[str, str], list[str]]        # (importer, imported) -> ["file:line", ...]


def read_sources() -> dict[str, tuple[Path, str]]:
    """module name -> (path, source) for every module of edgefa."""
    return {module_of(path): (path, path.read_text(encoding="utf-8")) for path in sorted(PACKAGE.rglob("*.py"))}


def module_edges(sources: dict[str, tuple[Path, str]]) -> Edges:
    """Which edgefa module imports which, wherever the import stands: `from a.b import c` is an
    edge to a.b.c where that is a module, else to a.b (c is a name defined there)."""
    edges: Edges = defaultdict(list)
    for module, (path, text) in sources.items():
        for node in ast.walk(ast.parse(text, filename=str(path))):
            names = imported(node, path)
            if isinstance(node, ast.ImportFrom):
                names = names[1:]                       # a.b.c for each c (a.b itself is their fallback)
            targets = set()
            for target in names:
                while target and target not in sources:    # the longest prefix that is a module
                    target = target.rpartition(".")[0]
                if target and target != module:
                    targets.add(target)
            for target in targets:
                edges[(module, target)].append(f"{path.relative_to(REPO)}:{node.lineno}")
    return edges


def part_edges(edges: Edges) -> Edges:
    """The module graph folded onto edgefa's parts; imports inside one part drop out."""
    folded: Edges = defaultdict(list)
    for (a, b), where in edges.items():
        if part_of(a) != part_of(b):
            folded[(part_of(a), part_of(b))] += where
    return folded


def cycles(edges: Edges) -> list[list[str]]:
    """The circles: in each strongly connected group of more than one node (Tarjan), a shortest
    circle through each node (one per set of nodes), as the nodes along it, the first repeated at
    the end."""
    graph = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    circles = {}
    for group in groups:
        for start in sorted(group):
            circle = _circle_through(start, group, graph)
            circles.setdefault(frozenset(circle), circle)
    return list(circles.values())


def _circle_through(start: str, group: set[str], graph) -> list[str]:
    """A shortest circle from `start` back to it (breadth first, inside its group)."""
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]] & group):
            if w == start:
                return path + [start]
            if w not in seen:
                seen.add(w)
                paths.append(path + [w])
    raise AssertionError(f"no circle through {start}")        # a strongly connected group has one


def describe(circle: list[str], edges: Edges) -> str:
    """'a -> b -> a' and, per step, where the import stands (its first few places)."""
    steps = [f"  {a} -> {b}: {', '.join(edges[(a, b)][:3])}" for a, b in zip(circle, circle[1:])]
    return " -> ".join(circle) + "\n" + "\n".join(steps)


def test_no_circle_between_the_parts_of_edgefa():
    edges = part_edges(module_edges(read_sources()))
    # the walk sees the package's real layering (so an empty graph cannot pass for a clean one)
    assert {("runtime", "bundle"), ("training", "models"), ("link", "runtime"), ("runtime", "shared")} <= set(edges)
    found = cycles(edges)
    assert not found, "import circles between parts of edgefa:\n" + "\n".join(describe(c, edges) for c in found)


def test_no_circle_between_the_modules_of_edgefa():
    edges = module_edges(read_sources())
    assert ("edgefa.shared.datasets", "edgefa.shared.mnist1d") in edges
    found = cycles(edges)
    assert not found, "import circles between modules:\n" + "\n".join(describe(c, edges) for c in found)


def test_a_circle_is_found_and_named_lazy_imports_included():
    """The checks above would fail on a circle, one hidden in a function body included."""
    fake = {
        "edgefa.models.layers": (PACKAGE / "models" / "layers.py", "from ..training.rules import fa_linear\n"),
        "edgefa.training.rules": (PACKAGE / "training" / "rules.py", "import torch\n"),
        "edgefa.training.trainer": (PACKAGE / "training" / "trainer.py",
                                    "from ..models import layers\n"
                                    "def train():\n    from ..diagnostics.alignment import measure\n"),
        "edgefa.diagnostics.alignment": (PACKAGE / "diagnostics" / "alignment.py",
                                         "from edgefa.training import trainer\n"),
        "edgefa.bundle": (PACKAGE / "bundle.py", "import numpy\n"),
    }
    edges = module_edges(fake)
    assert edges[("edgefa.training.trainer", "edgefa.diagnostics.alignment")] == ["edgefa/training/trainer.py:3"]
    parts = part_edges(edges)
    circles = cycles(parts)
    assert circles == [["diagnostics", "training", "diagnostics"], ["models", "training", "models"]]
    message = describe(circles[0], parts)
    assert message.startswith("diagnostics -> training -> diagnostics") and "trainer.py:3" in message
    assert "models/layers.py:1" in describe(circles[1], parts)
    alignment, trainer = "edgefa.diagnostics.alignment", "edgefa.training.trainer"
    assert cycles(edges) == [[alignment, trainer, alignment]]
