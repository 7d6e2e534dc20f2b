"""Render a profile (or a comparison of two) as one self-contained HTML page with inline SVG plots.

Standard library only. The page holds no scripts and references nothing outside itself, so it opens
offline. Every string that comes from the data goes through `esc` before it reaches the page.

Reading order: formatting helpers, SVG helpers (ticks, axes, the four chart kinds), page pieces
(tables, figures, the page shell), then the two reports and `write_report`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any, Sequence

from edgefa.bundle import write_atomically
from edgefa.errors import EdgefaError

MIB = 1024 * 1024
PALETTE = ["#3b6ea8", "#d9822b", "#5a9e6f", "#8e6bb0", "#b5534b"]
MARKER_COLORS = {"p50": "#2f7d4a", "p95": "#d9822b", "p99": "#b5534b"}


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------

def esc(value: Any) -> str:
    """HTML-escape anything (quotes included, so the result is safe in attributes too)."""
    return escape(str(value), quote=True)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fmt_num(value: Any) -> str:
    """A number with about three significant digits and no exponent; "n/a" for None or NaN."""
    if not _is_num(value):
        return "n/a"
    size = abs(value)
    if size == 0:
        return "0"
    if size >= 1000:
        return f"{value:,.0f}"
    if size >= 100:
        return f"{value:.1f}"
    if size >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def fmt_ms(value: Any) -> str:
    return "n/a" if not _is_num(value) else f"{fmt_num(value)} ms"


def fmt_bytes(value: Any) -> str:
    """Bytes in B, KiB, MiB or GiB."""
    if not _is_num(value):
        return "n/a"
    for unit, size in (("GiB", 1024 ** 3), ("MiB", MIB), ("KiB", 1024)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{int(value)} B"


def fmt_energy(joules: Any) -> str:
    """Joules as mJ below one joule, else J."""
    if not _is_num(joules):
        return "n/a"
    return f"{fmt_num(joules * 1000)} mJ" if abs(joules) < 1 else f"{fmt_num(joules)} J"


def fmt_ratio(value: Any) -> str:
    return "n/a" if not _is_num(value) else f"{value:.2f}\u00d7"


def est_badge(method: Any) -> str:
    """A visible "estimated" tag for HTML, empty for measured values."""
    return ' <span class="badge">estimated</span>' if method == "estimated" else ""


# --------------------------------------------------------------------------------------------
# SVG helpers: ticks, a frame with scales, axes
# --------------------------------------------------------------------------------------------

def nice_ticks(lo: float, hi: float, target: int = 5, integer: bool = False) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering [lo, hi]."""
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(lo) * 0.1 or 0.5
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / target
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if raw <= m * magnitude)
    if integer:
        step = max(1.0, round(step))
    start, end = math.floor(lo / step) * step, math.ceil(hi / step) * step
    count = round((end - start) / step)
    return [start + i * step for i in range(count + 1)]


