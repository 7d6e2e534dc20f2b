"""What `edgefa ...` prints: the terminal's tables, built from the library's results (rich).

Each function takes a result as the library returns it and gives back rich renderables (a Table, or
lines with rich markup) or prints them on the console it is handed; the CLI parses, calls the
library once and hands the result here. Numbers are written by edgefa/report/format.py.

Device side: rich, the standard library and edgefa.bundle (no torch).
"""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .format import (fmt_cosine, fmt_energy_labelled, fmt_joules_fine, fmt_pct, fmt_seconds_fine, fmt_sci,
                     fmt_signed3, fmt_sqnr, human_bytes)

# The four diagnostics of `edgefa diagnose` as the tables name them (keys of diagnosis.json)
DIAGNOSTIC_NAMES = {"growth": "(a) stream growth", "gradient_floor": "(b) ||g_L|| floor",
                    "stability": "(c) direction drift", "baseline": "(d) vs frozen blocks"}


def _num(value) -> str:
    """A measured value in a table cell: 4 significant digits; "-" for what is not a number."""
    return "-" if not isinstance(value, (int, float)) or isinstance(value, bool) else f"{value:.4g}"


# --- host runs: `edgefa report`, `edgefa diagnose`, `edgefa audit`, `edgefa experiment` ------------

def print_run_alignment(console: Console, epoch, found: dict) -> None:
    """`edgefa report`: alignment with BP at one epoch (TrainConfig.alignment's record): the weight
    gradients per layer, then the signal at each stage output when it was measured."""
    agg = found.get("aggregation") or {}
    has_fb = any(isinstance(e, dict) and "alignment_error" in e for e in found["layers"].values())
    console.print(f"alignment with BP at epoch {epoch}: rule {found.get('rule')} (measured step "
                  f"{found.get('measured_step')}), probe of {found.get('probe_samples')} training samples in "
                  f"{found.get('dtype')}", highlight=False)
    caption = f"cosine aggregation: {agg.get('weight_grad_cosine', '?')}"
    if has_fb:
        caption += (f". ||W - B||_F: {agg.get('alignment_error', '?')}; {found.get('feedback_convention', '')}. "
                    f"B unused: {agg.get('feedback_used', 'the layer input needs no gradient')}")
    table = Table(title=f"weight gradients, epoch {epoch}", caption=escape(caption))
    table.add_column("layer")
    table.add_column("kind")
    table.add_column("cos(grad rule, grad bp)", justify="right")
    if has_fb:
        table.add_column("||W - B||_F", justify="right")
        table.add_column("cos(W, B)", justify="right")
    for name, e in found["layers"].items():
        if not isinstance(e, dict):
            continue
        unused = " (B unused)" if e.get("feedback_used") is False else ""
        cells = [escape(str(name)) + unused, str(e.get("kind", "")), fmt_cosine(e.get("weight_grad_cosine"))]
        if has_fb:
            cells += [_num(e.get("alignment_error")), fmt_cosine(e.get("weight_feedback_cosine"))
                      if "alignment_error" in e else "-"]
        table.add_row(*cells)
    console.print(table)
    stages = {k: s for k, s in (found.get("stages") or {}).items() if isinstance(s, dict)}
    if stages:
        st = Table(title=f"signal at each stage output, epoch {epoch}",
                   caption=escape(f"signal cosine aggregation: {agg.get('signal_cosine', '?')}. "
                                  f"Signal: {found.get('signal', '')}"))
        for col in ("stage", "signal cosine", "excluded", "mean ||h||", "mean ||dloss_n/dh|| (bp)"):
            st.add_column(col, justify="left" if col == "stage" else "right")
        for name, s in stages.items():
            st.add_row(escape(str(name)), fmt_cosine(s.get("signal_cosine")), str(s.get("excluded_samples", "-")),
                       _num(s.get("h_norm_mean")), _num(s.get("grad_norm_mean")))
        console.print(st)


