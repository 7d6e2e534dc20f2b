"""Power rails from a `tegrastats` line, in both formats Jetsons print.

    JetPack 4 (Nano, Xavier NX):  ... POM_5V_IN 4096/3500 POM_5V_GPU 0/0 POM_5V_CPU 1096/1048
    JetPack 5/6 (Orin):           ... VDD_IN 5704mW/5704mW VDD_CPU_GPU_CV 1154mW/1154mW ...

Each rail is "current/average". The unit-less figures of JetPack 4 are milliwatts too. The input
rail (VDD_IN, or POM_5V_IN on the Nano) is already the module's total: the other rails are parts
of it, so they are never added to it. Where a line has no input rail (AGX Orin prints only its
sub-rails), the total is unknown and says so (None), rather than a sum passed off as the total.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# NAME current/average, each optionally suffixed mW, and followed by a space or the end: this
# skips "RAM 1215/3964MB" and "SWAP 0/1982MB", whose figures are memory, not power.
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(mW)?/(\d+)(mW)?(?=\s|$)")
TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")


@dataclass(frozen=True)
class RailReading:
    now_mw: int
    average_mw: int


@dataclass(frozen=True)
class TegrastatsSample:
    rails: dict[str, RailReading]
    total_rail: str | None           # which rail is the module's total, when the line has one
    units: str                       # "mW" (JetPack 5/6) or "unitless (mW)" (JetPack 4)

    @property
    def total_mw(self) -> int | None:
        return self.rails[self.total_rail].now_mw if self.total_rail else None


def parse_tegrastats(line: str) -> TegrastatsSample | None:
    """The power rails of one tegrastats line; None when the line reports no rails at all."""
    rails, units = {}, set()
    for name, now, unit_now, avg, unit_avg in _RAIL.findall(line):
        rails[name] = RailReading(int(now), int(avg))
        units.add("mW" if unit_now or unit_avg else "unitless (mW)")
    if not rails:
        return None
    total = next((r for r in TOTAL_RAILS if r in rails), None)
    return TegrastatsSample(rails, total, "mW" if units == {"mW"} else "unitless (mW)")
