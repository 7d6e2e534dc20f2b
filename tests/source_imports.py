"""What a module's source imports, read with `ast` (nothing is imported): the one import walker of
tests/test_no_torch.py and tests/test_import_graph.py."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "edgefa"


def module_of(path: Path) -> str:
    """edgefa/runtime/engine.py -> edgefa.runtime.engine; a package's __init__.py is the package."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """The part of edgefa a module belongs to: edgefa.runtime.engine -> runtime; edgefa.bundle -> bundle."""
    return module.split(".")[1] if module.count(".") else module


def imported(node: ast.AST, path: Path) -> list[str]:
    """Absolute names an Import/ImportFrom node imports (relative imports resolved): for
    `from a.b import c`, both a.b and a.b.c (c may be a module or a name in a.b)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            package = module_of(path).split(".")
            if path.name != "__init__.py":
                package = package[:-1]
            base = package[:len(package) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        return [module] + [f"{module}.{alias.name}" for alias in node.names]
    return []


def top_level_import_nodes(tree: ast.Module):
    """Imports executed when the module is imported: module body, including top-level if/try."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                stack.extend(getattr(node, field, []) or [])
        elif isinstance(node, ast.ExceptHandler):
            stack.extend(node.body)