def print_diagnosis(console: Console, result: dict, where: str) -> None:
    """`edgefa diagnose`: the run, the four diagnostics, Gamma and rho per stage, the diagnosis'
    warnings and the verdict."""
    run = result["run"]
    colour = "green" if result["verdict"] == "trustworthy" else "red"
    fired = ", ".join(DIAGNOSTIC_NAMES[k] for k in result["fired"])
    console.print(f"{escape(where)}: {run['model']} {run['method']}"
                  + (f" (penalty {run['penalty']:g})" if run.get("penalty") else "")
                  + f" on {run['dataset']}, test accuracy {fmt_pct(run['test_accuracy'])}"
                  + (f" [yellow](diverged at epoch {run['diverged']['epoch']}; judged on the weights of epoch "
                     f"{run['diverged'].get('weights_of_epoch', 'its last finite step')})[/]"
                     if run.get("diverged") else ""), highlight=False)
    table = Table(title="diagnostics")
    for col in ("diagnostic", "measured", "fires", "status"):
        table.add_column(col, justify="left" if col == "diagnostic" else "right")
    details = []
    for key, d in result["diagnostics"].items():
        value, limit = d["value"], d["threshold"]
        if key == "baseline":
            shown, bound = (f"{value * 100:+.1f} pts" if value is not None else "-"), f"{limit * 100:g} pts"
        elif key == "growth":
            shown, bound = (f"{value:.3g}x" if value is not None else ("inf" if d["fired"] else "-")), f"{limit:g}x"
        else:
            shown, bound = fmt_sci(value), f"{limit:g}"
        status = {"fired": "[bold red]fired[/]", "passed": "[green]passed[/]"}.get(d["status"], d["status"])
        table.add_row(DIAGNOSTIC_NAMES[key], shown, f"{d['fires_when']} {bound}", status)
        details.append(f"{DIAGNOSTIC_NAMES[key][:3]} {d['detail']}")
    console.print(table)
    for line in details:
        console.print(f"  {escape(line)}", highlight=False)
    null = result["null"]
    st = Table(title="per stage: Gamma (cosine with true BP) and rho (perturbation check)")
    for col in ("stage", "Gamma", "null μ ± σ", "rho rule", "rho bp", "rho rand", "||h||", "||g||"):
        st.add_column(col, justify="left" if col == "stage" else "right")
    for name, row in result["stages"].items():
        nl = row.get("null") or {}
        null_cell = (f"{nl['mean']:+.3f}±{nl['std']:.3f}" if nl.get("mean") is not None and nl.get("std") is not None
                     else "-")
        st.add_row(escape(name), "degenerate" if row["degenerate"] else fmt_signed3(row["gamma"]), null_cell,
                   fmt_signed3(row["rho_rule"]), fmt_signed3(row["rho_bp"]), fmt_signed3(row["rho_random"]),
                   fmt_sci(row["h_norm"]), fmt_sci(row["grad_norm"]))
    console.print(st)
    agg = result["aggregation"]
    console.print(escape(f"  Gamma: {agg['gamma']}. ||h||, ||g||: {agg['h_norm']}; {agg['grad_norm']}. "
                         f"rho: {agg['rho']}; bp is the positive control, rand the negative. null: "
                         + (f"{null['draws']} draws, {null['what']}" if null["draws"]
                            else f"not applicable, {null['not_applicable']}")), style="dim", highlight=False)
    for warning in result.get("warnings") or []:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    console.print(f"verdict: [bold {colour}]{result['verdict']}[/]" + (f" ({escape(fired)})" if fired else ""))


def audit_table(title: str, header: list[str], rows: list[list[str]]) -> Table:
    """`edgefa audit`: the columns that fit a terminal, from the audit's table (every column: audit.md)."""
    shown = ("config", "test acc %", "frozen-blocks acc %", "growth (a)", "||g_L|| (b)", "drift (c)", "verdict")
    table = Table(title=title)
    for col in shown:
        table.add_column(col, justify="left" if col in ("config", "verdict") else "right")
    for row in rows:
        table.add_row(*(escape(row[header.index(col)]) for col in shown))
    return table


def text_table(title: str, header: list[str], rows: list[list[str]]) -> Table:
    """A table of text cells, every column right-aligned (`edgefa experiment preference`)."""
    table = Table(title=title)
    for name in header:
        table.add_column(escape(name), justify="right")
    for row in rows:
        table.add_row(*(escape(c) for c in row))
    return table


# --- bundles and fine-tuning on the device -----------------------------------------------------