def tick_label(value: float, ticks: Sequence[float]) -> str:
    """Format a tick with just enough decimals for the tick step."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    decimals = next((d for d in range(7) if abs(round(step, d) - step) < 1e-9 * max(1.0, step)), 6)
    return f"{value:,.{decimals}f}"


@dataclass
class Frame:
    """The canvas size, the margins around the plotting area, and the two data ranges."""

    width: int = 720
    height: int = 300
    left: int = 64
    right: int = 24
    top: int = 20
    bottom: int = 50
    x_range: tuple[float, float] = (0.0, 1.0)
    y_range: tuple[float, float] = (0.0, 1.0)

    @property
    def x0(self) -> float:
        return self.left

    @property
    def x1(self) -> float:
        return self.width - self.right

    @property
    def y0(self) -> float:          # the bottom of the plotting area (y grows downward in SVG)
        return self.height - self.bottom

    @property
    def y1(self) -> float:
        return self.top

    def sx(self, value: float) -> float:
        lo, hi = self.x_range
        return self.x0 + (value - lo) / ((hi - lo) or 1.0) * (self.x1 - self.x0)

    def sy(self, value: float) -> float:
        lo, hi = self.y_range
        return self.y0 - (value - lo) / ((hi - lo) or 1.0) * (self.y0 - self.y1)


def text(x: float, y: float, content: str, anchor: str = "start", cls: str = "label", extra: str = "") -> str:
    """An SVG text element; `content` is escaped. Lines split on newlines become tspans."""
    lines = str(content).split("\n")
    if len(lines) == 1:
        inner = esc(content)
    else:
        inner = "".join(f'<tspan x="{x:.1f}" dy="{0 if i == 0 else 1.15}em">{esc(line)}</tspan>'
                        for i, line in enumerate(lines))
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" class="{cls}"{extra}>{inner}</text>'


def x_axis(frame: Frame, ticks: Sequence[float], label: str) -> str:
    """The bottom axis line, tick marks, tick labels and the axis title."""
    parts = [f'<line class="axis" x1="{frame.x0}" y1="{frame.y0}" x2="{frame.x1}" y2="{frame.y0}"/>']
    for value in ticks:
        x = frame.sx(value)
        parts.append(f'<line class="tick" x1="{x:.1f}" y1="{frame.y0}" x2="{x:.1f}" y2="{frame.y0 + 5}"/>')
        parts.append(text(x, frame.y0 + 18, tick_label(value, ticks), "middle", "tick-label"))
    parts.append(text((frame.x0 + frame.x1) / 2, frame.height - 8, label, "middle", "axis-label"))
    return "".join(parts)


def y_axis(frame: Frame, ticks: Sequence[float], label: str) -> str:
    """The left axis with light horizontal grid lines at every tick, and the rotated axis title."""
    parts = [f'<line class="axis" x1="{frame.x0}" y1="{frame.y1}" x2="{frame.x0}" y2="{frame.y0}"/>']
    for value in ticks:
        y = frame.sy(value)
        parts.append(f'<line class="grid" x1="{frame.x0}" y1="{y:.1f}" x2="{frame.x1}" y2="{y:.1f}"/>')
        parts.append(text(frame.x0 - 6, y + 4, tick_label(value, ticks), "end", "tick-label"))
    cx, cy = 14, (frame.y0 + frame.y1) / 2
    parts.append(text(cx, cy, label, "middle", "axis-label", f' transform="rotate(-90 {cx} {cy:.1f})"'))
    return "".join(parts)


def svg(kind: str, frame: Frame, parts: Sequence[str], label: str) -> str:
    """Wrap drawn parts in an <svg class="plot" data-plot=kind> that scales to the page width."""
    return (f'<svg class="plot" data-plot="{esc(kind)}" viewBox="0 0 {frame.width} {frame.height}" '
            f'width="{frame.width}" height="{frame.height}" role="img" aria-label="{esc(label)}">'
            f'<title>{esc(label)}</title>{"".join(parts)}</svg>')


# --------------------------------------------------------------------------------------------
# Charts. Each returns an <svg> string, or None when there is nothing to draw.
# --------------------------------------------------------------------------------------------

def histogram(values: Sequence[float], kind: str, label: str, x_label: str,
              markers: dict[str, float] | None = None) -> str | None:
    """Counts of `values` in about sqrt(n) bins, with labelled vertical lines at `markers`."""
    values = [v for v in values if _is_num(v)]
    if not values:
        return None
    lo, hi = min(values), max(values)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = max(5, min(40, round(math.sqrt(len(values)))))
    width = (hi - lo) / bins
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    marks = {k: v for k, v in (markers or {}).items() if _is_num(v)}
    x_ticks = nice_ticks(min([lo, *marks.values()]), max([hi, *marks.values()]))
    y_ticks = nice_ticks(0, max(counts), integer=True)
    frame = Frame(top=18 + 14 * len(marks), x_range=(x_ticks[0], x_ticks[-1]), y_range=(0, y_ticks[-1]))
    parts = [y_axis(frame, y_ticks, "windows (count)"), x_axis(frame, x_ticks, x_label)]
    for i, count in enumerate(counts):
        if count:
            left, right = frame.sx(lo + i * width), frame.sx(lo + (i + 1) * width)
            top = frame.sy(count)
            parts.append(f'<rect class="mark bar" x="{left + 0.5:.1f}" y="{top:.1f}" '
                         f'width="{max(right - left - 1, 1):.1f}" height="{frame.y0 - top:.1f}">'
                         f'<title>{count} windows in {fmt_num(lo + i * width)} to '
                         f'{fmt_num(lo + (i + 1) * width)}</title></rect>')
    for row, (name, value) in enumerate(marks.items()):
        x, color = frame.sx(value), MARKER_COLORS.get(name, "#444")
        y = 14 + 14 * row
        parts.append(f'<line class="ref" stroke="{color}" x1="{x:.1f}" y1="{y - 4}" x2="{x:.1f}" y2="{frame.y0}"/>')
        anchor, dx = ("end", -4) if x > frame.x1 - 110 else ("start", 4)
        parts.append(text(x + dx, y, f"{name} {fmt_ms(value)}", anchor, "ref-label", f' fill="{color}"'))
    return svg(kind, frame, parts, label)


def hbars(rows: Sequence[tuple[str, float, str]], kind: str, label: str, x_label: str) -> str | None:
    """One horizontal bar per (name, value, value text) row, names on the left, text at the bar end."""
    rows = [(name, value, note) for name, value, note in rows if _is_num(value) and value >= 0]
    if not rows:
        return None
    names = [_clip(name, 26) for name, _, _ in rows]
    row_height = 30
    left = min(210, 20 + 7 * max(len(n) for n in names))
    x_ticks = nice_ticks(0, max(value for _, value, _ in rows) or 1.0)
    frame = Frame(left=left, right=150, top=10, bottom=50, height=10 + 50 + row_height * len(rows),
                  x_range=(0, x_ticks[-1]))
    parts = [x_axis(frame, x_ticks, x_label)]
    for value in x_ticks[1:]:
        x = frame.sx(value)
        parts.append(f'<line class="grid" x1="{x:.1f}" y1="{frame.y1}" x2="{x:.1f}" y2="{frame.y0}"/>')
    parts.append(f'<line class="axis" x1="{frame.x0}" y1="{frame.y1}" x2="{frame.x0}" y2="{frame.y0}"/>')
    for i, ((_, value, note), name) in enumerate(zip(rows, names)):
        y = frame.top + i * row_height + 6
        end = frame.sx(value)
        parts.append(text(frame.x0 - 8, y + 13, name, "end", "label"))
        parts.append(f'<rect class="mark bar" x="{frame.x0}" y="{y}" width="{end - frame.x0:.1f}" '
                     f'height="{row_height - 12}" fill="{PALETTE[i % len(PALETTE)]}"/>')
        parts.append(text(end + 6, y + 13, note, "start", "value-label"))
    return svg(kind, frame, parts, label)


def line_chart(xs: Sequence[float], ys: Sequence[float], kind: str, label: str, x_label: str,
               y_label: str, ref: tuple[str, float] | None = None, zero_based: bool = False,
               color: str = PALETTE[0]) -> str | None:
    """A polyline through (x, y) pairs, with an optional dashed horizontal reference line."""
    return lines_chart([("", xs, ys, color)], kind, label, x_label, y_label, ref, zero_based)


def lines_chart(lines: Sequence[tuple[str, Sequence[float], Sequence[float], str]], kind: str, label: str,
                x_label: str, y_label: str, ref: tuple[str, float] | None = None,
                zero_based: bool = False, markers: bool = False) -> str | None:
    """One polyline per (name, xs, ys, colour) on shared axes, named in a legend across the top;
    points drawn as dots with `markers`; an optional dashed horizontal reference line."""
    series = [(name, [(x, y) for x, y in zip(xs, ys) if _is_num(x) and _is_num(y)], color)
              for name, xs, ys, color in lines]
    series = [s for s in series if s[1]]
    if not series:
        return None
    ref = ref if ref and _is_num(ref[1]) else None
    points = [p for _, pts, _ in series for p in pts]
    y_values = [y for _, y in points] + ([ref[1]] if ref else []) + ([0.0] if zero_based else [])
    x_ticks = nice_ticks(min(x for x, _ in points), max(x for x, _ in points))
    y_ticks = nice_ticks(min(y_values), max(y_values))
    named = any(name for name, _, _ in series)
    frame = Frame(x_range=(x_ticks[0], x_ticks[-1]), y_range=(y_ticks[0], y_ticks[-1]), top=34 if named else 24)
    parts = [y_axis(frame, y_ticks, y_label), x_axis(frame, x_ticks, x_label)]
    if ref:
        y = frame.sy(ref[1])
        parts.append(f'<line class="ref dashed" x1="{frame.x0}" y1="{y:.1f}" x2="{frame.x1}" y2="{y:.1f}"/>')
        parts.append(text(frame.x1, y - 5, ref[0], "end", "ref-label"))
    for name, pts, color in series:
        coords = " ".join(f"{frame.sx(x):.1f},{frame.sy(y):.1f}" for x, y in pts)
        if len(pts) > 1:
            parts.append(f'<polyline class="mark line" stroke="{color}" points="{coords}"/>')
        if markers or len(pts) == 1:
            parts.extend(f'<circle class="mark point" fill="{color}" cx="{frame.sx(x):.1f}" '
                         f'cy="{frame.sy(y):.1f}" r="{3 if len(pts) > 1 else 4}"/>' for x, y in pts)
    for i, (name, _, color) in enumerate(s for s in series if s[0]):      # the legend, across the top
        x = frame.x0 + 10 + i * 150
        parts.append(f'<line class="mark line" stroke="{color}" x1="{x}" y1="12" x2="{x + 18}" y2="12"/>')
        parts.append(text(x + 24, 16, name, "start", "value-label"))
    return svg(kind, frame, parts, label)


@dataclass
class Series:
    """One colour of bars in a bar chart: a value (or None) and a label per category."""

    name: str
    values: list[float | None]
    labels: list[str]
    estimated: list[bool] = field(default_factory=list)
    color: str = PALETTE[0]


def bar_chart(categories: Sequence[str], series: Sequence[Series], kind: str, label: str,
              y_label: str, x_label: str = "", width: int = 720, height: int = 300) -> str | None:
    """Vertical bars grouped by category, one bar per series; estimated bars are drawn hatched-light."""
    values = [v for s in series for v in s.values if _is_num(v)]
    if not categories or not values:
        return None
    y_ticks = nice_ticks(0, max(values) or 1.0)
    frame = Frame(width=width, height=height, top=40, bottom=56 if x_label else 40,
                  y_range=(0, y_ticks[-1]))
    parts = [y_axis(frame, y_ticks, y_label)]
    parts.append(f'<line class="axis" x1="{frame.x0}" y1="{frame.y0}" x2="{frame.x1}" y2="{frame.y0}"/>')
    group = (frame.x1 - frame.x0) / len(categories)
    bar = min(90.0, group * 0.75 / len(series))
    for c, category in enumerate(categories):
        start = frame.x0 + c * group + (group - bar * len(series)) / 2
        parts.append(text(frame.x0 + (c + 0.5) * group, frame.y0 + 18, _clip(category, 24), "middle", "label"))
        for s_index, s in enumerate(series):
            x, value = start + s_index * bar, s.values[c]
            if not _is_num(value):
                parts.append(text(x + bar / 2, frame.y0 - 6, "n/a", "middle", "value-label"))
                continue
            # a positive value a hundred times below the largest would round to nothing: one pixel at
            # least, so the bar is there to see (its label gives the value)
            top = min(frame.sy(value), frame.y0 - 1.0) if value > 0 else frame.sy(value)
            estimated = bool(s.estimated and s.estimated[c])
            parts.append(f'<rect class="mark bar{" estimated" if estimated else ""}" x="{x + 1:.1f}" '
                         f'y="{top:.1f}" width="{bar - 2:.1f}" height="{frame.y0 - top:.1f}" '
                         f'fill="{s.color}"><title>{esc(s.name)}: {esc(s.labels[c])}</title></rect>')
            lines = s.labels[c].count("\n")
            parts.append(text(x + bar / 2, top - 6 - 12 * lines, s.labels[c], "middle", "value-label"))
    if x_label:
        parts.append(text((frame.x0 + frame.x1) / 2, frame.height - 8, x_label, "middle", "axis-label"))
    return svg(kind, frame, parts, label)


def _clip(name: str, limit: int) -> str:
    name = str(name)
    return name if len(name) <= limit else name[: limit - 1] + "\u2026"


# --------------------------------------------------------------------------------------------
# Page pieces
# --------------------------------------------------------------------------------------------

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


def kv_table(rows: Sequence[tuple[str, str]]) -> str:
    """A two-column table. Keys are escaped here; values are HTML the caller already escaped."""
    body = "".join(f"<tr><th>{esc(key)}</th><td>{value}</td></tr>" for key, value in rows)
    return f'<table class="kv">{body}</table>'


def grid_table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1) -> str:
    """A table with a header row. Headers are escaped here; cells are already-escaped HTML."""
    def cls(i: int) -> str:
        return ' class="num"' if i >= numeric_from else ""
    head = "".join(f"<th{cls(i)}>{esc(h)}</th>" for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{cell}</td>" for i, cell in enumerate(row)) + "</tr>"
                   for row in rows)
    return f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def figure(title: str, content: str | None, empty: str = "no samples", caption: str = "") -> str:
    """A titled figure holding a plot, or a short note in its place when there is nothing to draw."""
    inner = content if content else f'<p class="empty">{esc(empty)}</p>'
    note = f'<p class="note">{esc(caption)}</p>' if caption and content else ""
    return f"<figure><figcaption>{esc(title)}</figcaption>{inner}{note}</figure>"


def wrap(value: Any) -> str:
    """Escaped text that may wrap inside a numeric (no-wrap) cell."""
    return f'<span class="wrap">{esc(value)}</span>'


def machine_table(machine: Any) -> str:
    """Every machine key as a row; nested values shown as their text."""
    if not isinstance(machine, dict) or not machine:
        return '<p class="empty">no machine information</p>'
    return kv_table([(str(k), esc(_plain(v))) for k, v in machine.items()])


def _plain(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_plain(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value)
    return "n/a" if value is None else str(value)


# --------------------------------------------------------------------------------------------
# Reading a profile
# --------------------------------------------------------------------------------------------

def _check(doc: Any, schema: str) -> dict:
    if not isinstance(doc, dict) or not str(doc.get("schema", "")).startswith(schema):
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise EdgefaError(f"not an {schema}N document (schema {found!r})")
    return doc


def _phases(profile: dict) -> dict[str, dict]:
    phases = profile.get("phases") or {}
    return {str(k): v for k, v in phases.items() if isinstance(v, dict)}


def main_phase(profile: dict) -> tuple[str, dict] | None:
    """train_step when recorded, else the phase with the most samples."""
    phases = _phases(profile)
    if not phases:
        return None
    if "train_step" in phases:
        return "train_step", phases["train_step"]
    name = max(phases, key=lambda n: (len(phases[n].get("samples_ms") or []), phases[n].get("count") or 0))
    return name, phases[name]


def _latency(phase: dict | None, key: str) -> float | None:
    value = ((phase or {}).get("latency_ms") or {}).get(key)
    return value if _is_num(value) else None


def phase_total_s(phase: dict) -> float | None:
    """total_s when recorded, else p50 times count."""
    total = phase.get("total_s")
    if _is_num(total):
        return total
    p50, count = _latency(phase, "p50"), phase.get("count")
    return p50 * count / 1000 if p50 is not None and _is_num(count) else None


def _energy(profile: dict) -> dict:
    return profile.get("energy") or {"method": "none", "notes": []}


def _energy_cell(joules: Any, method: Any) -> str:
    """Energy value for a table, tagged when estimated, "n/a" when not recorded."""
    if method == "none" or not _is_num(joules):
        return "n/a"
    return esc(fmt_energy(joules)) + est_badge(method)


def _no_energy_line(energy: dict) -> str:
    notes = [str(n) for n in energy.get("notes") or []]
    why = "; ".join(notes) or str(energy.get("backend") or "no energy backend available")
    return f"no energy figure: {why}"


# --------------------------------------------------------------------------------------------
# The profile report
# --------------------------------------------------------------------------------------------

def profile_summary(profile: dict) -> str:
    """The table at the top: where, what ran, headline latency, memory, energy, link."""
    config = profile.get("config") or {}
    device = profile.get("device_profile") or {}
    memory = profile.get("memory") or {}
    energy = _energy(profile)
    main = main_phase(profile)
    rows = [("where", esc(profile.get("where", "n/a"))), ("created", esc(profile.get("created", "n/a")))]
    if device:
        detected = "detected" if device.get("detected") else "not detected (chosen)"
        rows.append(("device profile", f"{esc(device.get('display_name') or device.get('name'))} "
                                       f"({esc(device.get('name'))}, {detected})"))
    if config:
        rows.append(("run", esc(" \u00b7 ".join(f"{k.replace('_', ' ')} {v}" for k, v in config.items()))))
    if main:
        name, phase = main
        rows.append((f"{name} latency (p50 / p95 / p99)",
                     " / ".join(esc(fmt_ms(_latency(phase, k))) for k in ("p50", "p95", "p99"))))
        rows.append((f"{name} windows", f"{esc(phase.get('count', 'n/a'))} recorded, "
                                        f"{esc(phase.get('warmup', 0))} dropped as warm-up"))
    rows.append(("peak RSS", esc(fmt_bytes(memory.get("peak_rss_bytes")))))
    if _is_num(memory.get("runtime_growth_bytes")):
        rows.append(("runtime growth (engine build)", esc(fmt_bytes(memory["runtime_growth_bytes"]))))
    gpu = memory.get("gpu")
    if isinstance(gpu, dict):
        rows.append(("GPU memory", f"{esc(fmt_bytes(gpu.get('used_bytes')))} used, peak "
                                   f"{esc(fmt_bytes(gpu.get('peak_bytes')))} ({esc(gpu.get('source', '?'))})"))
    method = energy.get("method", "none")
    rows.append(("energy per step", _energy_cell(energy.get("per_step_j"), method)))
    if method != "none":
        power = energy.get("average_power_w")
        rows.append(("average power", (esc(f"{fmt_num(power)} W") + est_badge(method)) if _is_num(power) else "n/a"))
    rows.append(("energy method", esc(method) + (f" \u00b7 {esc(energy.get('backend'))}" if energy.get("backend") else "")))
    if energy.get("what"):
        rows.append(("energy covers", esc(energy["what"])))
    link = profile.get("link")
    if isinstance(link, dict):
        rtt = link.get("round_trip_ms") or {}
        rows.append(("link round trip (p50 / p95 / p99)", " / ".join(esc(fmt_ms(rtt.get(k))) for k in ("p50", "p95", "p99"))))
        rows.append(("link overhead p50", esc(fmt_ms(link.get("overhead_ms_p50")))))
        rows.append(("link bytes (sent / received)",
                     f"{esc(fmt_bytes(link.get('bytes_sent')))} / {esc(fmt_bytes(link.get('bytes_received')))}"))
    return kv_table(rows)


def phase_table(profile: dict) -> str:
    """One row per phase: counts, latency percentiles, total time, energy per window."""
    headers = ["phase", "windows", "warm-up", "p50", "p95", "p99", "mean", "total", "energy / window"]
    rows = []
    for name, phase in _phases(profile).items():
        e = phase.get("energy_j") or {}
        rows.append([esc(name), esc(phase.get("count", "n/a")), esc(phase.get("warmup", 0)),
                     *(esc(fmt_ms(_latency(phase, k))) for k in ("p50", "p95", "p99", "mean")),
                     esc(f"{fmt_num(phase_total_s(phase))} s"), _energy_cell(_median_energy(e), e.get("method"))])
    return grid_table(headers, rows) if rows else '<p class="empty">no phases recorded</p>'


def latency_figure(profile: dict) -> str:
    """Histogram of the main phase's windows with p50/p95/p99 marked."""
    main = main_phase(profile)
    if not main:
        return figure("Latency distribution", None, "no samples: no phases recorded")
    name, phase = main
    markers = {k: _latency(phase, k) for k in ("p50", "p95", "p99")}
    plot = histogram(phase.get("samples_ms") or [], "latency", f"{name} latency histogram",
                     f"{name} window latency (ms)", markers)
    shown = len(phase.get("samples_ms") or [])
    count = phase.get("count", shown)
    # the histogram holds the last windows only (a long-lived profiler keeps a bounded tail)
    windows = f"the last {shown} of {count}" if shown < count else f"{count}"
    caption = (f"{windows} windows after {phase.get('warmup', 0)} warm-up windows; "
               f"dashed lines: p50, p95, p99 ({(phase.get('latency_ms') or {}).get('aggregation', 'percentiles')})")
    return figure(f"Latency of {name} (ms per window)", plot, f"no samples for {name}", caption)


