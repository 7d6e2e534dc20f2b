"""Markdown tables (GitHub style), the one place edgefa writes them. Standard library only."""

from __future__ import annotations

from typing import Any, Sequence


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|")        # a "|" in a cell (||h_L||) must not start a column


def markdown_table_lines(headers: Sequence[Any], rows: Sequence[Sequence[Any]],
                         right_aligned: bool = False) -> list[str]:
    """The lines of a table: the header, the rule (every column right-aligned with `right_aligned`,
    else the default), one line per row."""
    rule = "---:|" if right_aligned else "---|"
    return (["| " + " | ".join(map(_cell, headers)) + " |", "|" + rule * len(headers)]
            + ["| " + " | ".join(map(_cell, row)) + " |" for row in rows])
