"""The profile report (`edgefa profile`, report.html): one profile dict (schema edgefa.profile/1) as a
page with a summary, the latency histogram, time and energy per phase, memory and power over time.

The readers at the top (phases, the main phase, latency, energy) serve the compare report too.
"""

from __future__ import annotations

from typing import Any

from edgefa.report.format import MIB, fmt_bytes, fmt_energy, fmt_ms, fmt_num, is_number
from edgefa.report.page import (check_schema, empty_note, esc, est_badge, figure, grid_table, kv_table,
                                heading, machine_table, page, section, subtitle)
from edgefa.report.svg import PALETTE, Series, bar_chart, hbars, histogram, line_chart


# --------------------------------------------------------------------------------------------
# Reading a profile
# --------------------------------------------------------------------------------------------

def phases_of(profile: dict) -> dict[str, dict]:
    """The recorded phases by name (entries that are not dicts left out)."""
    phases = profile.get("phases") or {}
    return {str(k): v for k, v in phases.items() if isinstance(v, dict)}


def main_phase(profile: dict) -> tuple[str, dict] | None:
    """train_step when recorded, else the phase with the most samples."""
    phases = phases_of(profile)
    if not phases:
        return None
    if "train_step" in phases:
        return "train_step", phases["train_step"]
    name = max(phases, key=lambda n: (len(phases[n].get("samples_ms") or []), phases[n].get("count") or 0))
    return name, phases[name]


def latency_of(phase: dict | None, key: str) -> float | None:
    """One latency statistic of a phase ("p50", "mean", ...) in ms, or None."""
    value = ((phase or {}).get("latency_ms") or {}).get(key)
    return value if is_number(value) else None


def phase_total_s(phase: dict) -> float | None:
    """total_s when recorded, else p50 times count."""
    total = phase.get("total_s")
    if is_number(total):
        return total
    p50, count = latency_of(phase, "p50"), phase.get("count")
    return p50 * count / 1000 if p50 is not None and is_number(count) else None


def energy_of(profile: dict) -> dict:
    """The profile's energy part; method "none" when it has none."""
    return profile.get("energy") or {"method": "none", "notes": []}


def energy_cell(joules: Any, method: Any) -> str:
    """Energy value for a table, tagged when estimated, "n/a" when not recorded."""
    if method == "none" or not is_number(joules):
        return "n/a"
    return esc(fmt_energy(joules)) + est_badge(method)


def _no_energy_line(energy: dict) -> str:
    notes = [str(n) for n in energy.get("notes") or []]
    why = "; ".join(notes) or str(energy.get("backend") or "no energy backend available")
    return f"no energy figure: {why}"


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------

def profile_summary(profile: dict) -> str:
    """The table at the top: where, what ran, headline latency, memory, energy, link."""
    config = profile.get("config") or {}
    device = profile.get("device_profile") or {}
    memory = profile.get("memory") or {}
    energy = energy_of(profile)
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
                     " / ".join(esc(fmt_ms(latency_of(phase, k))) for k in ("p50", "p95", "p99"))))
        rows.append((f"{name} windows", f"{esc(phase.get('count', 'n/a'))} recorded, "
                                        f"{esc(phase.get('warmup', 0))} dropped as warm-up"))
    rows.append(("peak RSS", esc(fmt_bytes(memory.get("peak_rss_bytes")))))
    if is_number(memory.get("runtime_growth_bytes")):
        rows.append(("runtime growth (engine build)", esc(fmt_bytes(memory["runtime_growth_bytes"]))))
    gpu = memory.get("gpu")
    if isinstance(gpu, dict):
        rows.append(("GPU memory", f"{esc(fmt_bytes(gpu.get('used_bytes')))} used, peak "
                                   f"{esc(fmt_bytes(gpu.get('peak_bytes')))} ({esc(gpu.get('source', '?'))})"))
    method = energy.get("method", "none")
    rows.append(("energy per step", energy_cell(energy.get("per_step_j"), method)))
    if method != "none":
        power = energy.get("average_power_w")
        rows.append(("average power", (esc(f"{fmt_num(power)} W") + est_badge(method)) if is_number(power) else "n/a"))
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
    for name, phase in phases_of(profile).items():
        e = phase.get("energy_j") or {}
        rows.append([esc(name), esc(phase.get("count", "n/a")), esc(phase.get("warmup", 0)),
                     *(esc(fmt_ms(latency_of(phase, k))) for k in ("p50", "p95", "p99", "mean")),
                     esc(f"{fmt_num(phase_total_s(phase))} s"), energy_cell(_median_energy(e), e.get("method"))])
    return grid_table(headers, rows) if rows else empty_note("no phases recorded")


def latency_figure(profile: dict) -> str:
    """Histogram of the main phase's windows with p50/p95/p99 marked."""
    main = main_phase(profile)
    if not main:
        return figure("Latency distribution", None, "no samples: no phases recorded")
    name, phase = main
    markers = {k: latency_of(phase, k) for k in ("p50", "p95", "p99")}
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
    totals = [(name, phase_total_s(phase)) for name, phase in phases_of(profile).items()]
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
    ref = (f"peak {fmt_bytes(peak)}", peak / MIB) if is_number(peak) else None
    rss = [b / MIB if is_number(b) else None for b in timeline.get("rss_bytes") or []]
    plot = line_chart(timeline.get("t_s") or [], rss, "memory", "resident memory over time",
                      "time since start (s)", "RSS (MiB)", ref=ref)
    return figure("Resident memory over time (RSS, MiB)", plot, "no samples: no memory timeline recorded",
                  "dashed line: peak RSS of the process")


def _median_energy(e: dict):
    """A phase's median energy per window (older profiles carry only the mean)."""
    return e.get("per_window_p50", e.get("per_window"))


def energy_figures(profile: dict) -> list[str]:
    """Energy per window by phase and power over time; one line in their place when there is no energy."""
    energy = energy_of(profile)
    method = energy.get("method", "none")
    if method == "none":
        return [empty_note(_no_energy_line(energy))]
    names, values, labels, flags = [], [], [], []
    for name, phase in phases_of(profile).items():
        e = phase.get("energy_j") or {}
        joules = _median_energy(e)
        if is_number(joules) and e.get("method", method) != "none":
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
                      ref=(f"average {fmt_num(avg)} W", avg) if is_number(avg) else None, zero_based=True,
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
    profile = check_schema(profile, "edgefa.profile/")
    title = str(profile.get("title") or "edgefa profile")
    body = [heading(title),
            subtitle(f'{profile.get("where", "")} \u00b7 {profile.get("created", "")}'),
            section("Summary"), profile_summary(profile),
            section("Latency"), latency_figure(profile),
            section("Phases"), phases_figure(profile), phase_table(profile),
            section("Memory"), memory_figure(profile),
            section("Energy"), *energy_figures(profile),
            section("Machine"), machine_table(profile.get("machine"))]
    return page(title, body)
