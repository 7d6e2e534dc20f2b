"""Numbers as text: the one home for how edgefa writes a number in a page, a markdown table or a
plot label. Each function is one unit or one convention; each says what it writes for a missing value.

Standard library only (the device side uses it too).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

MIB = 1024 * 1024


def is_number(value: Any) -> bool:
    """A finite int or float (bools are not numbers here: a flag is never plotted or formatted)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fmt_num(value: Any) -> str:
    """A number with about three significant digits and no exponent; "n/a" for None or NaN."""
    if not is_number(value):
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
    """Milliseconds, as fmt_num; "n/a" when missing."""
    return "n/a" if not is_number(value) else f"{fmt_num(value)} ms"


def fmt_bytes(value: Any) -> str:
    """Bytes in B, KiB, MiB or GiB; "n/a" when missing."""
    if not is_number(value):
        return "n/a"
    for unit, size in (("GiB", 1024 ** 3), ("MiB", MIB), ("KiB", 1024)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{int(value)} B"


def fmt_energy(joules: Any) -> str:
    """Joules as mJ below one joule, else J; "n/a" when missing."""
    if not is_number(joules):
        return "n/a"
    return f"{fmt_num(joules * 1000)} mJ" if abs(joules) < 1 else f"{fmt_num(joules)} J"


def fmt_joules_fine(joules: float) -> str:
    """Energy of one small operation: nJ below one microjoule, else µJ."""
    return f"{joules * 1e9:,.1f} nJ" if joules < 1e-6 else f"{joules * 1e6:,.3f} µJ"


def fmt_seconds_fine(seconds: float) -> str:
    """Latency of one small operation: µs below one millisecond, else ms."""
    return f"{seconds * 1e6:,.2f} µs" if seconds < 1e-3 else f"{seconds * 1e3:,.3f} ms"


def fmt_ratio(value: Any) -> str:
    """A ratio as "1.23×"; "n/a" when missing."""
    return "n/a" if not is_number(value) else f"{value:.2f}\u00d7"


def fmt_pct(fraction: float | None, std: float | None = None, unit: str = "%") -> str:
    """A fraction as a percentage with one decimal, "12.3%"; with a spread over seeds (`std`, a
    fraction too) "12.3 ± 0.4%"; `unit=""` leaves the sign out (a column headed "... %").
    "-" when missing."""
    if fraction is None:
        return "-"
    return f"{100 * fraction:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "") + unit


def fmt_cosine(value: Any) -> str:
    """A cosine for tables: 4 decimals with sign; None is "degenerate" (a norm was exactly 0)."""
    if value is None:
        return "degenerate"
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return "n/a"
    return f"{value:+.4f}"


def fmt_cosine_spread(mean: float | None, std: float | None = None) -> str:
    """A cosine (or correlation) reduced over seeds: "+0.123 ± 0.004" (3 decimals); "-" when missing."""
    if mean is None:
        return "-"
    return f"{mean:+.3f}" + (f" ± {std:.3f}" if std is not None else "")


def fmt_sci(value: Any) -> str:
    """A value that spans orders of magnitude: three significant digits, exponent when needed; "-"
    for anything that is not a number (None, a flag, text)."""
    return "-" if not isinstance(value, numbers.Real) or isinstance(value, bool) else f"{value:.3g}"


# --- the terminal's (edgefa/report/terminal.py and the CLI's one-line summaries) ---------------------

def human_bytes(n: float) -> str:
    """Bytes in B, KiB, MiB or GiB for the terminal: any real number (numpy's too), below a KiB
    rounded to whole bytes. (fmt_bytes, for pages, writes "n/a" for what is not a plain number.)"""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def fmt_energy_labelled(joules: float | None, method: str) -> str:
    """Energy in mJ with its method beside it, so an estimate never reads as a measurement; "-" when missing."""
    if joules is None:
        return "-"
    return f"{joules * 1e3:.3f} mJ" + (" (estimated)" if method == "estimated" else "")


def fmt_signed3(value: Any) -> str:
    """A cosine or correlation with sign and 3 decimals, "+0.123"; "-" for what is not a number."""
    return "-" if not isinstance(value, (int, float)) or isinstance(value, bool) else f"{value:+.3f}"


def fmt_sqnr(db: float | None) -> str:
    """A signal-to-quantization-noise ratio in dB; None means no noise at all ("identical")."""
    return "identical" if db is None else f"{db:.1f} dB"
