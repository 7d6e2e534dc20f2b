"""The fpga sweep report (`edgefa fpga sweep`): accuracy against word length per rounding mode, as
a page (sweep.html), a chart of its own (sweep.svg) and a markdown table (sweep.md), from one sweep
result (schema edgefa.fpga-sweep/1).
"""

from __future__ import annotations

from edgefa.report.format import fmt_num, fmt_pct, is_number
from edgefa.report.markdown import markdown_table_lines
from edgefa.report.page import (check_schema, esc, figure, grid_table, heading, note, page, section, subtitle,
                                text_kv_table)
from edgefa.report.svg import PALETTE, lines_chart


def sweep_chart(sweep: dict) -> str | None:
    """Accuracy (%) against word length W, one line per rounding mode, float32 as a dashed line."""
    rows = sweep.get("rows") or []
    modes = list(dict.fromkeys(r["rounding"] for r in rows))
    lines = []
    for i, mode in enumerate(modes):
        mine = sorted((r["width"], r["accuracy"]) for r in rows if r["rounding"] == mode)
        lines.append((mode, [w for w, _ in mine], [100 * a if is_number(a) else None for _, a in mine],
                      PALETTE[i % len(PALETTE)]))
    ref = sweep.get("float32_accuracy_after")
    return lines_chart(lines, "sweep", "accuracy against word length per rounding mode",
                       f"word length W of {', '.join(sweep.get('swept_classes', []))} "
                       f"(ap_fixed<W,{sweep.get('int_bits')}>)", "accuracy after fine-tuning (%)",
                       ref=("float32 runtime", 100 * ref) if is_number(ref) else None, markers=True)


def _accuracy_cell(row: dict | None) -> str:
    """Accuracy and the share of updates rounded to zero; "-" where that cell of the grid did not run."""
    if row is None:
        return "-"
    return f'{fmt_pct(row["accuracy"])} <span class="note">({fmt_pct(row["zeroed_fraction"])} zeroed)</span>'


def render_sweep_report(sweep: dict) -> str:
    """A complete HTML document for an `edgefa fpga sweep` result (schema edgefa.fpga-sweep/1)."""
    sweep = check_schema(sweep, "edgefa.fpga-sweep/")
    rows = sweep["rows"]
    modes = list(dict.fromkeys(r["rounding"] for r in rows))
    cell = {(r["rounding"], r["width"]): r for r in rows}
    table_rows = [[esc(w), *(_accuracy_cell(cell.get((m, w))) for m in modes)] for w in sweep["widths"]]
    before, after = sweep.get("float32_accuracy_before"), sweep.get("float32_accuracy_after")
    title = "edgefa fpga sweep"
    body = [heading(title),
            subtitle(f'{sweep.get("bundle", "")} \u00b7 {sweep.get("steps")} steps of batch {sweep.get("batch_size")} '
                     f'\u00b7 swept: {", ".join(sweep.get("swept_classes", []))}'),
            figure("Accuracy against word length", sweep_chart(sweep), caption=(
                "Round-to-nearest loses every update smaller than half an LSB; stochastic rounding keeps "
                "it in expectation (Gupta et al., ICML 2015).")),
            section("Accuracy after fine-tuning (share of weight updates rounded to zero)"),
            grid_table(["W", *modes], table_rows),
            note(f'float32 runtime: {fmt_num(100 * before) if is_number(before) else "-"}% before, '
                 f'{fmt_num(100 * after) if is_number(after) else "-"}% after the same steps.'),
            section("Other formats"),
            text_kv_table((sweep.get("base_config") or {}).get("formats", {}).items())]
    return page(title, body)


def accuracy_grid(sweep: dict) -> dict[str, list[float | None]]:
    """Accuracy per rounding mode, in width order (None where a cell did not run)."""
    table = {(r["rounding"], r["width"]): r["accuracy"] for r in sweep["rows"]}
    return {mode: [table.get((mode, w)) for w in sweep["widths"]] for mode in sweep["roundings"]}


def markdown_table(sweep: dict) -> str:
    """sweep.md: one row per word length, one column per rounding mode, then the float32 reference."""
    grid = accuracy_grid(sweep)
    rows = [[w, *(fmt_pct(grid[m][i]) for m in grid)] for i, w in enumerate(sweep["widths"])]
    lines = markdown_table_lines([f"W (I = {sweep['int_bits']})", *grid], rows, right_aligned=True)
    if sweep["float32_accuracy_after"] is not None:
        lines.append(f"\nfloat32 runtime after the same steps: {fmt_pct(sweep['float32_accuracy_after'])} "
                     f"(before: {fmt_pct(sweep['float32_accuracy_before'])})")
    return "\n".join(lines) + "\n"
