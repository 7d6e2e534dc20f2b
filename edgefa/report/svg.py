"""Charts as inline SVG strings: round ticks, a frame with scales, axes, and the four chart kinds
(histogram, horizontal bars, lines, grouped bars). Standard library only.

Every chart returns an `<svg class="plot" data-plot=KIND>` string, or None when there is nothing to
draw (the page shows a short note in its place). Every string from the data is escaped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from edgefa.report.format import fmt_ms, fmt_num, is_number
from edgefa.report.page import esc

PALETTE = ["#3b6ea8", "#d9822b", "#5a9e6f", "#8e6bb0", "#b5534b"]
MARKER_COLORS = {"p50": "#2f7d4a", "p95": "#d9822b", "p99": "#b5534b"}


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
    values = [v for v in values if is_number(v)]
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
    marks = {k: v for k, v in (markers or {}).items() if is_number(v)}
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
    rows = [(name, value, note) for name, value, note in rows if is_number(value) and value >= 0]
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
    series = [(name, [(x, y) for x, y in zip(xs, ys) if is_number(x) and is_number(y)], color)
              for name, xs, ys, color in lines]
    series = [s for s in series if s[1]]
    if not series:
        return None
    ref = ref if ref and is_number(ref[1]) else None
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
    values = [v for s in series for v in s.values if is_number(v)]
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
            if not is_number(value):
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


def series_colors(n: int) -> list[str]:
    """The palette for up to five series; beyond that, n hues spread around the colour wheel."""
    if n <= len(PALETTE):
        return PALETTE[:n]
    return [f"hsl({round(360 * i / n)}, 60%, 42%)" for i in range(n)]