def phases_figure(profile: dict) -> str:
    """A horizontal bar of total time per phase, labelled with seconds and share."""
    totals = [(name, phase_total_s(phase)) for name, phase in _phases(profile).items()]
    totals = [(name, t) for name, t in totals if t is not None]
    whole = sum(t for _, t in totals)
    rows = [(name, t, f"{fmt_num(t)} s \u00b7 {100 * t / whole:.1f} %" if whole else f"{fmt_num(t)} s")
            for name, t in totals]
    plot = hbars(rows, "phases", "time per phase", "total time after warm-up (s)")
    return figure("Time per phase (s, share of the summed phase time)", plot, "no samples",
                  "share = phase total / sum of all listed phases (phases that nest inside others count twice)")


def memory_figure(profile: dict) -> str:
    """RSS over time in MiB with the process peak as a dashed line."""
    memory = profile.get("memory") or {}
    timeline = memory.get("timeline") or {}
    peak = memory.get("peak_rss_bytes")
    ref = (f"peak {fmt_bytes(peak)}", peak / MIB) if _is_num(peak) else None
    rss = [b / MIB if _is_num(b) else None for b in timeline.get("rss_bytes") or []]
    plot = line_chart(timeline.get("t_s") or [], rss, "memory", "resident memory over time",
                      "time since start (s)", "RSS (MiB)", ref=ref)
    return figure("Resident memory over time (RSS, MiB)", plot, "no samples: no memory timeline recorded",
                  "dashed line: peak RSS of the process")


