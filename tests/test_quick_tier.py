"""The quick tier (tests/quick_tier.py) holds tests of every subpackage of edgefa, and every entry
names a test that exists (a renamed test would otherwise drop out of the tier unseen)."""

from __future__ import annotations

import ast

from conftest import REPO
from quick_tier import QUICK_TIER, STRUCTURE, in_quick_tier, selectors
from source_imports import PACKAGE

TESTS = REPO / "tests"


def test_every_subpackage_of_edgefa_has_tests_in_the_quick_tier():
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    missing = subpackages - {part for part, entries in QUICK_TIER.items() if entries}
    assert not missing, f"no quick-tier tests for {sorted(missing)}"
    top_level = {p.stem for p in PACKAGE.glob("*.py")}
    assert set(QUICK_TIER) <= subpackages | top_level, sorted(set(QUICK_TIER) - subpackages - top_level)


def test_every_entry_names_a_test_that_exists():
    dangling = []
    for entry in sorted(selectors()):
        file_name, _, test_name = entry.partition("::")
        path = TESTS / file_name
        if not path.is_file():
            dangling.append(entry)
            continue
        tests = {node.name for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")}
        if (test_name and test_name not in tests) or not tests:
            dangling.append(entry)
    assert not dangling, f"quick-tier entries naming no test: {dangling}"


def test_an_entry_selects_its_file_or_its_one_test():
    chosen = {"test_a.py", "test_b.py::test_one"}
    assert in_quick_tier("test_a.py", "test_anything", chosen)
    assert in_quick_tier("test_b.py", "test_one", chosen)
    assert not in_quick_tier("test_b.py", "test_two", chosen)
    assert not in_quick_tier("test_c.py", "test_one", chosen)
    assert "test_quick_tier.py" in STRUCTURE and "test_import_graph.py" in STRUCTURE
