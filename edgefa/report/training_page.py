"""The training report (`edgefa report RUN/`, RUN/report.html): accuracy over epochs, the verdict of
`edgefa diagnose`, and alignment with backpropagation per layer and stage, over epochs and as
tables at the last epoch.
"""

from __future__ import annotations

from typing import Any, Sequence

from edgefa.report.format import fmt_cosine, fmt_num, fmt_pct, is_number
from edgefa.report.page import (empty_note, esc, figure, grid_table, heading, html_legend, kv_table, note, page,
                                section)
from edgefa.report.svg import PALETTE, lines_chart, series_colors


def _alignment(row: dict) -> dict | None:
    found = row.get("alignment") if isinstance(row, dict) else None
    return found if isinstance(found, dict) and isinstance(found.get("layers"), dict) else None


def _cosine_cell(value: Any) -> str:
    if value is None:
        return '<span class="note">degenerate</span>'
    return esc(fmt_cosine(value)) if is_number(value) else "n/a"


FEEDBACK_KEYS = ("alignment_error", "weight_feedback_cosine")


def alignment_series(rows: Sequence[dict], part: str, key: str) -> tuple[list[float], dict[str, list]]:
    """Epochs and, per layer (part "layers") or stage ("stages"), the value of `key` at each epoch
    (None where the epoch has no value: degenerate, or not logged)."""
    epochs, named = [], {}
    logged = [(row.get("epoch"), _alignment(row)) for row in rows]
    logged = [(e, a) for e, a in logged if a is not None and is_number(e)]
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
    named = {n: v for n, v in named.items() if any(is_number(x) for x in v)}
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
                      rows, numeric_from=2) if rows else empty_note("no layers")]
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
        return [section("Diagnosis"), '<p class="empty">not diagnosed: run <code>edgefa diagnose RUN/</code> '
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
    return [section(f"Diagnosis: {diagnosis.get('verdict')}"),
            grid_table(["diagnostic", "measured", "fires", "status", "detail"], rows, numeric_from=1),
            grid_table(["stage", "Gamma", "null mean", "rho rule", "rho bp (+)", "rho random (-)", "||h||",
                        "||dloss_n/dh||"], stages),
            note(f'Gamma: {agg.get("gamma", "")}. rho: {agg.get("rho", "")}.')]


def render_training_report(metrics: dict, title: str = "edgefa training report", diagnosis: dict | None = None) -> str:
    """A complete HTML document for a run's metrics.json: accuracy over epochs, the verdict of
    `edgefa diagnose` when the run has one, and, where the run logged it, alignment with true BP
    (weight-gradient cosine per layer, signal cosine per stage, FA alignment error per layer) over
    epochs and as tables at the last epoch."""
    rows = [r for r in metrics.get("epochs") or [] if isinstance(r, dict)]
    epochs = [r.get("epoch") for r in rows]
    pct = [("test", "test_accuracy", PALETTE[0]), ("train", "train_accuracy", PALETTE[1])]
    accuracy = lines_chart([(name, epochs, [100 * r[k] if is_number(r.get(k)) else None for r in rows], c)
                            for name, k, c in pct], "accuracy", "accuracy over epochs", "epoch", "accuracy (%)",
                           markers=len(rows) <= 12)
    final = metrics.get("final_test_accuracy")
    summary = [(k, esc(metrics[k])) for k in ("dataset", "model", "method", "device", "n_train", "n_test")
               if k in metrics]
    summary += [("epochs", esc(len(rows))),
                ("final test accuracy", esc(fmt_pct(final)) if is_number(final) else "n/a")]
    body = [heading(title), section("Run"), kv_table(summary),
            section("Accuracy"), figure("Train and test accuracy (%)", accuracy, "no epochs recorded"),
            *diagnosis_section(diagnosis)]
    logged = [a for a in (_alignment(r) for r in rows) if a is not None]
    body.append(section("Alignment with backpropagation"))
    if not logged:
        body.append(empty_note("alignment was not logged for this run"))
        return page(title, body)
    last = logged[-1]
    agg = last.get("aggregation") or {}
    probe = (f"rule {last.get('rule')} (measured step: {last.get('measured_step')}), probe of "
             f"{last.get('probe_samples')} training samples in {last.get('dtype')}")
    body += [note(f'{probe}. Signal: {last.get("signal", "")}.'),
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
    body += [section(f"At epoch {epoch}"), *alignment_tables(last),
             f'<p class="note">"degenerate": a norm was exactly 0, so the cosine is undefined (no eps clamp). '
             f'{esc(agg.get("grad_norm_mean", ""))}.</p>']
    return page(title, body)