def _median_energy(e: dict):
    """A phase's median energy per window (older profiles carry only the mean)."""
    return e.get("per_window_p50", e.get("per_window"))


def energy_figures(profile: dict) -> list[str]:
    """Energy per window by phase and power over time; one line in their place when there is no energy."""
    energy = _energy(profile)
    method = energy.get("method", "none")
    if method == "none":
        return [f'<p class="empty">{esc(_no_energy_line(energy))}</p>']
    names, values, labels, flags = [], [], [], []
    for name, phase in _phases(profile).items():
        e = phase.get("energy_j") or {}
        joules = _median_energy(e)
        if _is_num(joules) and e.get("method", method) != "none":
            estimated = e.get("method", method) == "estimated"
            names.append(name)
            values.append(joules * 1000)
            labels.append(f"{fmt_num(joules * 1000)} mJ" + ("\nestimated" if estimated else ""))
            flags.append(estimated)
    tag = " (estimated)" if method == "estimated" or any(flags) else ""
    source = energy.get("backend") or ""
    bars = bar_chart(names, [Series("energy per window (median)", values, labels, flags)], "energy",
                     f"energy per window by phase{tag}", f"median energy per window (mJ{', estimated' if tag else ''})",
                     x_label="phase")
    power = (energy.get("timeline") or {})
    avg = energy.get("average_power_w")
    line = line_chart(power.get("t_s") or [], power.get("power_w") or [], "power", f"power over time{tag}",
                      "time since start (s)", f"power (W{', estimated' if tag else ''})",
                      ref=(f"average {fmt_num(avg)} W", avg) if _is_num(avg) else None, zero_based=True,
                      color=PALETTE[1])
    notes = "; ".join(str(n) for n in energy.get("notes") or [])
    caption = f"method: {method}; source: {source}" + (f"; covers {energy['what']}" if energy.get("what") else "") \
        + (f"; unavailable: {notes}" if notes else "")
    return [figure(f"Median energy per window by phase (mJ){tag}", bars, "no samples: no per-phase energy", caption),
            figure(f"Power over time (W){tag}", line,
                   "no samples: estimates have no power timeline" if method == "estimated"
                   else "no samples: no power timeline recorded")]


