"""The compare report (`edgefa profile compare`, compare.html): two or more profiles side by side
(schema edgefa.compare/1), with the recorded ratios and grouped-bar panels of the cost per step.
"""

from __future__ import annotations

from edgefa.report.format import MIB, fmt_bytes, fmt_ms, fmt_num, fmt_ratio, is_number
from edgefa.report.page import (check_schema, empty_note, esc, est_badge, figure, grid_table, heading,
                                html_legend, machine_table, note, page, section, subtitle, wrap)
from edgefa.report.profile_page import energy_cell, energy_of, latency_of, main_phase, phases_of
from edgefa.report.svg import PALETTE, Series, bar_chart


def _runs(compare: dict) -> dict[str, dict]:
    runs = compare.get("runs") or {}
    return {str(k): v for k, v in runs.items() if isinstance(v, dict)}


def compare_table(compare: dict) -> str:
    """Both runs side by side, one row per metric, with the recorded ratio where there is one."""
    runs = _runs(compare)
    ratios = compare.get("ratios") or {}
    methods = [energy_of(r).get("method", "none") for r in runs.values()]
    any_estimated = "estimated" in methods

    def main_lat(run: dict, key: str) -> str:
        main = main_phase(run)
        return esc(fmt_ms(latency_of(main[1], key))) if main else "n/a"

    def row(label: str, cells: list[str], ratio_key: str | None = None, tag: bool = False) -> list[str]:
        ratio = esc(fmt_ratio(ratios.get(ratio_key))) if ratio_key else ""
        return [esc(label), *cells, ratio + (est_badge("estimated") if tag and ratio_key and ratio != "n/a" else "")]

    memory = [r.get("memory") or {} for r in runs.values()]
    energy = [energy_of(r) for r in runs.values()]
    rows = [
        row("where", [wrap(r.get("where", "n/a")) for r in runs.values()]),
        row("step time p50", [main_lat(r, "p50") for r in runs.values()], "step_time_p50"),
        row("step time p95", [main_lat(r, "p95") for r in runs.values()]),
        row("step time p99", [main_lat(r, "p99") for r in runs.values()]),
        row("peak RSS", [esc(fmt_bytes(m.get("peak_rss_bytes"))) for m in memory], "peak_rss"),
        row("runtime growth", [esc(fmt_bytes(m.get("runtime_growth_bytes"))) for m in memory]),
        row("energy per step", [energy_cell(e.get("per_step_j"), e.get("method")) for e in energy],
            "energy_per_step", tag=any_estimated),
        row("energy method", [wrap(" \u00b7 ".join(str(p) for p in (e.get("method", "none"), e.get("backend")) if p))
                              for e in energy]),
    ]
    return grid_table(["metric", *runs, "ratio"], rows)


def compare_figures(compare: dict) -> list[str]:
    """A legend, three small grouped-bar panels (step time, peak RSS, energy) and p50 per phase."""
    runs = _runs(compare)
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(runs)}
    legend = html_legend(list(runs), [colors[n] for n in runs])

    def panel(kind: str, category: str, unit: str, values: dict[str, float | None],
              labels: dict[str, str], estimated: dict[str, bool]) -> str | None:
        series = [Series(n, [values[n]], [labels[n]], [estimated.get(n, False)], colors[n]) for n in runs]
        return bar_chart([""], series, kind, category, unit, x_label=category, width=260, height=260)

    step = {n: latency_of(main_phase(r)[1], "p50") if main_phase(r) else None for n, r in runs.items()}
    rss = {n: ((r.get("memory") or {}).get("peak_rss_bytes")) for n, r in runs.items()}
    rss = {n: v / MIB if is_number(v) else None for n, v in rss.items()}
    methods = {n: energy_of(r).get("method", "none") for n, r in runs.items()}
    joules = {n: energy_of(r).get("per_step_j") if methods[n] != "none" else None for n, r in runs.items()}
    est = {n: m == "estimated" for n, m in methods.items()}
    tag = " (estimated)" if any(est.values()) else ""
    mj = {n: j * 1000 if is_number(j) else None for n, j in joules.items()}
    panels = [
        panel("compare-step-time", "step time p50", "ms", step, {n: fmt_ms(v) for n, v in step.items()}, {}),
        panel("compare-peak-rss", "peak RSS", "MiB", rss, {n: f"{fmt_num(v)} MiB" for n, v in rss.items()}, {}),
        panel("compare-energy", f"energy per step{tag}", f"mJ{tag}", mj,
              {n: f"{fmt_num(v)} mJ" + ("\nestimated" if est[n] else "") for n, v in mj.items()}, est),
    ]
    empty = {"compare-energy": "no energy figure: neither run measured or estimated energy"}
    kinds = ["compare-step-time", "compare-peak-rss", "compare-energy"]
    cells = "".join(p or empty_note(empty.get(k, "no samples")) for p, k in zip(panels, kinds))
    figures = [legend, f"<figure><figcaption>Cost per step: step time p50, peak RSS, energy per step{esc(tag)}"
               f"</figcaption><div class=\"panels\">{cells}</div>"
               f'{note(compare.get("ratio_definition", ""))}</figure>']
    phase_lists = [list(phases_of(r)) for r in runs.values()]
    common = [p for p in (phase_lists[0] if phase_lists else []) if all(p in other for other in phase_lists[1:])]
    series = []
    for name, run in runs.items():
        values = [latency_of(phases_of(run)[p], "p50") for p in common]
        series.append(Series(name, values, [fmt_num(v) for v in values], [], colors[name]))
    figures.append(figure("Latency p50 per phase (ms)",
                          bar_chart(common, series, "compare-phases", "latency p50 per phase", "p50 latency (ms)",
                                    x_label="phase"),
                          "no samples: the runs share no phase"))
    return figures


def render_compare_report(compare: dict) -> str:
    """A complete HTML document comparing the runs of a compare dict (schema edgefa.compare/1)."""
    compare = check_schema(compare, "edgefa.compare/")
    title = str(compare.get("title") or "edgefa profile compare")
    model = compare.get("model") or {}
    layers = " \u2192 ".join(str(n) for n in model.get("layers") or [])
    model_line = " \u00b7 ".join(part for part in (
        f"layers {layers}" if layers else "", f"batch {model['batch_size']}" if "batch_size" in model else "",
        f"{model['steps']} steps" if "steps" in model else "") if part)
    body = [heading(title),
            subtitle(f'{model_line} \u00b7 {compare.get("created", "")}'),
            section("Side by side"), compare_table(compare),
            note(f'ratio: {compare.get("ratio_definition", "first run / second run")}'),
            section("Figures"), *compare_figures(compare),
            section("Machine"), machine_table(compare.get("machine"))]
    return page(title, body)