def bundle_table(b) -> Table:
    """A bundle (edgefa.bundle.Bundle): its model, rule, optimizer, files and size."""
    from ..bundle import describe_model

    m, opt = b.manifest, b.manifest["optimizer"]
    table = Table(title=f"bundle {b.path}", show_header=False)
    table.add_row("model", escape(describe_model(m["model"])))
    if m.get("loss", "").startswith("bradley"):
        table.add_row("loss", escape(m["loss"]) + " (a scorer trained on preference pairs)")
    if opt.get("residual_penalty"):
        table.add_row("loss", f"cross-entropy + {opt['residual_penalty']:g} x residual-stream penalty")
    fb = m["feedback"]
    table.add_row("update rule", escape(f"{m.get('update_rule', 'dfa')}  (feedback: {fb.get('distribution')}, "
                                        f"std {fb.get('std')}, seed {fb.get('seed')}; {fb.get('source')})"))
    table.add_row("optimizer", f"{opt['name']}  lr {opt['lr']}  momentum {opt['momentum']}")
    for name, f in m["files"].items():
        table.add_row(escape(name), f"{human_bytes(f['bytes'])}  sha256 {f['sha256'][:16]}…")
    table.add_row("size", human_bytes(b.size_bytes()))
    return table


def _add_stop_rows(table: Table, result: dict) -> None:
    """Refused and rolled-back steps: always shown, 0 included."""
    table.add_row("refused steps", str(len(result["refused_steps"])))
    table.add_row("rolled-back steps", str(result["rolled_back_steps"]))


def device_finetune_table(result: dict) -> Table:
    """`edgefa device finetune`: a Finetuner's report."""
    table = Table(title="device fine-tuning (DFA, onnxruntime)", show_header=False)
    table.add_row("steps", f"{result['resumed_from_step']} -> {result['final_step']}"
                  + ("  (resumed)" if result["resumed_from_step"] else ""))
    if result["loss_first"] is not None:
        table.add_row("loss", f"{result['loss_first']:.4f} -> {result['loss_last']:.4f}")
    if result["accuracy_before"] is not None:
        table.add_row(result["metric"], f"{fmt_pct(result['accuracy_before'])} -> {fmt_pct(result['accuracy_after'])}")
    if result["step_time_ms_median"] is not None:
        table.add_row("step time", f"median {result['step_time_ms_median']:.2f} ms, p95 {result['step_time_ms_p95']:.2f} ms")
    _add_stop_rows(table, result)
    table.add_row("peak RSS", human_bytes(result["peak_rss_bytes"]))
    table.add_row("providers", ", ".join(result["providers"]))
    return table


# --- the link and fleets ------------------------------------------------------------------------

def remote_finetune_table(url: str, result: dict) -> Table:
    """`edgefa finetune --device`: link.client.remote_finetune's report."""
    stats = result["link"]
    table = Table(title=f"fine-tuning on {escape(url)} (DFA, over the link)", show_header=False)
    table.add_row("steps", f"{result['resumed_from_step']} -> {result['final_step']}")
    if result["loss_first"] is not None:
        table.add_row("loss", f"{result['loss_first']:.4f} -> {result['loss_last']:.4f}")
    if result["accuracy_before"] is not None:
        table.add_row(result.get("metric", "accuracy"),
                      f"{fmt_pct(result['accuracy_before'])} -> {fmt_pct(result['accuracy_after'])}")
    if result["step_ms_median"] is not None:
        table.add_row("step time on the device", f"median {result['step_ms_median']:.2f} ms")
        table.add_row("round trip per step", f"median {result['round_trip_ms_median']:.2f} ms "
                                             f"(link overhead {result['link_overhead_ms_median']:.2f} ms)")
    _add_stop_rows(table, result)
    table.add_row("link", f"{stats['frames_sent']} frames sent, {stats['retransmits']} repeated, "
                          f"{stats['corrupt']} damaged received, {result['reconnects']} reconnects")
    table.add_row("device peak RSS", human_bytes(result["device_peak_rss_bytes"]))
    return table