def render_profile_report(profile: dict) -> str:
    """A complete HTML document for one profile dict (schema edgefa.profile/1)."""
    profile = _check(profile, "edgefa.profile/")
    title = str(profile.get("title") or "edgefa profile")
    body = [f"<h1>{esc(title)}</h1>",
            f'<p class="sub">{esc(profile.get("where", ""))} \u00b7 {esc(profile.get("created", ""))}</p>',
            "<h2>Summary</h2>", profile_summary(profile),
            "<h2>Latency</h2>", latency_figure(profile),
            "<h2>Phases</h2>", phases_figure(profile), phase_table(profile),
            "<h2>Memory</h2>", memory_figure(profile),
            "<h2>Energy</h2>", *energy_figures(profile),
            "<h2>Machine</h2>", machine_table(profile.get("machine"))]
    return page(title, body)


# --------------------------------------------------------------------------------------------
# The compare report
# --------------------------------------------------------------------------------------------

def _runs(compare: dict) -> dict[str, dict]:
    runs = compare.get("runs") or {}
    return {str(k): v for k, v in runs.items() if isinstance(v, dict)}


def compare_table(compare: dict) -> str:
    """Both runs side by side, one row per metric, with the recorded ratio where there is one."""
    runs = _runs(compare)
    ratios = compare.get("ratios") or {}
    methods = [_energy(r).get("method", "none") for r in runs.values()]
    any_estimated = "estimated" in methods

    def main_lat(run: dict, key: str) -> str:
        main = main_phase(run)
        return esc(fmt_ms(_latency(main[1], key))) if main else "n/a"

    def row(label: str, cells: list[str], ratio_key: str | None = None, tag: bool = False) -> list[str]:
        ratio = esc(fmt_ratio(ratios.get(ratio_key))) if ratio_key else ""
        return [esc(label), *cells, ratio + (est_badge("estimated") if tag and ratio_key and ratio != "n/a" else "")]

    memory = [r.get("memory") or {} for r in runs.values()]
    energy = [_energy(r) for r in runs.values()]
    rows = [
        row("where", [wrap(r.get("where", "n/a")) for r in runs.values()]),
        row("step time p50", [main_lat(r, "p50") for r in runs.values()], "step_time_p50"),
        row("step time p95", [main_lat(r, "p95") for r in runs.values()]),
        row("step time p99", [main_lat(r, "p99") for r in runs.values()]),
        row("peak RSS", [esc(fmt_bytes(m.get("peak_rss_bytes"))) for m in memory], "peak_rss"),
        row("runtime growth", [esc(fmt_bytes(m.get("runtime_growth_bytes"))) for m in memory]),
        row("energy per step", [_energy_cell(e.get("per_step_j"), e.get("method")) for e in energy],
            "energy_per_step", tag=any_estimated),
        row("energy method", [wrap(" \u00b7 ".join(str(p) for p in (e.get("method", "none"), e.get("backend")) if p))
                              for e in energy]),
    ]
    return grid_table(["metric", *runs, "ratio"], rows)


