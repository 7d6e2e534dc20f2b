"""Self-contained HTML reports (inline SVG, no scripts, no network) for profiles and comparisons."""

from edgefa.report.html import render_compare_report, render_profile_report, write_report

__all__ = ["render_compare_report", "render_profile_report", "write_report"]