def device_info_table(url: str, answer: dict) -> Table:
    """`edgefa device info`: what a device is and holds (its answer to INFO)."""
    # the client checked that the fields read here are there (link.client.REPLY_FIELDS); lists and
    # names are rendered with str(), whatever a device of another version puts in them
    d, v, p = answer["device"], answer["versions"], answer["providers"]
    table = Table(title=f"device {escape(url)}", show_header=False)
    table.add_row("device", escape(f"{d['model']} ({d['machine']}, {d['cpu_count']} CPUs"
                                   + (f", {human_bytes(d['memory_bytes'])}" if d.get("memory_bytes") else "") + ")"))
    table.add_row("host name", escape(str(d["hostname"])))
    table.add_row("versions", escape(", ".join(f"{k} {val}" for k, val in v.items())))
    table.add_row("execution providers", escape(f"chosen {', '.join(map(str, p['chosen']))}; "
                                                f"available {', '.join(map(str, p['available']))}"))
    for name, why in (p.get("backends") or {}).items():
        if name not in p["available"]:      # edgefa's own backends: available, or why not
            table.add_row(escape(f"{name} backend"), escape(str(why)))
    if answer.get("bundle"):
        table.add_row("bundle", f"{answer['bundle'][:16]}…  model {' -> '.join(map(str, answer['model']))}")
        table.add_row("step", f"{answer['step']} (checkpointed {answer['checkpointed_step']}, "
                              f"every {answer['checkpoint_every']} steps)")
    else:
        table.add_row("bundle", "none deployed")
    if answer.get("kept") is not None:      # (devices before retired bundles do not say)
        table.add_row("kept bundles", escape(", ".join(
            f"{k.get('name')} (step {'?' if k.get('step') is None else k['step']})"
            for k in answer["kept"] if isinstance(k, dict)) or "none")
            + f" (keeps {answer['keep_retired']} retired; pull one with device pull URL --kept NAME)")
    return table


def deploy_lines(result: dict, url: str) -> str:
    """What a deploy did (DeviceClient.deploy's answer): the step the device is at, and what became
    of the state it held before: where each replaced bundle is kept, and how to pull it back."""
    note = "already deployed (state kept)" if result.get("deployed") else "deployed"
    at = (f"resumed at step {result['resumed_step']} from the bundle's state" if result.get("resumed_step") is not None
          else f"device at step {result['step']}")
    lines = [f"{note}: {human_bytes(result['archive_bytes'])} archive sha256 {result['sha256'][:16]}… -> {url}, {at}"]

    def pull_hint(name: str) -> str:
        return f"pull it with: edgefa device pull {url} --kept {name} --out DIR"

    replaced, pushed = result.get("replaced"), result.get("pushed_out")
    if replaced:
        lines.append(f"the replaced bundle ({(replaced['bundle'] or '?')[:16]}…, step {replaced['step']}) is kept "
                     f"on the device as {replaced['kept_as']}; {pull_hint(replaced['kept_as'])}")
    if pushed and pushed["kept_as"]:
        lines.append(f"the bundle before it (step {pushed['step']}) moved to {pushed['kept_as']}; "
                     f"{pull_hint(pushed['kept_as'])}")
    elif pushed and pushed["step"] is not None:
        lines.append(f"the bundle before it (step {pushed['step']}) was removed: the device keeps no retired "
                     f"bundles (device serve --keep-retired {result.get('keep_retired')})")
    if result.get("evicted"):
        lines.append(f"removed the oldest retired bundles beyond --keep-retired {result.get('keep_retired')}: "
                     + ", ".join(result["evicted"]))
    return "\n".join(lines)


def fleet_table(title: str, results, columns: list[str], row) -> Table:
    """One row per device of a fleet command (link.fleet.run_fleet's results): `row(result)` gives
    the cells of `columns` for a device that succeeded."""
    table = Table(title=title)
    for c in ["device", "url", *columns, "time", "status"]:
        table.add_column(c)
    for r in results:
        cells = row(r.result) if r.ok else ["-"] * len(columns)
        table.add_row(escape(r.device.name), escape(r.device.url), *cells, f"{r.seconds:.1f} s",
                      "[green]ok[/]" if r.ok else f"[red]{escape(r.error)}[/]")
    return table


def fleet_info_cells(a: dict) -> list[str]:
    return [escape(str(a["device"]["model"])), escape(", ".join(a["providers"]["chosen"])),
            (a["bundle"] or "none")[:12], str(a["step"])]


def fleet_deploy_cells(a: dict) -> list[str]:
    return [human_bytes(a["archive_bytes"]), str(a["step"]), str(a["retransmits"]), replaced_state_cell(a)]


def replaced_state_cell(a: dict) -> str:
    """What became of the device state a deploy replaced (deploy_lines says it in full)."""
    kept = [f"step {r['step']} kept as {r['kept_as']}" for r in (a.get("replaced"), a.get("pushed_out"))
            if r and r.get("kept_as")]
    if a.get("pushed_out") and not a["pushed_out"].get("kept_as") and a["pushed_out"].get("step") is not None:
        kept.append(f"step {a['pushed_out']['step']} removed (--keep-retired 0)")
    return "; ".join(kept) or "-"


FLEET_DEPLOY_COLUMNS = ["archive", "step", "repeats", "replaced state"]