def compare_figures(compare: dict) -> list[str]:
    """A legend, three small grouped-bar panels (step time, peak RSS, energy) and p50 per phase."""
    runs = _runs(compare)
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(runs)}
    legend = '<div class="legend">' + "".join(
        f'<span><span class="swatch" style="background:{colors[n]}"></span>{esc(n)}</span>' for n in runs) + "</div>"

    def panel(kind: str, category: str, unit: str, values: dict[str, float | None],
              labels: dict[str, str], estimated: dict[str, bool]) -> str | None:
        series = [Series(n, [values[n]], [labels[n]], [estimated.get(n, False)], colors[n]) for n in runs]
        return bar_chart([""], series, kind, category, unit, x_label=category, width=260, height=260)

    step = {n: _latency(main_phase(r)[1], "p50") if main_phase(r) else None for n, r in runs.items()}
    rss = {n: ((r.get("memory") or {}).get("peak_rss_bytes")) for n, r in runs.items()}
    rss = {n: v / MIB if _is_num(v) else None for n, v in rss.items()}
    methods = {n: _energy(r).get("method", "none") for n, r in runs.items()}
    joules = {n: _energy(r).get("per_step_j") if methods[n] != "none" else None for n, r in runs.items()}
    est = {n: m == "estimated" for n, m in methods.items()}
    tag = " (estimated)" if any(est.values()) else ""
    mj = {n: j * 1000 if _is_num(j) else None for n, j in joules.items()}
    panels = [
        panel("compare-step-time", "step time p50", "ms", step, {n: fmt_ms(v) for n, v in step.items()}, {}),
        panel("compare-peak-rss", "peak RSS", "MiB", rss, {n: f"{fmt_num(v)} MiB" for n, v in rss.items()}, {}),
        panel("compare-energy", f"energy per step{tag}", f"mJ{tag}", mj,
              {n: f"{fmt_num(v)} mJ" + ("\nestimated" if est[n] else "") for n, v in mj.items()}, est),
    ]
    empty = {"compare-energy": "no energy figure: neither run measured or estimated energy"}
    kinds = ["compare-step-time", "compare-peak-rss", "compare-energy"]
    cells = "".join(p or f'<p class="empty">{esc(empty.get(k, "no samples"))}</p>' for p, k in zip(panels, kinds))
    figures = [legend, f"<figure><figcaption>Cost per step: step time p50, peak RSS, energy per step{esc(tag)}"
               f"</figcaption><div class=\"panels\">{cells}</div>"
               f'<p class="note">{esc(compare.get("ratio_definition", ""))}</p></figure>']
    phase_lists = [list(_phases(r)) for r in runs.values()]
    common = [p for p in (phase_lists[0] if phase_lists else []) if all(p in other for other in phase_lists[1:])]
    series = []
    for name, run in runs.items():
        values = [_latency(_phases(run)[p], "p50") for p in common]
        series.append(Series(name, values, [fmt_num(v) for v in values], [], colors[name]))
    figures.append(figure("Latency p50 per phase (ms)",
                          bar_chart(common, series, "compare-phases", "latency p50 per phase", "p50 latency (ms)",
                                    x_label="phase"),
                          "no samples: the runs share no phase"))
    return figures


def render_compare_report(compare: dict) -> str:
    """A complete HTML document comparing the runs of a compare dict (schema edgefa.compare/1)."""
    compare = _check(compare, "edgefa.compare/")
    title = str(compare.get("title") or "edgefa profile compare")
    model = compare.get("model") or {}
    layers = " \u2192 ".join(str(n) for n in model.get("layers") or [])
    model_line = " \u00b7 ".join(part for part in (
        f"layers {layers}" if layers else "", f"batch {model['batch_size']}" if "batch_size" in model else "",
        f"{model['steps']} steps" if "steps" in model else "") if part)
    body = [f"<h1>{esc(title)}</h1>",
            f'<p class="sub">{esc(model_line)} \u00b7 {esc(compare.get("created", ""))}</p>',
            "<h2>Side by side</h2>", compare_table(compare),
            f'<p class="note">ratio: {esc(compare.get("ratio_definition", "first run / second run"))}</p>',
            "<h2>Figures</h2>", *compare_figures(compare),
            "<h2>Machine</h2>", machine_table(compare.get("machine"))]
    return page(title, body)


def sweep_chart(sweep: dict) -> str | None:
    """Accuracy (%) against word length W, one line per rounding mode, float32 as a dashed line."""
    rows = sweep.get("rows") or []
    modes = list(dict.fromkeys(r["rounding"] for r in rows))
    lines = []
    for i, mode in enumerate(modes):
        mine = sorted((r["width"], r["accuracy"]) for r in rows if r["rounding"] == mode)
        lines.append((mode, [w for w, _ in mine], [100 * a if _is_num(a) else None for _, a in mine],
                      PALETTE[i % len(PALETTE)]))
    ref = sweep.get("float32_accuracy_after")
    return lines_chart(lines, "sweep", "accuracy against word length per rounding mode",
                       f"word length W of {', '.join(sweep.get('swept_classes', []))} "
                       f"(ap_fixed<W,{sweep.get('int_bits')}>)", "accuracy after fine-tuning (%)",
                       ref=("float32 runtime", 100 * ref) if _is_num(ref) else None, markers=True)


def standalone_svg(chart: str) -> str:
    """An <svg> from the charts above as a file of its own: the namespace and the page's styles."""
    style = "\n".join(line for line in CSS.splitlines() if line.startswith("svg.plot"))
    return chart.replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1).replace(
        "<title>", f"<style>{style}</style><title>", 1)


