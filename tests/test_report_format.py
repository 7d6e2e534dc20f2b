"""report/format.py and report/markdown.py, the one home of numbers as text and of markdown tables,
and the rule that only report/ writes HTML: the exact strings the pages, tables and terminal show."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from edgefa.report.format import (fmt_bytes, fmt_cosine, fmt_cosine_spread, fmt_energy, fmt_joules_fine, fmt_ms,
                                  fmt_num, fmt_pct, fmt_ratio, fmt_sci, fmt_seconds_fine, is_number)
from edgefa.report.markdown import markdown_table_lines
from edgefa.report.page import note, section, text_kv_table, text_table

from source_imports import PACKAGE


def test_missing_values_read_as_missing_never_as_a_number():
    for missing in (None, math.nan, math.inf, True, "3"):
        assert not is_number(missing)
        assert fmt_num(missing) == fmt_ms(missing) == fmt_bytes(missing) == fmt_energy(missing) == "n/a"
        assert fmt_ratio(missing) == "n/a"
    assert fmt_pct(None) == fmt_cosine_spread(None) == fmt_sci(None) == fmt_sci(True) == fmt_sci("x") == "-"
    assert fmt_cosine(None) == "degenerate" and fmt_cosine(math.nan) == fmt_cosine("x") == "n/a"


@pytest.mark.parametrize("call, expected", [
    (lambda: fmt_num(0), "0"), (lambda: fmt_num(1234.5), "1,234"), (lambda: fmt_num(123.45), "123.5"),
    (lambda: fmt_num(-1.234), "-1.23"), (lambda: fmt_num(0.0012345), "0.00123"),
    (lambda: fmt_ms(3.21), "3.21 ms"),
    (lambda: fmt_bytes(1023), "1023 B"), (lambda: fmt_bytes(1024), "1.0 KiB"),
    (lambda: fmt_bytes(3 * 2**20 + 2**19), "3.5 MiB"), (lambda: fmt_bytes(2**31), "2.0 GiB"),
    (lambda: fmt_energy(0.0042), "4.20 mJ"), (lambda: fmt_energy(2.5), "2.50 J"),
    (lambda: fmt_ratio(0.5), "0.50\u00d7"),
    (lambda: fmt_pct(0.8123), "81.2%"), (lambda: fmt_pct(0.8, 0.1), "80.0 ± 10.0%"),
    (lambda: fmt_pct(0.8, 0.1, unit=""), "80.0 ± 10.0"),
    (lambda: fmt_cosine(0.5), "+0.5000"), (lambda: fmt_cosine(-1), "-1.0000"),
    (lambda: fmt_cosine_spread(0.1234), "+0.123"), (lambda: fmt_cosine_spread(-0.5, 0.01), "-0.500 ± 0.010"),
    (lambda: fmt_sci(2.37e2), "237"), (lambda: fmt_sci(5e-10), "5e-10"), (lambda: fmt_sci(np.float32(0.5)), "0.5"),
    (lambda: fmt_seconds_fine(2.5e-4), "250.00 µs"), (lambda: fmt_seconds_fine(0.0125), "12.500 ms"),
    (lambda: fmt_joules_fine(3e-8), "30.0 nJ"), (lambda: fmt_joules_fine(2e-6), "2.000 µJ"),
])
def test_each_format_writes_its_exact_string(call, expected):
    assert call() == expected


def test_markdown_tables_escape_bars_and_align_on_request():
    lines = markdown_table_lines(["config", "||g_L||"], [["dfa", 1e-9], ["a|b", "-"]])
    assert lines == ["| config | \\|\\|g_L\\|\\| |", "|---|---|", "| dfa | 1e-09 |", "| a\\|b | - |"]
    assert markdown_table_lines(["W", "x"], [], right_aligned=True) == ["| W | x |", "|---:|---:|"]


def test_text_pieces_escape_what_they_are_given():
    hostile = "<script>&\""
    for piece in (note(hostile), section(hostile), text_table(["h"], [[hostile]]), text_kv_table([("k", hostile)])):
        assert "<script>" not in piece and "&lt;script&gt;&amp;&quot;" in piece


def test_only_report_writes_html():
    """One HTML home: a page tag in any other module of edgefa is a second writer."""
    tag = re.compile(r"<(h[1-6]|p|table|tr|td|th|div|svg|figure|span|html|body)[\s>]")
    writers = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                     if path.parent.name != "report" and tag.search(path.read_text(encoding="utf-8")))
    assert writers == []
