"""The page shell and its pieces: escaping, the one stylesheet, headings, notes, tables, figures,
and writing a page (or a chart as a file of its own) atomically. Standard library only.

Every report module builds its body from these pieces, so no other module writes HTML tags. The
page holds no scripts and references nothing outside itself, so it opens offline.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any, Sequence

from edgefa.bundle import write_atomically
from edgefa.errors import EdgefaError


def esc(value: Any) -> str:
    """HTML-escape anything (quotes included, so the result is safe in attributes too)."""
    return escape(str(value), quote=True)


def est_badge(method: Any) -> str:
    """A visible "estimated" tag for HTML, empty for measured values."""
    return ' <span class="badge">estimated</span>' if method == "estimated" else ""


CSS = """
:root { color-scheme: light; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       background: #fafafa; margin: 0; }
main { max-width: 860px; margin: 0 auto; padding: 24px 20px 60px; background: #fff; }
h1 { font-size: 1.5em; margin: 0 0 4px; }
h2 { font-size: 1.15em; margin: 36px 0 8px; border-bottom: 1px solid #e3e3e3; padding-bottom: 4px; }
.sub { color: #666; margin: 0 0 20px; }
table { border-collapse: collapse; width: 100%; margin: 8px 0 4px; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 5px 6px; border-bottom: 1px solid #eee; vertical-align: top; }
th { font-weight: 600; color: #444; }
td.num, th.num { text-align: right; }
td.num { white-space: nowrap; }
td .wrap { white-space: normal; }
.table { overflow-x: auto; }
.table table { font-size: 0.92em; }   /* the nine-column phase table fits the column */
table.kv th { width: 34%; font-weight: 500; color: #555; }
figure { margin: 22px 0; }
figcaption { font-weight: 600; margin-bottom: 6px; }
svg.plot { width: 100%; height: auto; display: block; }
svg.plot text { font: 12px system-ui, sans-serif; fill: #333; }
svg.plot .tick-label { fill: #666; font-size: 11px; }
svg.plot .axis-label { fill: #444; font-size: 12px; }
svg.plot .value-label { fill: #333; font-size: 11px; }
svg.plot .ref-label { font-size: 11px; font-weight: 600; }
svg.plot .axis { stroke: #888; stroke-width: 1; }
svg.plot .tick { stroke: #888; }
svg.plot .grid { stroke: #eee; }
svg.plot .bar { fill-opacity: 0.9; }
svg.plot rect.bar:not([fill]) { fill: #3b6ea8; }
svg.plot .bar.estimated { fill-opacity: 0.4; stroke: #555; stroke-dasharray: 4 3; }
svg.plot .line { fill: none; stroke-width: 1.8; stroke-linejoin: round; }
svg.plot .ref { stroke-width: 1.5; stroke-dasharray: 5 4; }
svg.plot .ref.dashed { stroke: #b5534b; }
svg.plot .ref-label:not([fill]) { fill: #b5534b; }
.note { color: #666; font-size: 0.92em; margin: 4px 0; }
.empty { color: #777; font-style: italic; background: #f5f5f5; padding: 10px 12px; border-radius: 4px; }
.badge { display: inline-block; font-size: 0.78em; font-weight: 600; color: #8a4b0f; background: #fbe7d3;
         border-radius: 3px; padding: 0 5px; margin-left: 4px; }
.legend { display: flex; flex-wrap: wrap; gap: 14px; font-size: 0.92em; margin: 6px 0; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; margin-right: 5px;
          vertical-align: -1px; }
.panels { display: grid; grid-template-columns: repeat(auto-fit, minmax(240px, 1fr)); gap: 12px; }
details { margin-top: 10px; }
"""


def page(title: str, body: Sequence[str]) -> str:
    """The page shell: a single centred column, inline CSS, nothing external."""
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            + "\n".join(body) + "\n</main>\n</body>\n</html>\n")


def heading(title: str) -> str:
    """The page's title line."""
    return f"<h1>{esc(title)}</h1>"


def subtitle(text: str) -> str:
    """The grey line under the title: what was run, where, when."""
    return f'<p class="sub">{esc(text)}</p>'


def section(title: str) -> str:
    """A section heading."""
    return f"<h2>{esc(title)}</h2>"


def note(text: str) -> str:
    """A small grey paragraph: a caption, a definition, a reduction named."""
    return f'<p class="note">{esc(text)}</p>'


def empty_note(text: str) -> str:
    """What stands where a table or a plot would be, when there is nothing to show."""
    return f'<p class="empty">{esc(text)}</p>'


def kv_table(rows: Sequence[tuple[str, str]]) -> str:
    """A two-column table. Keys are escaped here; values are HTML the caller already escaped."""
    body = "".join(f"<tr><th>{esc(key)}</th><td>{value}</td></tr>" for key, value in rows)
    return f'<table class="kv">{body}</table>'


def text_kv_table(rows: Sequence[tuple[str, Any]]) -> str:
    """kv_table for plain text values: every value is escaped here."""
    return kv_table([(key, esc(value)) for key, value in rows])


def grid_table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1) -> str:
    """A table with a header row. Headers are escaped here; cells are already-escaped HTML."""
    def cls(i: int) -> str:
        return ' class="num"' if i >= numeric_from else ""
    head = "".join(f"<th{cls(i)}>{esc(h)}</th>" for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{cell}</td>" for i, cell in enumerate(row)) + "</tr>"
                   for row in rows)
    return f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int = 1) -> str:
    """grid_table for plain text cells: every cell is escaped here."""
    return grid_table(headers, [[esc(cell) for cell in row] for row in rows], numeric_from)


def figure(title: str, content: str | None, empty: str = "no samples", caption: str = "") -> str:
    """A titled figure holding a plot, or a short note in its place when there is nothing to draw."""
    inner = content if content else empty_note(empty)
    below = note(caption) if caption and content else ""
    return f"<figure><figcaption>{esc(title)}</figcaption>{inner}{below}</figure>"


def html_legend(names: Sequence[str], colors: Sequence[str]) -> str:
    """A legend that wraps with the page (charts with many series; the SVG legend holds about four)."""
    return '<div class="legend">' + "".join(
        f'<span><span class="swatch" style="background:{esc(c)}"></span>{esc(n)}</span>'
        for n, c in zip(names, colors)) + "</div>"


def wrap(value: Any) -> str:
    """Escaped text that may wrap inside a numeric (no-wrap) cell."""
    return f'<span class="wrap">{esc(value)}</span>'


def machine_table(machine: Any) -> str:
    """Every machine key as a row; nested values shown as their text."""
    if not isinstance(machine, dict) or not machine:
        return empty_note("no machine information")
    return kv_table([(str(k), esc(_plain(v))) for k, v in machine.items()])


def _plain(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_plain(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value)
    return "n/a" if value is None else str(value)


def check_schema(doc: Any, schema: str) -> dict:
    """`doc` itself when it is a dict whose schema starts with `schema` ("edgefa.profile/"); else one
    clear EdgefaError."""
    if not isinstance(doc, dict) or not str(doc.get("schema", "")).startswith(schema):
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise EdgefaError(f"not an {schema}N document (schema {found!r})")
    return doc


def standalone_svg(chart: str) -> str:
    """A chart of report/svg.py as a file of its own: the namespace and the page's plot styles."""
    style = "\n".join(line for line in CSS.splitlines() if line.startswith("svg.plot"))
    return chart.replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1).replace(
        "<title>", f"<style>{style}</style><title>", 1)


def write_report(path: Path, text: str) -> None:
    """Write a page, a chart or a table (`text`) to `path` atomically (bundle.write_atomically)."""
    write_atomically(path, text.encode("utf-8"))