def render_sweep_report(sweep: dict) -> str:
    """A complete HTML document for an `edgefa fpga sweep` result (schema edgefa.fpga-sweep/1)."""
    sweep = _check(sweep, "edgefa.fpga-sweep/")
    rows = sweep["rows"]
    modes = list(dict.fromkeys(r["rounding"] for r in rows))
    cell = {(r["rounding"], r["width"]): r for r in rows}
    table_rows = []
    for w in sweep["widths"]:
        cells = [esc(w)]
        for m in modes:
            r = cell.get((m, w))
            cells.append("-" if r is None else
                         f"{100 * r['accuracy']:.1f}% <span class=\"note\">({100 * r['zeroed_fraction']:.1f}% zeroed)</span>")
        table_rows.append(cells)
    before, after = sweep.get("float32_accuracy_before"), sweep.get("float32_accuracy_after")
    title = "edgefa fpga sweep"
    body = [f"<h1>{esc(title)}</h1>",
            f'<p class="sub">{esc(sweep.get("bundle", ""))} \u00b7 {esc(sweep.get("steps"))} steps of batch '
            f'{esc(sweep.get("batch_size"))} \u00b7 swept: {esc(", ".join(sweep.get("swept_classes", [])))}</p>',
            figure("Accuracy against word length", sweep_chart(sweep), caption=(
                "Round-to-nearest loses every update smaller than half an LSB; stochastic rounding keeps "
                "it in expectation (Gupta et al., ICML 2015).")),
            "<h2>Accuracy after fine-tuning (share of weight updates rounded to zero)</h2>",
            grid_table(["W", *modes], table_rows),
            f'<p class="note">float32 runtime: {esc(fmt_num(100 * before) if _is_num(before) else "-")}% before, '
            f'{esc(fmt_num(100 * after) if _is_num(after) else "-")}% after the same steps.</p>',
            "<h2>Other formats</h2>",
            kv_table([(k, esc(v)) for k, v in (sweep.get("base_config") or {}).get("formats", {}).items()])]
    return page(title, body)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def write_report(path: Path, html: str) -> None:
    """Write `html` to `path` atomically (bundle.write_atomically)."""
    write_atomically(path, html.encode("utf-8"))


# --------------------------------------------------------------------------------------------
# The training report (`edgefa report RUN/`): accuracy and alignment with BP over epochs
# --------------------------------------------------------------------------------------------

def series_colors(n: int) -> list[str]:
    """The palette for up to five series; beyond that, n hues spread around the colour wheel."""
    if n <= len(PALETTE):
        return PALETTE[:n]
    return [f"hsl({round(360 * i / n)}, 60%, 42%)" for i in range(n)]


def html_legend(names: Sequence[str], colors: Sequence[str]) -> str:
    """A legend that wraps with the page (charts with many series; the SVG legend holds about four)."""
    return '<div class="legend">' + "".join(
        f'<span><span class="swatch" style="background:{esc(c)}"></span>{esc(n)}</span>'
        for n, c in zip(names, colors)) + "</div>"


def _alignment(row: dict) -> dict | None:
    found = row.get("alignment") if isinstance(row, dict) else None
    return found if isinstance(found, dict) and isinstance(found.get("layers"), dict) else None


def _cosine_cell(value: Any) -> str:
    if value is None:
        return '<span class="note">degenerate</span>'
    return esc(f"{value:+.4f}") if _is_num(value) else "n/a"


FEEDBACK_KEYS = ("alignment_error", "weight_feedback_cosine")


def alignment_series(rows: Sequence[dict], part: str, key: str) -> tuple[list[float], dict[str, list]]:
    """Epochs and, per layer (part "layers") or stage ("stages"), the value of `key` at each epoch
    (None where the epoch has no value: degenerate, or not logged)."""
    epochs, named = [], {}
    logged = [(row.get("epoch"), _alignment(row)) for row in rows]
    logged = [(e, a) for e, a in logged if a is not None and _is_num(e)]
    for i, (epoch, found) in enumerate(logged):
        epochs.append(epoch)
        for name, entry in (found.get(part) or {}).items():
            if isinstance(entry, dict) and key in entry:
                label = f"{name} (B unused)" if key in FEEDBACK_KEYS and entry.get("feedback_used") is False \
                    else str(name)
                named.setdefault(label, [None] * len(logged))[i] = entry[key]
    return epochs, named


def alignment_chart(rows: Sequence[dict], part: str, key: str, kind: str, label: str, y_label: str,
                    ref: tuple[str, float] | None = None) -> str | None:
    """One line per layer or stage over epochs, with a wrapping HTML legend above the SVG."""
    epochs, named = alignment_series(rows, part, key)
    named = {n: v for n, v in named.items() if any(_is_num(x) for x in v)}
    if not named:
        return None
    colors = series_colors(len(named))
    chart = lines_chart([("", epochs, values, c) for values, c in zip(named.values(), colors)], kind, label,
                        "epoch", y_label, ref=ref, markers=len(epochs) <= 12)
    return html_legend(list(named), colors) + chart if chart else None


def alignment_tables(found: dict) -> list[str]:
    """The last epoch's per-layer and per-stage tables."""
    rows = []
    for name, e in (found.get("layers") or {}).items():
        if not isinstance(e, dict):
            continue
        unused = ' <span class="note">(B unused)</span>' if e.get("feedback_used") is False else ""
        rows.append([esc(name) + unused, esc(e.get("kind", "")), _cosine_cell(e.get("weight_grad_cosine")),
                     esc(fmt_num(e["alignment_error"])) if "alignment_error" in e else "",
                     _cosine_cell(e.get("weight_feedback_cosine")) if "alignment_error" in e else ""])
    out = [grid_table(["layer", "kind", "cos(\u2207W rule, \u2207W bp)", "\u2016W \u2212 B\u2016_F", "cos(W, B)"],
                      rows, numeric_from=2) if rows else '<p class="empty">no layers</p>']
    stage_rows = []
    for name, s in (found.get("stages") or {}).items():
        if not isinstance(s, dict):
            continue
        stage_rows.append([esc(name), _cosine_cell(s.get("signal_cosine")), esc(s.get("excluded_samples", "n/a")),
                           esc(fmt_num(s.get("h_norm_mean"))), esc(fmt_num(s.get("grad_norm_mean")))])
    if stage_rows:
        out.append(grid_table(["stage", "signal cosine", "samples excluded", "mean \u2016h\u2016",
                               "mean \u2016dloss_n/dh\u2016 (bp)"], stage_rows))
    return out