def fleet_finetune_cells(a: dict, evaluated: bool) -> list[str]:
    return [f"{a['resumed_from_step']} -> {a['final_step']}",
            f"{a['loss_last']:.4f}" if a["loss_last"] is not None else "-",
            f"{fmt_pct(a['accuracy_before'])} -> {fmt_pct(a['accuracy_after'])}" if evaluated else "-",
            f"{a['round_trip_ms_median']:.2f} ms" if a["round_trip_ms_median"] else "-",
            str(len(a["refused_steps"])), str(a["rolled_back_steps"])]


def fleet_finetune_columns(metric: str = "accuracy") -> list[str]:
    """The columns of fleet_finetune_cells; `metric`: accuracy, or preference accuracy (pairs)."""
    return ["steps", "loss", metric, "round trip", "refused", "rolled back"]


# --- device profiles, budgets, profiling ------------------------------------------------------

def device_profile_table(p) -> Table:
    """One device profile (device_profiles.DeviceProfile), every field."""
    table = Table(title=escape(f"{p.display_name} ({p.name})"), show_header=False)
    gpu = (f"{p.gpu_name}: {p.gpu_fp32_tflops:g} TFLOP/s fp32, {p.gpu_fp16_tflops:g} fp16"
           if p.gpu_name else "none used by edgefa")
    rows = [("CPU", f"{p.cpu_name}: {p.cpu_cores} cores at {p.cpu_max_clock_ghz:g} GHz, "
                    f"{p.cpu_peak_flops / 1e9:.0f} GFLOP/s fp32 peak"),
            ("GPU", gpu),
            ("memory", f"{human_bytes(p.memory_bytes)} {p.memory_type}, {p.memory_bandwidth_gbps:g} GB/s"),
            ("power modes", ", ".join(f"{m['id']}: {m['name']}" for m in p.power_modes) or "-"),
            ("idle power", f"{p.idle_power_w:g} W"),
            ("energy model (estimates)", f"{p.pj_per_flop:g} pJ/FLOP, {p.pj_per_dram_byte:g} pJ/DRAM byte"),
            ("sensor", f"{p.sensor_backend}" + (f": rails {', '.join(p.sensor_rails)}" if p.sensor_rails else "")
                       + (f", total {p.total_rail}" if p.total_rail else "")),
            ("execution providers", ", ".join(p.providers)),
            ("runtime overhead", human_bytes(p.runtime_overhead_bytes)),
            ("source", p.source)]
    rows += [(f"detected: {k}", str(v)) for k, v in p.detected.items()]
    for k, v in rows:
        table.add_row(k, escape(v))
    return table


def device_profiles_table(profiles) -> Table:
    """`edgefa profiles list`: one line per profile, in a light frame that fits 80 columns whole
    (the names are what --profile takes)."""
    table = Table(title="device profiles (edgefa profiles show NAME for the whole of one)",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("name", "CPU", "GPU TFLOP/s", "memory", "GB/s", "idle", "sensor"):
        table.add_column(col, justify="right" if col in ("GPU TFLOP/s", "GB/s", "idle") else "left",
                         no_wrap=col in ("name", "sensor"), min_width=20 if col == "name" else None)
    for p in profiles:
        table.add_row(p.name, f"{p.cpu_cores}x {p.cpu_max_clock_ghz:g} GHz",
                      f"{p.gpu_fp32_tflops:g}" if p.gpu_fp32_tflops else "-", human_bytes(p.memory_bytes),
                      f"{p.memory_bandwidth_gbps:g}", f"{p.idle_power_w:g} W", p.sensor_backend)
    return table


def print_budget(console: Console, result, bundle, profile, batch_size: int) -> None:
    """`edgefa budget`: predicted memory per part against what is available, and the roofline's
    lower bound on step time (device_profiles.budget.Budget)."""
    table = Table(title=escape(f"budget: {Path(bundle).name} on {profile.display_name}, batch {batch_size}"))
    table.add_column("")
    table.add_column("bytes", justify="right")
    for part, n in result.memory.items():
        table.add_row(part, human_bytes(n))
    table.add_row("[bold]predicted peak[/]", f"[bold]{human_bytes(result.peak_bytes)}[/]")
    table.add_row(escape(f"available ({result.available_basis})"), human_bytes(result.available_bytes))
    console.print(table)
    verdict = "[green]fits[/]" if result.fits else "[red]does not fit[/]"
    console.print(f"memory: {verdict} ({100 * result.peak_bytes / result.available_bytes:.1f}% of available)")
    console.print(f"step time >= [bold]{result.step_lower_bound_s * 1e3:.3f} ms[/] on {escape(result.provider)} "
                  f"(roofline, bound by {result.bound_by}: {result.cost.flops / 1e6:.1f} MFLOP at "
                  f"{result.peak_flops / 1e9:.0f} GFLOP/s = {result.compute_s * 1e3:.3f} ms; "
                  f"{human_bytes(result.cost.bytes_moved)} at {result.bandwidth_bytes_s / 1e9:g} GB/s = "
                  f"{result.memory_s * 1e3:.3f} ms)")
    for note in result.notes:
        console.print(f"note: {escape(note)}")


def phases_table(result: dict) -> Table:
    """`edgefa profile`: latency and energy per phase of a profile (profile.json)."""
    energy = result["energy"]
    table = Table(title=escape(result["title"]))
    for col in ("phase", "windows", "p50 ms", "p95 ms", "p99 ms", "total s",
                f"energy p50 ({energy['method']})"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    for name, ph in result["phases"].items():
        lat = ph["latency_ms"]
        table.add_row(name, str(ph["count"]), *(f"{lat[q]:.3f}" if q in lat else "-" for q in ("p50", "p95", "p99")),
                      f"{ph['total_s']:.3f}",
                      fmt_energy_labelled(ph["energy_j"]["per_window_p50"], ph["energy_j"]["method"]))
    mem = result["memory"]
    table.caption = escape(f"peak RSS {human_bytes(mem['peak_rss_bytes'])}; energy: {energy['backend']}"
                           + (f"; notes: {'; '.join(energy['notes'])}" if energy["notes"] else ""))
    if result.get("link"):
        rt = result["link"]["round_trip_ms"]
        table.caption += escape(f"; round trip p50 {rt.get('p50', float('nan')):.2f} ms")
    return table


def compare_table(result: dict, dfa: dict, bp: dict) -> Table:
    """`edgefa profile compare`: DFA against BP (their profiles), and the ratios (compare.json)."""
    table = Table(title=escape(result["title"]))
    for col in ("", "dfa", "bp", "dfa / bp"):
        table.add_column(col, justify="right" if col else "left")
    r = result["ratios"]
    method = result["energy_method"]
    table.add_row("step time p50", *(f"{run['phases']['train_step']['latency_ms'].get('p50', float('nan')):.3f} ms"
                                     for run in (dfa, bp)), f"{r['step_time_p50']:.2f}")
    table.add_row("peak RSS", human_bytes(dfa["memory"]["peak_rss_bytes"]), human_bytes(bp["memory"]["peak_rss_bytes"]),
                  f"{r['peak_rss']:.2f}")
    table.add_row(f"energy per step ({method})",
                  fmt_energy_labelled(dfa["energy"]["per_step_j"], dfa["energy"]["method"]),
                  fmt_energy_labelled(bp["energy"]["per_step_j"], bp["energy"]["method"]),
                  "-" if r["energy_per_step"] is None else f"{r['energy_per_step']:.2f}")
    return table


# --- the FPGA simulator and cost model ------------------------------------------------------------

def print_fpga_simulation(console: Console, result: dict, steps: int, batch_size: int) -> None:
    """`edgefa fpga simulate`: fixed point against float32, SQNR per layer, overflow per tensor class."""
    before, after = result["accuracy_before"], result["accuracy_after"]
    table = Table(title=f"fixed point vs float32: {steps} DFA steps, batch {batch_size}, "
                        f"lr {result['lr_fixed_point']:.6g} ({result['lr_mode']})")
    table.add_column("")
    table.add_column("fixed point", justify="right")
    table.add_column("float32 (onnxruntime)", justify="right")
    metric = result.get("metric", "accuracy")
    table.add_row(f"{metric} before ({result['eval_data']}, {result['eval_samples']} "
                  f"{'pairs' if metric != 'accuracy' else 'samples'})",
                  fmt_pct(before["fixed"]), fmt_pct(before["float32"]))
    table.add_row(f"{metric} after", f"[bold]{fmt_pct(after['fixed'])}[/]", f"[bold]{fmt_pct(after['float32'])}[/]")
    table.add_row("loss, last step", f"{result['loss_last']['fixed']:.4f}", f"{result['loss_last']['float32']:.4f}")
    console.print(table)
    layers = Table(title="per-layer SQNR (over all elements of the layer)")
    for col in ("layer", "datapath (same weights)", "weights after the run"):
        layers.add_column(col, justify="left" if col == "layer" else "right")
    for name, db in result["datapath_sqnr_db"].items():
        frozen = name not in result.get("trained_layers", [name])      # its weight SQNR: quantization alone
        layers.add_row(name + (" (frozen)" if frozen else ""), fmt_sqnr(db),
                       fmt_sqnr((result["weight_sqnr_db"] or {}).get(name)))
    console.print(layers)
    formats = result["config"]["formats"]
    over = Table(title="overflow per tensor class (wrapped or saturated values)")
    for col in ("tensor class", "format", "values written", "overflowed", "rate"):
        over.add_column(col, justify="left" if col in ("tensor class", "format") else "right",
                        no_wrap=col == "format", min_width=len(max(formats.values(), key=len)) if col == "format" else None)
    for cls, o in result["overflow"].items():
        over.add_row(cls, formats[cls], f"{o['values']:,}", f"{o['overflowed']:,}", f"{100 * o['rate']:.3f}%")
    console.print(over)
    zeroed = result["updates_rounded_to_zero"]
    console.print(f"weight updates rounded to zero: [bold]{zeroed:,}[/] of {result['updates']:,} non-zero updates "
                  f"({100 * zeroed / max(1, result['updates']):.1f}%)")


def fpga_sweep_table(result: dict, grid, steps: int) -> Table:
    """`edgefa fpga sweep`: accuracy per word length (rows) and rounding mode (columns)."""
    table = Table(title=f"{result.get('metric', 'accuracy')} after {steps} fixed-point DFA steps "
                        f"(swept: {', '.join(grid.classes)} as ap_fixed<W,{grid.int_bits},mode,AP_SAT>)")
    table.add_column("W", justify="right")
    for mode in grid.roundings:
        table.add_column(mode, justify="right")
    cell = {(r["rounding"], r["width"]): r for r in result["rows"]}
    for w in grid.widths:
        table.add_row(str(w), *(f"{fmt_pct(cell[m, w]['accuracy'])} ({100 * cell[m, w]['zeroed_fraction']:.1f}% zeroed)"
                                for m in grid.roundings))
    return table


def print_fpga_cost(console: Console, result: dict, bundle, array, batch: int) -> None:
    """`edgefa fpga cost`: DFA against BP on one MAC array (fpga_sim.cost.cost_of_bundle), and the
    on-chip memory per tensor class. Every figure is the analytic model's."""
    dfa, bp = result["dfa"], result["bp"]
    basis = result["energy_basis"]
    title = (f"fpga cost (model): {Path(bundle).name} on a {array.rows}x{array.cols} output-stationary MAC array, "
             f"{array.clock_hz / 1e6:g} MHz, {array.data_bits}-bit data, {array.acc_bits}-bit accumulators, "
             f"batch {batch}" + (" pairs (2 rows each)" if dfa.get("pairs") else "")
             + ("" if dfa["network"].get("trainable", "all") == "all" else f", trains {dfa['network']['trainable']}"))
    table = Table(title=escape(title))
    dfa_name = f"DFA ({dfa['feedback'] or 'no hidden layer'} B)"
    for col in ("", dfa_name, "BP", "DFA / BP"):
        table.add_column(col, justify="right" if col else "left")

    def ratio(a, b):
        return "-" if not b else f"{a / b:.2f}"

    def row(label, a, b, fmt):
        table.add_row(escape(label), fmt(a), fmt(b), ratio(a, b))

    cyc = lambda n: f"{n:,}"  # noqa: E731
    for name in dfa["phases"]:
        pd, pb = dfa["phases"][name], bp["phases"][name]
        label = pd["label"] if pd["label"] == pb["label"] else f"{pd['label']} | {pb['label']}"
        row(f"cycles: {label}", pd["cycles"], pb["cycles"], cyc)
    row("cycles per training step", dfa["train_step"]["cycles"], bp["train_step"]["cycles"], cyc)
    row("MACs per training step", dfa["train_step"]["macs"], bp["train_step"]["macs"], cyc)
    table.add_row("latency per training step", *(fmt_seconds_fine(r["train_step"]["latency_s"])
                                                 + (" (DRAM-bound)" if r["train_step"]["bound"] == "dram" else "")
                                                 for r in (dfa, bp)),
                  ratio(dfa["train_step"]["latency_s"], bp["train_step"]["latency_s"]))
    row("latency per inference (batch 1)", dfa["inference"]["latency_s"], bp["inference"]["latency_s"],
        fmt_seconds_fine)
    row(f"energy per training step, {basis}", dfa["train_step"]["energy_j"], bp["train_step"]["energy_j"],
        fmt_joules_fine)
    row(f"energy per inference, {basis}", dfa["inference"]["energy_j"], bp["inference"]["energy_j"], fmt_joules_fine)
    row("working set (weights, momentum, feedback, activations, errors)", dfa["memory"]["working_set_bytes"],
        bp["memory"]["working_set_bytes"], human_bytes)
    row("of it held on chip", dfa["memory"]["on_chip_bytes"], bp["memory"]["on_chip_bytes"], human_bytes)
    row(f"BRAM36 needed (of {array.bram36_available})", dfa["memory"]["bram36_needed"], bp["memory"]["bram36_needed"],
        cyc)
    table.add_row("fits on chip", *("yes" if r["memory"]["fits"] else "no" for r in (dfa, bp)), "")
    row("DRAM traffic per step", dfa["memory"]["dram_bytes_per_step"], bp["memory"]["dram_bytes_per_step"],
        human_bytes)
    res = dfa["resources"]
    row(f"DSP48E2 ({res['multiplier']} multipliers in {res['multiplier_in']})", res["dsp"], bp["resources"]["dsp"], cyc)
    row("LUT (LUT multipliers, wide accumulators, LFSRs)", res["lut"], bp["resources"]["lut"], cyc)
    console.print(table)

    mem = Table(title="on-chip memory per tensor class (model)")
    for col in ("tensor", "DFA bytes", "DFA BRAM36", "BP bytes", "BP BRAM36", "lanes"):
        mem.add_column(col, justify="left" if col == "tensor" else "right")
    for name, md in dfa["memory"]["tensors"].items():
        mb = bp["memory"]["tensors"][name]
        if not (md["elements"] or mb["elements"]):
            continue
        spill = lambda m: "" if m["on_chip"] else " (DRAM)"  # noqa: E731
        mem.add_row(name, human_bytes(md["bytes"]) + spill(md), str(md["bram36"]), human_bytes(mb["bytes"]) + spill(mb),
                    str(mb["bram36"]), str(md["lanes"]))
    console.print(mem)
    s = result["lfsr_saving"]
    if s["feedback_bytes"]:
        console.print(escape(f"DFA with --feedback lfsr: {s['generators']} LFSR generators (assumed {s['ff']} FF + "
                             f"{s['lut']} LUT) replace {human_bytes(s['feedback_bytes'])} of stored feedback "
                             f"({s['bram36_saved']} BRAM36) and save {fmt_joules_fine(s['energy_j_saved'])} per step; "
                             f"energy: {basis}"), highlight=False)
    console.print(escape(f"all figures: analytic model, not a measurement; energy: {basis}; "
                         "assumptions in --json (\"assumptions\")"), highlight=False)


# --- the demo -----------------------------------------------------------------------------------

def demo_table(result: dict) -> Table:
    """`edgefa demo`: what device fine-tuning gained on the shifted sensor, and what it cost."""
    model = f" ({result['model_description']})" if result.get("model", "mlp") != "mlp" else ""
    table = Table(title=f"edgefa demo{model}: digits seen through a shifted sensor ({result['shift']})")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("host DFA pre-training, clean test accuracy", fmt_pct(result["host_clean_accuracy"]))
    table.add_row("shifted test, before fine-tuning", fmt_pct(result["before"]))
    table.add_row("shifted test, after DFA fine-tuning on the device", f"[bold]{fmt_pct(result['after_device_dfa'])}[/]")
    table.add_row("shifted test, after BP fine-tuning on the host (reference)", fmt_pct(result["after_host_bp"]))
    table.add_row("gain from device fine-tuning", f"{100 * (result['after_device_dfa'] - result['before']):+.1f} points")
    table.add_row("device step time (median)", f"{result['device_step_ms_median']:.2f} ms")
    table.add_row("round trip per step over the pseudo-terminal (median)", f"{result['round_trip_ms_median']:.2f} ms")
    table.add_row("device process peak RSS", human_bytes(result["device_peak_rss_bytes"]))
    table.add_row(f"device energy per step ({result['energy_method']})",
                  fmt_energy_labelled(result["energy_per_step_j"], result["energy_method"]))
    table.add_row("bundle size", human_bytes(result["bundle_bytes"]))
    table.add_row("device samples (train / test)", f"{result['n_device_train']} / {result['n_device_test']}")
    return table