def diagnosis_section(diagnosis: dict | None) -> list[str]:
    """The verdict of `edgefa diagnose` (RUN/diagnosis.json) and what it rests on, or a pointer to it."""
    if not diagnosis:
        return ["<h2>Diagnosis</h2>", '<p class="empty">not diagnosed: run <code>edgefa diagnose RUN/</code> '
                "before trusting this result</p>"]
    rows = []
    for d in (diagnosis.get("diagnostics") or {}).values():
        rows.append([esc(d.get("label")), esc(fmt_num(d.get("value"))), esc(f"{d.get('fires_when')} "
                     f"{fmt_num(d.get('threshold'))}"), esc(d.get("status")), esc(d.get("detail"))])
    stages = []
    for name, st in (diagnosis.get("stages") or {}).items():
        null = st.get("null") or {}
        stages.append([esc(name), esc("degenerate" if st.get("degenerate") else fmt_num(st.get("gamma"))),
                       esc(fmt_num(null.get("mean"))), esc(fmt_num(st.get("rho_rule"))),
                       esc(fmt_num(st.get("rho_bp"))), esc(fmt_num(st.get("rho_random"))),
                       esc(fmt_num(st.get("h_norm"))), esc(fmt_num(st.get("grad_norm")))])
    agg = diagnosis.get("aggregation") or {}
    return [f"<h2>Diagnosis: {esc(diagnosis.get('verdict'))}</h2>",
            grid_table(["diagnostic", "measured", "fires", "status", "detail"], rows, numeric_from=1),
            grid_table(["stage", "Gamma", "null mean", "rho rule", "rho bp (+)", "rho random (-)", "||h||",
                        "||dloss_n/dh||"], stages),
            f'<p class="note">Gamma: {esc(agg.get("gamma", ""))}. rho: {esc(agg.get("rho", ""))}.</p>']


def render_training_report(metrics: dict, title: str = "edgefa training report", diagnosis: dict | None = None) -> str:
    """A complete HTML document for a run's metrics.json: accuracy over epochs, the verdict of
    `edgefa diagnose` when the run has one, and, where the run logged it, alignment with true BP
    (weight-gradient cosine per layer, signal cosine per stage, FA alignment error per layer) over
    epochs and as tables at the last epoch."""
    rows = [r for r in metrics.get("epochs") or [] if isinstance(r, dict)]
    epochs = [r.get("epoch") for r in rows]
    pct = [("test", "test_accuracy", PALETTE[0]), ("train", "train_accuracy", PALETTE[1])]
    accuracy = lines_chart([(name, epochs, [100 * r[k] if _is_num(r.get(k)) else None for r in rows], c)
                            for name, k, c in pct], "accuracy", "accuracy over epochs", "epoch", "accuracy (%)",
                           markers=len(rows) <= 12)
    final = metrics.get("final_test_accuracy")
    summary = [(k, esc(metrics[k])) for k in ("dataset", "model", "method", "device", "n_train", "n_test")
               if k in metrics]
    summary += [("epochs", esc(len(rows))),
                ("final test accuracy", esc(f"{100 * final:.1f}%") if _is_num(final) else "n/a")]
    body = [f"<h1>{esc(title)}</h1>", "<h2>Run</h2>", kv_table(summary),
            "<h2>Accuracy</h2>", figure("Train and test accuracy (%)", accuracy, "no epochs recorded"),
            *diagnosis_section(diagnosis)]
    logged = [a for a in (_alignment(r) for r in rows) if a is not None]
    body.append("<h2>Alignment with backpropagation</h2>")
    if not logged:
        body.append('<p class="empty">alignment was not logged for this run</p>')
        return page(title, body)
    last = logged[-1]
    agg = last.get("aggregation") or {}
    probe = (f"rule {last.get('rule')} (measured step: {last.get('measured_step')}), probe of "
             f"{last.get('probe_samples')} training samples in {last.get('dtype')}")
    body += [f'<p class="note">{esc(probe)}. Signal: {esc(last.get("signal", ""))}.</p>',
             figure("Weight-gradient cosine with BP, per layer", alignment_chart(
                 rows, "layers", "weight_grad_cosine", "alignment-weight-cosine", "weight-gradient cosine per layer",
                 "cos(rule grad, bp grad)", ref=("orthogonal", 0.0)),
                 "no values: every cosine was degenerate", caption=f"aggregation: {agg.get('weight_grad_cosine', '')}"),
             figure("Signal cosine with BP, per stage", alignment_chart(
                 rows, "stages", "signal_cosine", "alignment-signal-cosine", "signal cosine per stage",
                 "cos(rule signal, dL/dh)", ref=("orthogonal", 0.0)),
                 "no values: every signal cosine was degenerate",
                 caption=f"aggregation: {agg.get('signal_cosine', '')}")]
    error = alignment_chart(rows, "layers", "alignment_error", "alignment-error", "FA alignment error per layer",
                            "\u2016W \u2212 B\u2016_F")
    if error:
        body.append(figure("Feedback alignment error \u2016W \u2212 B\u2016_F, per layer", error,
                           caption=str(last.get("feedback_convention", ""))))
        body.append(figure("Cosine of W and its feedback B, per layer", alignment_chart(
            rows, "layers", "weight_feedback_cosine", "alignment-weight-feedback-cosine", "cos(W, B) per layer",
            "cos(W, B)", ref=("orthogonal", 0.0)), "no values: every cosine was degenerate",
            caption=f"aggregation: {agg.get('weight_feedback_cosine', '')}; (B unused): "
                    f"{agg.get('feedback_used', '')}"))
    epoch = next((r.get("epoch") for r in reversed(rows) if _alignment(r) is not None), None)
    body += [f"<h2>At epoch {esc(epoch)}</h2>", *alignment_tables(last),
             f'<p class="note">"degenerate": a norm was exactly 0, so the cosine is undefined (no eps clamp). '
             f'{esc(agg.get("grad_norm_mean", ""))}.</p>']
    return page(title, body)
