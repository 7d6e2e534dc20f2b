"""`edgefa ...`: one entry point for host and device.

Host commands import torch-based modules inside their bodies, never at the top, so the device
commands run where torch is not installed. The CLI parses, calls the library and renders.
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .cli_types import (COUNT, FRACTION, LEARNING_RATE, LISTEN_ADDRESS, MOMENTUM, NON_NEGATIVE_FLOAT,
                        OUT_FILE, OUT_FOLDER, POSITIVE, POSITIVE_FLOAT, SEED, WIDTHS, Finite, counts, refuse_empty_text)
from .errors import EdgefaError
from .runtime.divergence import DEFAULT_MAX_REFUSALS

console = Console()
err_console = Console(stderr=True)


def progress_bar(transient: bool = False) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                    console=err_console, transient=transient)


def _one_line_warnings(message, category, filename, lineno, file=None, line=None):
    err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def energy_text(joules: float | None, method: str) -> str:
    """Energy with its method beside it: an estimate never reads as a measurement."""
    if joules is None:
        return "-"
    return f"{joules * 1e3:.3f} mJ" + (" (estimated)" if method == "estimated" else "")


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


force_option = click.option("--force", is_flag=True,
                            help="write --out even where it holds something else: what it held is kept "
                                 "beside it as OUT.replaced-<time>/ (edgefa never deletes what it did not write)")


def check_out(out, kind: str, force: bool) -> None:
    """Before the work: may `kind` be written to --out (edgefa.out_folders)? Where only --force
    allows it, the old folder is set aside now and put back if the command fails."""
    from .out_folders import out_folder

    def note(line: str) -> None:
        err_console.print(f"[yellow]note:[/] {escape(line)}", highlight=False, soft_wrap=True)

    click.get_current_context().with_resource(out_folder(out, kind, force, say=note))


def write_json(path, result: dict, indent: int = 2) -> None:
    """An output file (--report, --json): its folders made, written whole or not at all."""
    from .bundle import write_atomically

    write_atomically(path, (json.dumps(result, indent=indent) + "\n").encode())


@click.group()
@click.version_option(__version__, prog_name="edgefa")
def cli() -> None:
    """Train with feedback alignment on the host; fine-tune with DFA on the device without torch."""


# --- host ------------------------------------------------------------------------------------

@cli.command()
@click.option("--method", type=click.Choice(["bp", "fa", "dfa", "usf", "hybrid"]), default="dfa", show_default=True,
              help="bp | fa | dfa | usf (sign-symmetric feedback) | hybrid (dfa with a bp step every --hybrid-every)")
@click.option("--hybrid-every", type=POSITIVE, default=10, show_default=True,
              help="hybrid: every k-th step is a true BP step (10, 50 and 100 are the interesting values)")
@click.option("--dataset", default="digits", show_default=True,
              help="digits | npz:FILE (arrays X, y) | mnist:DIR (IDX files) | cifar10:DIR (binary batches) | mnist1d[:N] (generated)")
@click.option("--model", "model_kind", type=click.Choice(["mlp", "resmlp", "cnn", "vit", "transformer"]),
              default="mlp", show_default=True,
              help="mlp | resmlp (pre-LN residual MLP) | cnn | vit (ViT-Mini) | transformer (causal, one feature per position)")
@click.option("--hidden", type=WIDTHS, default="256,256", show_default=True, help="mlp: hidden widths, comma-separated")
@click.option("--width", type=POSITIVE, default=None,
              help="model dim (resmlp 256, vit 64, transformer 64) or base channels (cnn 16)")
@click.option("--depth", type=POSITIVE, default=None, help="residual blocks (resmlp 4, vit 2, transformer 2) or conv stages (cnn 2)")
@click.option("--expansion", type=POSITIVE, default=1, show_default=True, help="block MLP hidden = width x expansion")
@click.option("--heads", type=POSITIVE, default=4, show_default=True, help="attention heads (vit, transformer)")
@click.option("--patch", type=POSITIVE, default=None, help="vit patch size (default 4 where it divides images >= 16, else 2)")
@click.option("--penalty", type=NON_NEGATIVE_FLOAT, default=0.0, show_default=True,
              help="residual-stream penalty lambda: adds lambda * sum_l mean ||f_l(h_l)||^2")
@click.option("--freeze-blocks", is_flag=True, help="frozen-random-blocks baseline: only stem, terminal LN and head train")
@click.option("--activation", type=click.Choice(["relu", "tanh", "gelu"]), default="relu", show_default=True,
              help="gelu: resmlp, cnn, vit, transformer only")
@click.option("--epochs", type=POSITIVE, default=30, show_default=True)
@click.option("--batch-size", type=POSITIVE, default=32, show_default=True)
@click.option("--lr", type=LEARNING_RATE, default=0.003, show_default=True)
@click.option("--momentum", type=MOMENTUM, default=0.9, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--feedback-seed", type=SEED, default=1, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto (cuda when present) | cpu | cuda")
@click.option("--nproc", type=POSITIVE, default=1, show_default=True,
              help="data-parallel processes (DDP: gloo on CPU, NCCL with one GPU each); --batch-size is the "
                   "global batch and must divide by it. Under torchrun the world is torchrun's")
@click.option("--out", type=OUT_FOLDER, required=True, help="run directory to write")
@force_option
def train(method, hybrid_every, dataset, model_kind, hidden, width, depth, expansion, heads, patch, penalty,
          freeze_blocks, activation, epochs, batch_size, lr, momentum, seed, feedback_seed, device, nproc, out, force):
    """Train a model on the host with bp, fa, dfa, usf or hybrid; write checkpoint.pt and metrics.json."""
    if batch_size % nproc:                 # before torch is imported: a quick one line
        raise EdgefaError(f"--batch-size {batch_size} is not divisible by --nproc {nproc}: "
                          "each process takes an equal share of the global batch")
    check_out(out, "run", force)
    from .shared.datasets import load_dataset
    from .training.trainer import TrainConfig, build_model, save_run, train as run_training

    widths = list(hidden)
    if model_kind == "mlp" and activation == "gelu":
        raise EdgefaError("--activation gelu is for resmlp, cnn, vit and transformer; the mlp takes relu or tanh")
    if model_kind == "mlp" and (penalty or freeze_blocks):
        raise EdgefaError("--penalty and --freeze-blocks need residual blocks (resmlp, vit, transformer)")
    config = TrainConfig(method, dataset, widths, activation, epochs, batch_size, lr, momentum, seed,
                         feedback_seed, device=device, hybrid_every=hybrid_every, model=model_kind, width=width,
                         depth=depth, expansion=expansion, heads=heads, patch=patch, penalty=penalty,
                         freeze_blocks=freeze_blocks, nproc=nproc)
    from .training.distributed import check_launch, torchrun_env, train_distributed
    world = torchrun_env()                 # set when torchrun started this process as one rank
    if world is not None or nproc > 1:
        check_launch(config, world)        # batch shares, GPUs for NCCL: before the progress bar
    data = load_dataset(dataset)           # a bad data file is one line, before the progress bar
    try:                                   # so is a model that does not fit the data (patch, heads)
        build_model(config, data.X.shape[1], data.n_classes, data.image_shape)
    except ValueError as exc:
        raise EdgefaError(f"{model_kind}: {exc}") from None
    if world is not None and world.rank != 0:
        train_distributed(config, out, env=world, data=data)   # rank 0 reports and writes the run
        return
    with progress_bar() as bar:
        task = bar.add_task(f"train {model_kind} {method}", total=epochs, status="")

        def on_epoch(epoch, row):
            bar.update(task, completed=epoch,
                       status=f"loss {row['batch_loss_mean']:.3f}  test {pct(row['test_accuracy'])}")

        if world is not None or nproc > 1:
            metrics, path = train_distributed(config, out, on_epoch, env=world, data=data)
        else:
            run = run_training(config, on_epoch, data)
    if world is None and nproc == 1:
        path, metrics = save_run(run, out), run.metrics
    if "diverged" in metrics:
        kept = metrics["diverged"].get("weights_of_epoch")
        console.print(f"[yellow]warning:[/] diverged at epoch {metrics['diverged']['epoch']}: "
                      f"{metrics['diverged']['note']}" + (f"; the saved weights are those of epoch {kept}" if kept else ""))
    procs = f" x {metrics['world_size']} processes ({metrics['backend']})" if "world_size" in metrics else ""
    console.print(f"final test accuracy [bold]{pct(metrics['final_test_accuracy'])}[/] "
                  f"({model_kind} {method}, {metrics['dataset']}, {epochs} epochs on {metrics['device']}{procs}) -> {path}")
    console.print(f"judge it before you report it: edgefa diagnose {escape(str(out))}", highlight=False)


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", type=OUT_FOLDER, required=True, help="bundle directory to write")
@click.option("--momentum", type=MOMENTUM, default=None, help="device SGD momentum (default: the run's)")
@click.option("--lr", type=LEARNING_RATE, default=None, help="device default learning rate (default: the run's)")
@click.option("--trainable", default="all", show_default=True,
              help="what the device trains: all, or last:K (the last K units from the head; mlp: layers, "
                   "resmlp: head+terminal LN, then one block at a time, then the embedding)")
@click.option("--trt-target", default="10.3", show_default=True,
              help="TensorRT release the graphs are checked against: 8.5 (JetPack 5.1) or 10.3 (JetPack 6.1/6.2)")
@click.option("--batch-profile", default="1,32,256", show_default=True,
              help="MIN,OPT,MAX batch of the TensorRT optimization profile "
                   "(tensorrt/trtexec.sh, the device's TensorRT provider)")
@click.option("--require-tensorrt", is_flag=True,
              help="fail, writing nothing, when a graph would not build into a TensorRT engine for --trt-target")
@click.option("--tensorrt", "build_engines", is_flag=True,
              help="also build the TensorRT engines here (a host with TensorRT and the device's GPU)")
@force_option
def export(run_dir, out, momentum, lr, trainable, trt_target, batch_profile, require_tensorrt, build_engines, force):
    """Export a trained run as a bundle: infer.onnx, train_step.onnx, weights, feedback, manifest,
    and tensorrt/ (readiness.json, trtexec.sh: the engine builds to run on the device)."""
    from .bundle import check_trainable_syntax

    try:
        check_trainable_syntax(trainable)  # a malformed spec is one line before torch is imported
    except EdgefaError as exc:
        raise EdgefaError(f"export: --{exc}") from None
    from .exporters.tensorrt_ready import load_target, parse_batch_profile  # onnx, not torch

    try:
        target, profile = load_target(trt_target), parse_batch_profile(batch_profile)
    except EdgefaError as exc:
        raise EdgefaError(f"export: {exc}") from None
    if build_engines:
        from .runtime.tensorrt_build import tensorrt_missing

        if tensorrt_missing():                       # before anything is written
            raise EdgefaError(f"export --tensorrt: {tensorrt_missing()}; export without it and build on the device")
    check_out(out, "bundle", force)                  # a folder that is not a bundle: before torch
    from .exporters.export import export_bundle
    from .training.trainer import load_run

    path = export_bundle(load_run(run_dir), out, momentum=momentum, lr=lr, trainable=trainable,
                         trt_target=target.version, batch_profile=profile, require_tensorrt=require_tensorrt)
    if build_engines:
        from .runtime.tensorrt_build import build_bundle_engines

        build_bundle_engines(path)
    _show_bundle(path)
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    trt = manifest["tensorrt"]
    if trt["ready"]:
        graphs = f"{manifest['graphs']['infer']}, {manifest['graphs']['train_step']}"
        console.print(f"tensorrt {trt['target']}: ready ({graphs}); build on the device: "
                      f"sh {escape(str(Path(path) / trt['trtexec']))}", highlight=False, soft_wrap=True)
    else:
        problems = trt["problems"]
        more = f" (+{len(problems) - 1} more, see {trt['readiness']})" if len(problems) > 1 else ""
        err_console.print(f"[yellow]warning:[/] tensorrt {trt['target']}: not ready: {escape(problems[0])}{more}",
                          highlight=False, soft_wrap=True)


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", type=OUT_FILE, default=None, help="HTML file to write (default RUN/report.html)")
def report(run_dir, out):
    """Report a run: accuracy and alignment with BP per layer (table), over epochs (RUN/report.html)."""
    from .diagnostics import epoch_alignment, fmt_cosine, read_diagnosis, read_metrics
    from .report.html import render_training_report, write_report

    metrics = read_metrics(run_dir)
    rows = metrics["epochs"]
    num = lambda v: "-" if not isinstance(v, (int, float)) or isinstance(v, bool) else f"{v:.4g}"  # noqa: E731
    last = rows[-1] if rows else {}
    console.print(f"{escape(str(run_dir))}: {metrics.get('model', 'mlp')} {metrics.get('method', '?')} on "
                  f"{metrics.get('dataset', '?')}, {len(rows)} epochs, test accuracy "
                  f"[bold]{pct(last.get('test_accuracy'))}[/] (train {pct(last.get('train_accuracy'))})",
                  highlight=False)
    logged = [(row.get("epoch"), epoch_alignment(row)) for row in rows]
    logged = [(e, a) for e, a in logged if a is not None]
    if not logged:
        console.print("alignment was not logged for this run (TrainConfig.alignment off, or an older run)")
    else:
        epoch, found = logged[-1]
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
                cells += [num(e.get("alignment_error")), fmt_cosine(e.get("weight_feedback_cosine"))
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
                           num(s.get("h_norm_mean")), num(s.get("grad_norm_mean")))
            console.print(st)
    diagnosis = read_diagnosis(run_dir)
    if diagnosis is None:
        console.print(f"not diagnosed: run `edgefa diagnose {escape(str(run_dir))}` before trusting this result")
    else:
        fired = ", ".join(DIAGNOSTIC_NAMES.get(k, k) for k in diagnosis.get("fired") or [])
        console.print(f"diagnosis: [bold]{escape(str(diagnosis.get('verdict')))}[/]" + (f" ({fired})" if fired else ""))
    path = Path(out) if out else Path(run_dir) / "report.html"
    write_report(path, render_training_report(metrics, f"edgefa report: {Path(run_dir).resolve().name}", diagnosis))
    console.print(f"report: {path}")


# --- the diagnostic protocol: can an FA result be trusted? ------------------------------------

def protocol_options(f):
    """The thresholds and measurement settings `diagnose` and `audit` share."""
    options = [
        click.option("--growth-max", type=POSITIVE_FLOAT, default=50.0, show_default=True,
                     help="(a) fires when max_l ||h_{l+1}|| / ||h_l|| is above this"),
        click.option("--grad-floor", type=POSITIVE_FLOAT, default=1e-7, show_default=True,
                     help="(b) fires when ||dloss_n/dh_L|| is below this; Gamma below it reads 'degenerate'"),
        click.option("--stability-max", type=Finite(-1, 1), default=0.30, show_default=True,
                     help="(c) fires when the cross-batch cosine of BP gradient directions is above this"),
        click.option("--margin", type=Finite(), default=2.0, show_default=True,
                     help="(d) fires when test accuracy beats the frozen-blocks baseline by fewer points"),
        click.option("--null-draws", type=COUNT, default=20, show_default=True,
                     help="fresh random feedback draws for the null calibration of Gamma"),
        click.option("--probes", type=POSITIVE, default=128, show_default=True,
                     help="random directions per stage for the perturbation correlation rho"),
        click.option("--eval-batch", type=POSITIVE, default=256, show_default=True,
                     help="the fixed evaluation batch: the first samples of the run's test split"),
        click.option("--batches", type=counts(2), default=8, show_default=True, help="(c): disjoint batches"),
        click.option("--batch-size", "stability_batch", type=POSITIVE, default=32, show_default=True,
                     help="(c): samples per batch"),
        click.option("--eps", type=POSITIVE_FLOAT, default=1e-3, show_default=True, help="rho: perturbation size / ||h_l||_F"),
        click.option("--dtype", default="float32", show_default=True,
                     help="measurement precision: float32 | bfloat16 | float64 (float16 is refused)"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def protocol_settings(growth_max, grad_floor, stability_max, margin, null_draws, probes, eval_batch, batches,
                      stability_batch, eps, dtype):
    from .diagnostics import measure_dtype_name

    measure_dtype_name(dtype)                # float16 is refused before torch is imported
    from .diagnostics.diagnosis import Settings, Thresholds

    return Settings(Thresholds(growth_max, grad_floor, stability_max, margin / 100.0), eval_batch, batches,
                    stability_batch, null_draws, probes, eps, dtype)


def fmt_sci(value) -> str:
    return "-" if not isinstance(value, (int, float)) or isinstance(value, bool) else f"{value:.3g}"


DIAGNOSTIC_NAMES = {"growth": "(a) stream growth", "gradient_floor": "(b) ||g_L|| floor",
                    "stability": "(c) direction drift", "baseline": "(d) vs frozen blocks"}


def cos3(value) -> str:
    return "-" if not isinstance(value, (int, float)) or isinstance(value, bool) else f"{value:+.3f}"


def print_diagnosis(result: dict, where: str) -> None:
    run = result["run"]
    colour = "green" if result["verdict"] == "trustworthy" else "red"
    fired = ", ".join(DIAGNOSTIC_NAMES[k] for k in result["fired"])
    console.print(f"{escape(where)}: {run['model']} {run['method']}"
                  + (f" (penalty {run['penalty']:g})" if run.get("penalty") else "")
                  + f" on {run['dataset']}, test accuracy {pct(run['test_accuracy'])}"
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
        st.add_row(escape(name), "degenerate" if row["degenerate"] else cos3(row["gamma"]), null_cell,
                   cos3(row["rho_rule"]), cos3(row["rho_bp"]), cos3(row["rho_random"]),
                   fmt_sci(row["h_norm"]), fmt_sci(row["grad_norm"]))
    console.print(st)
    agg = result["aggregation"]
    console.print(escape(f"  Gamma: {agg['gamma']}. ||h||, ||g||: {agg['h_norm']}; {agg['grad_norm']}. "
                         f"rho: {agg['rho']}; bp is the positive control, rand the negative. null: "
                         + (f"{null['draws']} draws, {null['what']}" if null["draws"]
                            else f"not applicable, {null['not_applicable']}")), style="dim", highlight=False)
    weak = [n for n, r in result["stages"].items() if not r["degenerate"] and (r["rho_bp"] is None or r["rho_bp"] < 0.9)]
    if weak:
        console.print(f"[yellow]warning:[/] the positive control rho(bp) is under 0.9 at {', '.join(weak)}: "
                      "finite differences do not confirm the BP gradient there (try a smaller --eps)")
    console.print(f"verdict: [bold {colour}]{result['verdict']}[/]" + (f" ({escape(fired)})" if fired else ""))


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--baseline", type=click.Path(exists=True, file_okay=False), default=None,
              help="a frozen-random-blocks run to compare with (default: RUN/frozen_baseline/, trained when absent)")
@click.option("--no-baseline", is_flag=True, help="skip (d) instead of training the baseline")
@protocol_options
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda")
@click.option("--json", "as_json", is_flag=True, help="print the diagnosis as JSON instead of tables")
@click.option("--fail-on-walk-back", is_flag=True, help="exit with status 1 when the verdict is 'walk back'")
def diagnose(run_dir, baseline, no_baseline, device, as_json, fail_on_walk_back, **protocol):
    """Judge a trained run: four diagnostics, a verdict, honest alignment (writes RUN/diagnosis.json)."""
    settings = protocol_settings(**protocol)          # float16 and bad values: one line, before torch
    from .shared.datasets import load_dataset
    from .diagnostics.diagnosis import diagnose as run_protocol, frozen_baseline, write_diagnosis
    from .training.trainer import load_run

    run = load_run(run_dir, device)
    data = load_dataset(run.config.dataset)
    with progress_bar(transient=True) as bar:
        task = bar.add_task("frozen-blocks baseline", total=run.config.epochs, status="")

        def on_epoch(epoch, row):
            bar.update(task, completed=epoch, status=f"test {pct(row['test_accuracy'])}")

        base = None if no_baseline else frozen_baseline(run, Path(run_dir), baseline, device, data, on_epoch)
        bar.update(task, description="diagnose", status="measuring")
        result = run_protocol(run, settings, base, data, device)
    path = write_diagnosis(result, run_dir)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        print_diagnosis(result, run_dir)
        console.print(f"diagnosis: {path}")
    if fail_on_walk_back and result["verdict"] != "trustworthy":
        sys.exit(1)


@cli.command()
@click.option("--configs", default="bp,fa,dfa,hybrid,dfa+1e-4,dfa+1e-2,dfa+1e-1", show_default=True,
              help="RULE or RULE+LAMBDA (the residual-stream penalty), comma-separated")
@click.option("--seeds", default="0,1,2", show_default=True, help="seeds (split, init, batches; feedback seed + 1)")
@click.option("--dataset", default="digits", show_default=True, help="data set spec, as for `edgefa train`")
@click.option("--width", type=POSITIVE, default=256, show_default=True, help="resmlp model dim")
@click.option("--depth", type=POSITIVE, default=4, show_default=True, help="resmlp blocks")
@click.option("--activation", type=click.Choice(["relu", "tanh", "gelu"]), default="relu", show_default=True)
@click.option("--epochs", type=POSITIVE, default=30, show_default=True)
@click.option("--train-batch", type=POSITIVE, default=32, show_default=True, help="training batch size")
@click.option("--lr", type=LEARNING_RATE, default=0.003, show_default=True)
@click.option("--momentum", type=MOMENTUM, default=0.9, show_default=True)
@click.option("--jobs", type=POSITIVE, default=1, show_default=True, help="runs at once, one process and thread each")
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda")
@protocol_options
@click.option("--out", type=OUT_FOLDER, required=True, help="folder for the runs and the audit files")
@force_option
def audit(configs, seeds, dataset, width, depth, activation, epochs, train_batch, lr, momentum, jobs, device, out,
          force, **protocol):
    """The protocol over BP, FA, DFA, hybrid and penalized DFA on the residual MLP, over seeds (table, plots)."""
    from dataclasses import asdict

    from .experiments.audit import AuditConfig, parse_configs, run_audit, table, write_outputs
    from .experiments.grid import parse_seeds

    config = AuditConfig(parse_configs(configs), parse_seeds(seeds), dataset, width, depth, activation, epochs,
                         train_batch, lr, momentum, jobs=jobs, device=device)
    config.check()                                   # a bad spec: one line, before torch is imported
    config.settings = asdict(protocol_settings(**protocol))
    check_out(out, "audit", force)
    with progress_bar() as bar:
        task = bar.add_task("audit", total=None, status="")

        def on_progress(what, done, total):
            bar.update(task, completed=done, total=total, status=what)

        result = run_audit(config, out, on_progress)
    header, rows = table(result)
    shown = ("config", "test acc %", "frozen-blocks acc %", "growth (a)", "||g_L|| (b)", "drift (c)", "verdict")
    t = Table(title=f"audit: resmlp {width}x{depth} on {dataset}, seeds {seeds} (every column: audit.md)")
    for col in shown:
        t.add_column(col, justify="left" if col in ("config", "verdict") else "right")
    for row in rows:
        t.add_row(*(escape(row[header.index(col)]) for col in shown))
    console.print(t)
    for path in write_outputs(result, out):
        console.print(f"wrote {path}")


# --- preference fine-tuning: a scorer on pairs, and the sweep over label noise and rules ---------

@cli.command("train-preference")
@click.option("--data", "data_spec", default="synthetic", show_default=True,
              help="synthetic[:N] (N pairs from a hidden utility, default 2000) | jsonl:FILE (prompt, chosen, "
                   "rejected per line)")
@click.option("--sigma", type=NON_NEGATIVE_FLOAT, default=0.0, show_default=True,
              help="synthetic: std of the Gaussian noise added to u(a) - u(b) before the label is drawn")
@click.option("--dim", type=POSITIVE, default=16, show_default=True, help="synthetic: features per item")
@click.option("--max-len", type=POSITIVE, default=128, show_default=True,
              help="jsonl: tokens per item (prompt bytes, SEP, response bytes; cut from the left)")
@click.option("--method", type=click.Choice(["bp", "fa", "dfa", "usf", "hybrid"]), default="dfa", show_default=True)
@click.option("--hybrid-every", type=POSITIVE, default=10, show_default=True, help="hybrid: every k-th step is a BP step")
@click.option("--loss", type=click.Choice(["bradley-terry", "hinge"]), default="bradley-terry", show_default=True,
              help="-log sigmoid(s_w - s_l) | max(0, m - (s_w - s_l))")
@click.option("--margin", type=NON_NEGATIVE_FLOAT, default=1.0, show_default=True, help="hinge: the margin m")
@click.option("--model", "model_kind", type=click.Choice(["mlp", "resmlp", "cnn", "vit", "transformer"]),
              default=None, help="the scorer (default: mlp for synthetic pairs, transformer for jsonl)")
@click.option("--hidden", type=WIDTHS, default="64,64", show_default=True, help="mlp: hidden widths, comma-separated")
@click.option("--width", type=POSITIVE, default=None, help="model dim of the other models (transformer 64)")
@click.option("--depth", type=POSITIVE, default=None, help="blocks of the other models (transformer 2)")
@click.option("--heads", type=POSITIVE, default=4, show_default=True, help="attention heads (transformer, vit)")
@click.option("--activation", type=click.Choice(["relu", "tanh", "gelu"]), default="relu", show_default=True,
              help="gelu: not for the mlp")
@click.option("--epochs", type=POSITIVE, default=20, show_default=True)
@click.option("--batch-size", type=POSITIVE, default=32, show_default=True, help="pairs per step")
@click.option("--lr", type=LEARNING_RATE, default=0.01, show_default=True)
@click.option("--momentum", type=MOMENTUM, default=0.9, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="synthetic pairs, held-out split, weights and batch order")
@click.option("--feedback-seed", type=SEED, default=1, show_default=True)
@click.option("--test-fraction", type=FRACTION, default=0.25, show_default=True, help="share of the pairs held out")
@click.option("--device", default="auto", show_default=True, help="auto (cuda when present) | cpu | cuda")
@click.option("--out", type=OUT_FOLDER, required=True, help="run directory to write")
@force_option
def train_preference(data_spec, sigma, dim, max_len, method, hybrid_every, loss, margin, model_kind, hidden, width,
                     depth, heads, activation, epochs, batch_size, lr, momentum, seed, feedback_seed, test_fraction,
                     device, out, force):
    """Train a scorer s(x) on preference pairs (chosen over rejected); write checkpoint.pt and metrics.json."""
    widths = list(hidden)
    check_out(out, "run", force)
    from .training.preference_train import is_token_pairs, load_pairs_spec, train_preference as run_training
    from .training.trainer import TrainConfig, save_run

    pairs = load_pairs_spec(data_spec, sigma, dim, seed, max_len)     # a bad file is one line, before the bar
    tokens = is_token_pairs(pairs)
    kind = model_kind or ("transformer" if tokens else "mlp")
    if tokens and kind != "transformer":
        raise EdgefaError(f"--data {data_spec}: token pairs need --model transformer, not {kind}")
    if kind == "mlp" and activation == "gelu":
        raise EdgefaError("--activation gelu is for resmlp, cnn, vit and transformer; the mlp takes relu or tanh")
    config = TrainConfig(method, data_spec, widths, activation, epochs, batch_size, lr, momentum, seed,
                         feedback_seed, test_fraction=test_fraction, hybrid_every=hybrid_every, device=device,
                         model=kind, width=width, depth=depth, heads=heads, loss=loss)
    with progress_bar() as bar:
        task = bar.add_task(f"train-preference {kind} {method}", total=epochs, status="")

        def on_epoch(epoch, row):
            bar.update(task, completed=epoch,
                       status=f"loss {row['batch_loss_mean']:.3f}  held-out {pct(row['test_accuracy'])}")

        try:
            run = run_training(config, pairs, margin=margin, on_epoch=on_epoch)
        except ValueError as exc:          # a model that does not fit the data (heads, width)
            raise EdgefaError(f"{kind}: {exc}") from None
    path = save_run(run, out)
    m = run.metrics
    extra = ""
    if m.get("heldout_ceiling") is not None:
        extra = (f"; ceiling {pct(m['heldout_ceiling'])} (labels that agree with the noise-free utility), "
                 f"agrees with the true utility on {pct(m['final_test_true_accuracy'])}")
    console.print(f"held-out preference accuracy [bold]{pct(m['final_test_accuracy'])}[/] on {m['n_test']} pairs"
                  f"{extra} ({kind} {method}, {escape(m['dataset'])}, {loss}, {epochs} epochs on {m['device']}) "
                  f"-> {escape(str(path))}", highlight=False)


@cli.group()
def experiment() -> None:
    """Grids of host runs that write a table, a plot and an HTML report."""


@experiment.command("preference")
@click.option("--sigmas", default="0,0.5,1,2", show_default=True, help="label noise levels, comma-separated")
@click.option("--rules", default="bp,dfa,hybrid-10", show_default=True,
              help="bp, fa, dfa, usf, hybrid-K (a BP step every K-th step), comma-separated")
@click.option("--seeds", default="0,1,2", show_default=True, help="seeds (pairs, split, weights, feedback, batches)")
@click.option("--pairs", type=counts(4), default=2000, show_default=True, help="synthetic pairs per run (held-out included)")
@click.option("--epochs", type=POSITIVE, default=10, show_default=True)
@click.option("--dim", type=POSITIVE, default=16, show_default=True, help="features per item")
@click.option("--hidden", type=WIDTHS, default="32,32", show_default=True, help="the MLP scorer's hidden widths")
@click.option("--activation", type=click.Choice(["relu", "tanh"]), default="relu", show_default=True)
@click.option("--batch-size", type=POSITIVE, default=32, show_default=True, help="pairs per step")
@click.option("--lr", type=LEARNING_RATE, default=0.01, show_default=True)
@click.option("--momentum", type=MOMENTUM, default=0.9, show_default=True)
@click.option("--loss", type=click.Choice(["bradley-terry", "hinge"]), default="bradley-terry", show_default=True)
@click.option("--margin", type=NON_NEGATIVE_FLOAT, default=1.0, show_default=True, help="hinge: the margin m")
@click.option("--test-fraction", type=FRACTION, default=0.25, show_default=True, help="share of the pairs held out")
@click.option("--device", default="auto", show_default=True, help="auto (cuda when present) | cpu | cuda")
@click.option("--out", type=OUT_FOLDER, required=True,
              help="folder for preference.json, preference.md, preference.svg and preference.html")
@force_option
def experiment_preference(sigmas, rules, seeds, pairs, epochs, dim, hidden, activation, batch_size, lr, momentum,
                          loss, margin, test_fraction, device, out, force):
    """Held-out preference accuracy against label noise sigma, per rule, over seeds (table and plot)."""
    from .experiments.grid import parse_seeds
    from .experiments.preference import (SweepConfig, parse_rules, parse_sigmas, run_sweep,
                                         summary, table_rows, write_outputs)

    config = SweepConfig(parse_sigmas(sigmas), parse_rules(rules), parse_seeds(seeds), pairs, epochs, dim, list(hidden),
                         activation, batch_size, lr, momentum, loss, margin, test_fraction, device)
    config.check()                         # every bad value is one line before torch is imported
    check_out(out, "preference-sweep", force)
    total = len(config.sigmas) * len(config.rules) * len(config.seeds)
    with progress_bar() as bar:
        task = bar.add_task("preference sweep", total=total, status="")
        result = run_sweep(config, on_run=lambda r: bar.update(task, advance=1, status=(
            f"sigma {r['sigma']:g} {r['rule']} seed {r['seed']}: {pct(r['heldout_accuracy'])}")))
    paths = write_outputs(result, out)
    header, rows = table_rows(result)
    table = Table(title=f"held-out preference accuracy ({len(config.seeds)} seeds"
                        + (", mean ± sample std" if len(config.seeds) > 1 else "") + ")")
    for name in header:
        table.add_column(escape(name), justify="right")
    for row in rows:
        table.add_row(*(escape(c) for c in row))
    console.print(table)
    ceiling = ", ".join(pct(m) for m, _ in summary(result)["ceiling"])
    console.print(f"ceiling: held-out labels that agree with the noise-free utility ({ceiling} at sigma "
                  f"{', '.join(f'{s:g}' for s in config.sigmas)}); {total} runs in {result['seconds']:.0f} s",
                  highlight=False)
    console.print("wrote " + ", ".join(escape(str(p)) for p in paths), highlight=False)


# --- device ----------------------------------------------------------------------------------

@cli.group()
def device() -> None:
    """Device-side commands (numpy + onnxruntime; no torch needed)."""


def _show_bundle(path, b=None) -> None:
    """The bundle's table; `b`: the bundle at `path`, when the caller has read it already."""
    from .bundle import describe_model, read_bundle

    b = b or read_bundle(path)
    m, opt = b.manifest, b.manifest["optimizer"]
    table = Table(title=f"bundle {b.path}", show_header=False)
    table.add_row("model", escape(describe_model(m["model"])))
    if m.get("loss", "").startswith("bradley"):
        table.add_row("loss", escape(m["loss"]) + " (a scorer trained on preference pairs)")
    fb = m["feedback"]
    table.add_row("update rule", escape(f"{m.get('update_rule', 'dfa')}  (feedback: {fb.get('distribution')}, "
                                        f"std {fb.get('std')}, seed {fb.get('seed')}; {fb.get('source')})"))
    table.add_row("optimizer", f"{opt['name']}  lr {opt['lr']}  momentum {opt['momentum']}")
    for name, f in m["files"].items():
        table.add_row(escape(name), f"{human_bytes(f['bytes'])}  sha256 {f['sha256'][:16]}…")
    table.add_row("size", human_bytes(b.size_bytes()))
    console.print(table)


@device.command()
@click.argument("bundle", type=click.Path())
def verify(bundle):
    """Verify a bundle (hashes, version, shapes; its graphs load and run a forward pass on the
    CPU) and show what it holds, its device state/ too."""
    from .bundle import read_bundle
    from .runtime.backends import open_checked_engine
    from .runtime.state import describe_state

    b = read_bundle(bundle)
    engine = open_checked_engine(b, "CPUExecutionProvider", threads=1)    # every check before any output
    state = describe_state(b, engine.state_names)
    _show_bundle(bundle, b)
    console.print("graphs: infer and train_step load in onnxruntime (forward pass on a zero batch: finite)",
                  highlight=False, soft_wrap=True)
    console.print(f"state/: {escape(state)}", highlight=False, soft_wrap=True)


@device.command("build-engine")
@click.argument("bundle", type=click.Path())
@click.option("--force", is_flag=True, help="rebuild even the engines that match this TensorRT and GPU")
def build_engine(bundle, force):
    """Build TensorRT engines for infer and train_step into BUNDLE/engines/ (where TensorRT lives)."""
    from .runtime.tensorrt_build import build_bundle_engines

    with progress_bar(transient=True) as bar:
        task = bar.add_task("tensorrt", total=None, status="")
        engines = build_bundle_engines(bundle, force, lambda graph: bar.update(task, status=f"building {graph}"))
    for graph, e in engines.items():
        console.print(f"{graph}: {e['file']} (TensorRT {e['tensorrt']}, {escape(e['gpu'])} sm {e['compute_capability']}, "
                      f"{e['precision']}{', refittable' if e.get('refittable') else ''}, "
                      f"batch {e['profile']['min']}..{e['profile']['max']})", highlight=False)


# --- fine-tuning's stops: shared by `device finetune`, `finetune` and `fleet finetune` ---------------

max_refusals_option = click.option(
    "--max-refusals", type=POSITIVE, default=DEFAULT_MAX_REFUSALS, show_default=True,
    help="stop after this many steps refused for NaN/Inf in one run (a diverged loss stops at once, "
         "rolled back to the last good checkpoint)")


@contextlib.contextmanager
def stopped_run_report(report: str | None):
    """A run that stops early (divergence, refusals) still writes --report: what it did up to the
    stop, and why (`stopped`); the error line follows."""
    from .runtime.divergence import RunStopped

    try:
        yield
    except RunStopped as stop:
        if report and stop.result is not None:
            write_json(report, stop.result)
        raise


def add_stop_rows(table: Table, result: dict) -> None:
    """Refused and rolled-back steps: always shown, 0 included."""
    table.add_row("refused steps", str(len(result["refused_steps"])))
    table.add_row("rolled-back steps", str(result["rolled_back_steps"]))


@device.command()
@click.argument("bundle", type=click.Path())
@click.option("--data", "data_spec", required=True,
              help="training data: FILE.npz (X, y) or mnist:DIR; a bradley-terry bundle: FILE.npz (chosen, rejected)")
@click.option("--steps", type=POSITIVE, required=True, help="total steps to reach (resumes from state/)")
@click.option("--batch-size", type=POSITIVE, default=32, show_default=True)
@click.option("--lr", type=LEARNING_RATE, default=None, help="learning rate (default: the bundle's)")
@click.option("--checkpoint-every", type=POSITIVE, default=50, show_default=True,
              help="steps between checkpoints (each one judged good first; the run's end always checkpoints)")
@max_refusals_option
@click.option("--seed", type=SEED, default=0, show_default=True, help="batch order seed")
@click.option("--threads", type=POSITIVE, default=None, help="onnxruntime intra-op threads")
@click.option("--provider", default=None,
              help="what runs the bundle: tensorrt (the bundle's own engines) or an onnxruntime execution provider "
                   "(default: the bundle's engines if built for this device, else TensorRT EP, CUDA EP, CPU)")
@click.option("--eval", "eval_spec", default=None, help="evaluation data (accuracy before and after)")
@click.option("--report", type=OUT_FILE, default=None, help="write the report as JSON")
def finetune(bundle, data_spec, steps, batch_size, lr, checkpoint_every, max_refusals, seed, threads,
             provider, eval_spec, report):
    """Fine-tune a bundle on this device with DFA (onnxruntime or its TensorRT engines), checkpointing into BUNDLE/state/."""
    from .bundle import read_bundle
    from .shared.datasets import load_dataset
    from .runtime.finetune import FinetuneConfig, Finetuner, is_preference, load_pairs

    b = read_bundle(bundle)
    load = load_pairs if is_preference(b) else load_dataset    # pairs: an npz of chosen and rejected
    train_data = load(data_spec)
    eval_data = load(eval_spec) if eval_spec else None
    config = FinetuneConfig(steps, batch_size, lr, checkpoint_every, max_refusals, seed, threads, provider)
    tuner = Finetuner(b, train_data, config, eval_data)  # every input check happens here, before the bar
    with stopped_run_report(report), progress_bar() as bar:
        task = bar.add_task("device dfa", total=steps, completed=tuner.start, status="")
        result = tuner.run(on_step=lambda s, loss: bar.update(task, completed=s, status=f"loss {loss:.3f}"))
        bar.update(task, completed=result["final_step"])
    if report:
        write_json(report, result)
    table = Table(title="device fine-tuning (DFA, onnxruntime)", show_header=False)
    table.add_row("steps", f"{result['resumed_from_step']} -> {result['final_step']}"
                  + ("  (resumed)" if result["resumed_from_step"] else ""))
    if result["loss_first"] is not None:
        table.add_row("loss", f"{result['loss_first']:.4f} -> {result['loss_last']:.4f}")
    if result["accuracy_before"] is not None:
        table.add_row(result["metric"], f"{pct(result['accuracy_before'])} -> {pct(result['accuracy_after'])}")
    if result["step_time_ms_median"] is not None:
        table.add_row("step time", f"median {result['step_time_ms_median']:.2f} ms, p95 {result['step_time_ms_p95']:.2f} ms")
    add_stop_rows(table, result)
    table.add_row("peak RSS", human_bytes(result["peak_rss_bytes"]))
    table.add_row("providers", ", ".join(result["providers"]))
    console.print(table)


@device.command()
@click.argument("bundle", type=click.Path())
@click.option("--data", "data_spec", required=True, help="FILE.npz (X, y) or mnist:DIR")
def evaluate(bundle, data_spec):
    """Accuracy of the bundle's current weights (its device state when present)."""
    from .bundle import read_bundle
    from .shared.datasets import load_dataset
    from .runtime.finetune import evaluate as run_evaluate

    result = run_evaluate(read_bundle(bundle), load_dataset(data_spec))
    console.print(f"accuracy [bold]{pct(result['accuracy'])}[/] on {result['samples']} samples "
                  f"(device state at step {result['step']})")


# --- the link: a device server, and the host commands that drive it -------------------------

def link_options(f):
    """--key-file and --baud, shared by every command that opens a link."""
    f = click.option("--baud", type=POSITIVE, default=115200, show_default=True,
                     help="line rate for a real serial port (ignored by sockets and pseudo-terminals)")(f)
    return click.option("--key-file", type=click.Path(exists=True, dir_okay=False), default=None,
                        help="shared key: authenticate every frame with HMAC-SHA256")(f)


def remote_finetune_options(f):
    """The options of fine-tuning over a link, shared by `finetune` and `fleet finetune`."""
    for option in reversed([
        click.option("--data", "data_spec", required=True, help="training data: FILE.npz (X, y) or mnist:DIR"),
        click.option("--steps", type=POSITIVE, required=True,
                     help="total device steps to reach (continues from the device's step)"),
        click.option("--batch-size", type=POSITIVE, default=32, show_default=True),
        click.option("--lr", type=LEARNING_RATE, default=None, help="learning rate (default: the bundle's)"),
        click.option("--seed", type=SEED, default=0, show_default=True, help="batch order seed"),
        click.option("--eval", "eval_spec", default=None, help="evaluation data (accuracy before and after)"),
        max_refusals_option,
    ]):
        f = option(f)
    return f


def _client(url: str, key_file, baud):
    from .link.client import ClientConfig, DeviceClient, read_key

    return DeviceClient(url, ClientConfig(key=read_key(key_file), baudrate=baud))


def transfer_bar(transient: bool = False) -> Progress:
    from rich.progress import DownloadColumn, TransferSpeedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeElapsedColumn(), console=err_console, transient=transient)


@device.command()
@click.option("--port", default=None, help="serve on a serial port: a pyserial URL (/dev/ttyGS0, "
              "loop://) or 'pty' (make a pseudo-terminal and print its path)")
@click.option("--listen", "listen_address", type=LISTEN_ADDRESS, default=None,
              help="serve over TCP on ADDR:PORT (port 0: any free port)")
@click.option("--store", type=OUT_FOLDER, required=True,
              help="directory for the deployed bundle, its checkpoints and uploads")
@click.option("--checkpoint-every", type=POSITIVE, default=10, show_default=True,
              help="steps between automatic checkpoints (a killed server loses at most these)")
@click.option("--provider", default=None,
              help="what runs the bundle: tensorrt (the bundle's own engines) or an onnxruntime execution provider "
                   "(default: the bundle's engines if built for this device, else TensorRT EP, CUDA EP, CPU)")
@click.option("--threads", type=POSITIVE, default=None, help="onnxruntime intra-op threads")
@click.option("--max-bundle-mb", type=POSITIVE, default=256, show_default=True, help="largest bundle accepted")
@click.option("--profile", "profile_name", default=None,
              help="device profile name or TOML file (default: detected); used for energy estimates")
@click.option("--idle-timeout", type=POSITIVE_FLOAT, default=60.0, show_default=True, metavar="SECONDS",
              help="TCP: drop a host silent this long between requests (before its HELLO or stalled "
                   "mid-frame: 10 s, or this when shorter); a serial line: serve another host once the "
                   "session has been silent this long")
@click.option("--keep-retired", type=click.IntRange(0, 100), default=3, show_default=True,
              help="replaced bundles that hold device state to keep in STORE/retired/ once they leave "
                   "bundle.prev (oldest removed; `device pull --kept` brings one back)")
@link_options
def serve(port, listen_address, store, checkpoint_every, provider, threads, max_bundle_mb, profile_name,
          idle_timeout, keep_retired, key_file, baud):
    """Serve this device to a host over a serial line or TCP (one host at a time)."""
    from .link.client import read_key
    from .link.server import PeerTimeouts, serve as run_server, stop_on_sigterm
    from .link.service import DeviceService, ServiceConfig
    from .profiling.machine import open_profiler

    if (port is None) == (listen_address is None):
        raise click.UsageError("give exactly one of --port URL and --listen ADDR:PORT")
    if listen_address is not None and not listen_address.startswith((":", "127.", "localhost:", "[::1]:")):
        err_console.print(f"[yellow]warning:[/] listening on {escape(listen_address)}: reachable beyond this "
                          "machine" + ("" if key_file else ", and without a shared key (--key-file)"))
    key = read_key(key_file)

    def say(line: str) -> None:
        click.echo(f"edgefa device server: {line}", err=True)

    from .runtime.backends import runs_on_gpu

    from .out_folders import check_store_folder

    # before anything is created: a bundle given as the store, an address that cannot be bound
    # (in use, not this machine's: a probe bound and closed at once; the server binds it again)
    check_store_folder(store)
    if listen_address is not None:
        from .link.transport import listen

        listen(listen_address).close()
    profiler, machine = open_profiler(profile_name, work_on_gpu=runs_on_gpu(provider))
    # the store first: a store in use by another process is one error line, nothing before it
    service = DeviceService(ServiceConfig(Path(store), checkpoint_every, provider, threads,
                                          max_bundle_bytes=max_bundle_mb << 20, keep_retired=keep_retired),
                            profiler.start(), log=say)
    say(f"device profile {machine.profile.name} ({machine.how_recognized}); {machine.energy_line}")
    service.machine = {"name": machine.profile.name, "display_name": machine.profile.display_name,
                       "detected": bool(machine.profile.detected), "how": machine.how_recognized}
    stop_on_sigterm()

    def ready(line: str) -> None:
        click.echo(f"edgefa device server: {line}")   # stdout, one line: what a script waits for
        sys.stdout.flush()

    run_server(service, port=port, listen_address=listen_address, key=key, baudrate=baud,
               ready=ready, log=say, timeouts=PeerTimeouts.from_idle(idle_timeout))


@device.command()
@click.argument("url")
@link_options
@click.option("--json", "as_json", is_flag=True, help="print the raw answer as JSON")
def info(url, key_file, baud, as_json):
    """What a device is and holds: versions, execution providers, bundle, step."""
    with _client(url, key_file, baud) as dev:
        answer = dev.info()
    answer.pop("ok", None)
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    console.print(_info_table(url, answer))


def _info_table(url: str, answer: dict) -> Table:
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


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--device", "url", required=True, help="the device: a pyserial URL (/dev/ttyUSB0, socket://HOST:PORT)")
@link_options
def deploy(bundle, url, key_file, baud):
    """Send a bundle to a device in acknowledged, resumable chunks; the device verifies it."""
    from .bundle import read_bundle

    read_bundle(bundle)   # a bad bundle stops here, before anything is sent
    # transient: the line printed below says what was sent; a refusal is then the only line
    with _client(url, key_file, baud) as dev, transfer_bar(transient=True) as bar:
        task = bar.add_task(f"deploy -> {url}", total=None)
        result = dev.deploy(bundle, on_progress=lambda done, total: bar.update(task, completed=done, total=total))
        stats = dev.stats
    console.print(escape(deploy_lines(result, url))
                  + (f" ({stats.retransmits} frames repeated, {dev.reconnects} reconnects)"
                     if stats.retransmits or dev.reconnects else ""), soft_wrap=True)


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


@cli.command("finetune")
@click.option("--device", "url", required=True, help="the device: a pyserial URL")
@remote_finetune_options
@click.option("--report", type=OUT_FILE, default=None, help="write the report as JSON")
@link_options
def finetune_remote(url, data_spec, steps, batch_size, lr, seed, eval_spec, max_refusals, report, key_file, baud):
    """Fine-tune the bundle on a device, sending it one batch per step over the link."""
    from .shared.datasets import load_dataset

    train_data = load_dataset(data_spec)
    eval_data = load_dataset(eval_spec) if eval_spec else None
    with _client(url, key_file, baud) as dev:
        start = dev.check_data(train_data.X, train_data.y, data_spec)["step"]   # all the data, before any is sent
        if start >= steps:            # --steps is the total to reach, not a count to add
            console.print(f"the device is already at step {start} (>= --steps {steps}): nothing to do")
            return
        if eval_data:
            dev.check_data(eval_data.X, eval_data.y, eval_spec)
        before = dev.evaluate(eval_data.X, eval_data.y) if eval_data else None
        with stopped_run_report(report), progress_bar() as bar:
            task = bar.add_task(f"dfa on {url}", total=steps, completed=start, status="")
            result = dev.finetune(train_data.X, train_data.y, steps, batch_size, seed, lr,
                                  on_step=lambda s, loss, rtt: bar.update(task, completed=s,
                                                                          status=f"loss {loss:.3f}  rtt {rtt:.1f} ms"),
                                  max_refusals=max_refusals)
        after = dev.evaluate(eval_data.X, eval_data.y) if eval_data else None
        profile = dev.profile(samples=False)
        stats = dev.stats.as_dict()
    result.update(accuracy_before=before and before["accuracy"], accuracy_after=after and after["accuracy"],
                  device_peak_rss_bytes=profile["memory"]["peak_rss_bytes"], link=stats)
    if report:
        write_json(report, result)
    table = Table(title=f"fine-tuning on {escape(url)} (DFA, over the link)", show_header=False)
    table.add_row("steps", f"{result['resumed_from_step']} -> {result['final_step']}")
    if result["loss_first"] is not None:
        table.add_row("loss", f"{result['loss_first']:.4f} -> {result['loss_last']:.4f}")
    if before:
        table.add_row("accuracy", f"{pct(before['accuracy'])} -> {pct(after['accuracy'])}")
    if result["step_ms_median"] is not None:
        table.add_row("step time on the device", f"median {result['step_ms_median']:.2f} ms")
        table.add_row("round trip per step", f"median {result['round_trip_ms_median']:.2f} ms "
                                             f"(link overhead {result['link_overhead_ms_median']:.2f} ms)")
    add_stop_rows(table, result)
    table.add_row("link", f"{stats['frames_sent']} frames sent, {stats['retransmits']} repeated, "
                          f"{stats['corrupt']} damaged received, {result['reconnects']} reconnects")
    table.add_row("device peak RSS", human_bytes(profile["memory"]["peak_rss_bytes"]))
    console.print(table)


@device.command()
@click.argument("url")
@click.option("--out", type=OUT_FOLDER, required=True, help="bundle directory to write")
@click.option("--kept", default=None, metavar="NAME",
              help="pull a bundle a deploy replaced, with its state: bundle.prev or retired/NAME "
                   "(as the deploy line and `device info` name them)")
@force_option
@link_options
def pull(url, out, kept, force, key_file, baud):
    """Bring a device's bundle back with its current weights (a checkpoint is taken first)."""
    from .bundle import read_bundle
    from .runtime.state import load_state

    check_out(out, "bundle", force)
    with _client(url, key_file, baud) as dev, transfer_bar() as bar:
        task = bar.add_task(f"pull <- {url}" + (f" ({kept})" if kept else ""), total=None)
        path = dev.pull(out, on_progress=lambda done, total: bar.update(task, completed=done, total=total), kept=kept)
    saved = load_state(read_bundle(path), [])
    console.print(f"pulled {escape(str(path))} ({escape(kept) + ', its' if kept else 'device'} state at step "
                  f"{saved.step if saved else 0})")


# --- fleets: several devices at once ------------------------------------------------------------

@cli.group()
def fleet() -> None:
    """Drive every device of an inventory file at once (one line of progress each)."""


inventory_option = click.option("--inventory", type=click.Path(exists=True, dir_okay=False), required=True,
                                help="devices.toml: [[device]] tables with name, url, optional key_file, baud")


def _fleet_summary(title: str, results, columns: list[str], row) -> None:
    """Print one row per device, then fail with one line if any device failed."""
    table = Table(title=title)
    for c in ["device", "url", *columns, "time", "status"]:
        table.add_column(c)
    for r in results:
        cells = row(r.result) if r.ok else ["-"] * len(columns)
        table.add_row(escape(r.device.name), escape(r.device.url), *cells, f"{r.seconds:.1f} s",
                      "[green]ok[/]" if r.ok else f"[red]{escape(r.error)}[/]")
    console.print(table)
    failed = [r for r in results if not r.ok]
    if failed:
        raise EdgefaError(f"{len(failed)} of {len(results)} devices failed: "
                          + "; ".join(f"{r.device.name}: {r.error}" for r in failed))


@fleet.command("info")
@inventory_option
def fleet_info(inventory):
    """Versions, providers, bundle and step of every device."""
    from .link.fleet import load_inventory, run_fleet

    results = run_fleet(load_inventory(inventory), lambda entry, dev: dev.info())
    _fleet_summary("fleet", results, ["device", "providers", "bundle", "step"],
                   lambda a: [escape(str(a["device"]["model"])), escape(", ".join(a["providers"]["chosen"])),
                              (a["bundle"] or "none")[:12], str(a["step"])])


@fleet.command("deploy")
@click.argument("bundle", type=click.Path())
@inventory_option
def fleet_deploy(bundle, inventory):
    """Send one bundle to every device."""
    from .bundle import read_bundle
    from .link.fleet import load_inventory, run_fleet

    read_bundle(bundle)
    entries = load_inventory(inventory)
    with transfer_bar() as bar:
        tasks = {e.name: bar.add_task(f"deploy -> {e.name}", total=None) for e in entries}

        def action(entry, dev):
            result = dev.deploy(bundle, on_progress=lambda done, total: bar.update(tasks[entry.name],
                                                                                 completed=done, total=total))
            return {**result, "retransmits": dev.stats.retransmits, "reconnects": dev.reconnects}

        results = run_fleet(entries, action)
    _fleet_summary(f"fleet deploy {escape(str(bundle))}", results, ["archive", "step", "repeats"],
                   lambda a: [human_bytes(a["archive_bytes"]), str(a["step"]), str(a["retransmits"])])


@fleet.command("finetune")
@inventory_option
@remote_finetune_options
def fleet_finetune(inventory, data_spec, steps, batch_size, lr, seed, eval_spec, max_refusals):
    """Fine-tune every device on the same data, all at once (a device that stops, diverged or
    refusing, is rolled back and reported; the others carry on)."""
    from .shared.datasets import load_dataset
    from .link.fleet import load_inventory, run_fleet

    entries = load_inventory(inventory)
    train_data = load_dataset(data_spec)
    eval_data = load_dataset(eval_spec) if eval_spec else None
    with progress_bar() as bar:
        tasks = {e.name: bar.add_task(f"dfa on {e.name}", total=steps, status="") for e in entries}

        def action(entry, dev):
            dev.check_data(train_data.X, train_data.y, data_spec)        # all the data, before any is sent
            if eval_data:
                dev.check_data(eval_data.X, eval_data.y, eval_spec)
            before = dev.evaluate(eval_data.X, eval_data.y)["accuracy"] if eval_data else None
            result = dev.finetune(train_data.X, train_data.y, steps, batch_size, seed, lr,
                                  on_step=lambda s, loss, rtt: bar.update(tasks[entry.name], completed=s,
                                                                          status=f"loss {loss:.3f}"),
                                  max_refusals=max_refusals)
            after = dev.evaluate(eval_data.X, eval_data.y)["accuracy"] if eval_data else None
            bar.update(tasks[entry.name], completed=result["final_step"])
            return {**result, "accuracy_before": before, "accuracy_after": after}

        results = run_fleet(entries, action)
    _fleet_summary("fleet fine-tuning (DFA)", results, ["steps", "loss", "accuracy", "round trip",
                                                        "refused", "rolled back"],
                   lambda a: [f"{a['resumed_from_step']} -> {a['final_step']}",
                              f"{a['loss_last']:.4f}" if a["loss_last"] is not None else "-",
                              f"{pct(a['accuracy_before'])} -> {pct(a['accuracy_after'])}" if eval_data else "-",
                              f"{a['round_trip_ms_median']:.2f} ms" if a["round_trip_ms_median"] else "-",
                              str(len(a["refused_steps"])), str(a["rolled_back_steps"])])


# --- device profiles, budgets and profiling (device side: no torch) ------------------------------

@cli.group()
def profiles() -> None:
    """Device profiles: what each device can compute, hold and measure (one TOML file per device)."""


def _profile_table(p) -> Table:
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


@profiles.command("list")
def profiles_list():
    """The device profiles edgefa knows."""
    from .device_profiles import list_profiles, load_profile

    from rich import box

    # a light frame so that it fits 80 columns whole: the names are what --profile takes
    table = Table(title="device profiles (edgefa profiles show NAME for the whole of one)",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("name", "CPU", "GPU TFLOP/s", "memory", "GB/s", "idle", "sensor"):
        table.add_column(col, justify="right" if col in ("GPU TFLOP/s", "GB/s", "idle") else "left",
                         no_wrap=col in ("name", "sensor"), min_width=20 if col == "name" else None)
    for name in list_profiles():
        p = load_profile(name)
        table.add_row(p.name, f"{p.cpu_cores}x {p.cpu_max_clock_ghz:g} GHz",
                      f"{p.gpu_fp32_tflops:g}" if p.gpu_fp32_tflops else "-", human_bytes(p.memory_bytes),
                      f"{p.memory_bandwidth_gbps:g}", f"{p.idle_power_w:g} W", p.sensor_backend)
    console.print(table)


@profiles.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="print the profile as JSON")
def profiles_show(name, as_json):
    """One device profile (a name from `profiles list`, or a TOML file)."""
    from .device_profiles import load_profile

    p = load_profile(name)
    if as_json:
        click.echo(json.dumps(p.as_dict(), indent=2))
    else:
        console.print(_profile_table(p))


@profiles.command("detect")
@click.option("--json", "as_json", is_flag=True, help="print the profile as JSON")
def profiles_detect(as_json):
    """The profile of this machine: a Jetson or Raspberry Pi by its device tree (or L4T release),
    otherwise a generic host filled in by detection."""
    from .device_profiles import detect_profile

    p, how = detect_profile()
    if as_json:
        click.echo(json.dumps({**p.as_dict(), "how": how}, indent=2))
        return
    console.print(f"this machine: [bold]{escape(p.name)}[/] ({escape(how)})")
    console.print(_profile_table(p))


@cli.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--profile", "profile_name", default=None, help="device profile name or TOML (default: detected)")
@click.option("--batch", "batch_size", type=POSITIVE, default=32, show_default=True)
@click.option("--provider", default=None, help="execution provider that would run it (default: the profile's first)")
@click.option("--samples", type=COUNT, default=0, help="fine-tuning samples held on the device")
@click.option("--json", "as_json", is_flag=True, help="print the budget as JSON")
def budget(bundle, profile_name, batch_size, provider, samples, as_json):
    """Predict peak memory and a lower bound on step time of fine-tuning BUNDLE on a device."""
    from .bundle import read_bundle
    from .device_profiles import detect_profile, load_profile
    from .device_profiles.budget import budget as predict

    b = read_bundle(bundle)
    p = load_profile(profile_name) if profile_name else detect_profile()[0]
    result = predict(b.manifest, p, batch_size, provider, samples)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    table = Table(title=escape(f"budget: {Path(bundle).name} on {p.display_name}, batch {batch_size}"))
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


class DefaultCommandGroup(click.Group):
    """A group whose first argument, when it names no subcommand, goes to `default_command`:
    `edgefa profile BUNDLE ...` is `edgefa profile run BUNDLE ...`, beside `edgefa profile compare`."""

    default_command = "run"

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


def profile_options(f):
    options = [
        click.option("--steps", type=POSITIVE, default=200, show_default=True),
        click.option("--batch", "batch_size", type=POSITIVE, default=32, show_default=True),
        click.option("--data", "data_spec", default=None,
                     help="npz:FILE | digits | mnist:DIR (default: seeded Gaussian samples of the bundle's shape)"),
        click.option("--out", type=OUT_FOLDER, required=True, help="report directory to write"),
        click.option("--device", "url", default=None,
                     help="profile on a device over the link (a pyserial URL): the steps run in a scratch session "
                          "on the bundle it serves, which must be BUNDLE, and are undone; the device's state is unchanged"),
        click.option("--deploy", is_flag=True,
                     help="with --device: deploy BUNDLE first when the device serves another bundle (that bundle "
                          "and its state are kept on the device as bundle.prev, as `edgefa deploy` does)"),
        click.option("--profile", "profile_name", default=None, help="device profile (default: detected)"),
        click.option("--warmup", type=COUNT, default=5, show_default=True,
                     help="windows of each repeated phase left out of the statistics"),
        click.option("--interval", type=Finite(min=0.001), default=0.02, show_default=True,
                     help="energy and memory sampling interval, seconds"),
        click.option("--threads", type=POSITIVE, default=None, help="onnxruntime intra-op threads"),
        click.option("--seed", type=SEED, default=0, show_default=True),
        force_option,
    ]
    for option in reversed(options):
        f = option(f)
    return link_options(f)


def _profile_config(steps, batch_size, warmup, interval, threads, seed, profile_name):
    from .profile_runs.session import ProfileConfig
    return ProfileConfig(steps=steps, batch_size=batch_size, warmup=warmup, sample_interval_s=interval,
                         threads=threads, seed=seed, profile=profile_name)


@cli.group(cls=DefaultCommandGroup)
def profile() -> None:
    """Profile fine-tuning: `edgefa profile BUNDLE --out DIR` (locally or --device URL), and
    `edgefa profile compare BUNDLE --out DIR` (DFA on the device runtime against BP in torch)."""


@profile.command("run")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@profile_options
def profile_run(bundle, steps, batch_size, data_spec, out, url, deploy, profile_name, warmup, interval, threads, seed,
                force, key_file, baud):
    """Run fine-tuning steps under the profiler; write profile.json and report.html into --out."""
    from .shared.datasets import load_dataset
    from .profile_runs.session import profile_local, profile_over_link
    from .report.html import render_profile_report, write_report

    cfg = _profile_config(steps, batch_size, warmup, interval, threads, seed, profile_name)
    _check_deploy_flag(deploy, url)
    check_out(out, "profile", force)
    data = load_dataset(data_spec) if data_spec else None
    with progress_bar(transient=True) as bar:
        task = bar.add_task(f"profiling on {url or 'this machine'}", total=steps, status="")
        on_step = (lambda s, loss, *rest: bar.update(task, advance=1, status=f"loss {loss:.3f}"))
        if url:
            with _client(url, key_file, baud) as dev:
                result = profile_over_link(dev, bundle, cfg, data, on_step=on_step, deploy=deploy)
        else:
            result = profile_local(bundle, cfg, data, on_step=on_step)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(result, indent=1))
    write_report(out / "report.html", render_profile_report(result))
    console.print(_phases_table(result))
    _print_device_state(result, url)
    console.print(f"wrote {out / 'profile.json'} and {out / 'report.html'}")


def _check_deploy_flag(deploy: bool, url: str | None) -> None:
    if deploy and not url:
        raise click.UsageError("--deploy needs --device URL (a local profile runs on a scratch copy of BUNDLE)")


def _print_device_state(result: dict, url: str | None) -> None:
    """After a profile over the link: what it did to the device (nothing, unless --deploy deployed)."""
    state = result.get("device_state")
    if not state:
        return
    if state["deployed"]:
        console.print(escape(deploy_lines(state["deployed"], url)), soft_wrap=True)
    console.print(f"the profile's steps ran in a scratch session and were undone: the device is at step "
                  f"{state['step_after']}, as before them", soft_wrap=True)


def _phases_table(result: dict) -> Table:
    energy = result["energy"]
    table = Table(title=escape(result["title"]))
    for col in ("phase", "windows", "p50 ms", "p95 ms", "p99 ms", "total s",
                f"energy p50 ({energy['method']})"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    for name, ph in result["phases"].items():
        lat = ph["latency_ms"]
        table.add_row(name, str(ph["count"]), *(f"{lat[q]:.3f}" if q in lat else "-" for q in ("p50", "p95", "p99")),
                      f"{ph['total_s']:.3f}", energy_text(ph["energy_j"]["per_window_p50"], ph["energy_j"]["method"]))
    mem = result["memory"]
    table.caption = escape(f"peak RSS {human_bytes(mem['peak_rss_bytes'])}; energy: {energy['backend']}"
                           + (f"; notes: {'; '.join(energy['notes'])}" if energy["notes"] else ""))
    if result.get("link"):
        rt = result["link"]["round_trip_ms"]
        table.caption += escape(f"; round trip p50 {rt.get('p50', float('nan')):.2f} ms")
    return table


@profile.command("compare")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@profile_options
def profile_compare(bundle, steps, batch_size, data_spec, out, url, deploy, profile_name, warmup, interval, threads,
                    seed, force, key_file, baud):
    """DFA on the device runtime (locally, or on --device) against BP in torch on this host: the same
    model, batches and energy source; writes compare.json and compare.html with the ratios."""
    from .profile_runs.compare import compare, run_in_process
    from .profile_runs.session import profile_over_link
    from .report.html import render_compare_report, write_report

    cfg = _profile_config(steps, batch_size, warmup, interval, threads, seed, profile_name)
    _check_deploy_flag(deploy, url)
    check_out(out, "profile-compare", force)
    with progress_bar(transient=True) as bar:
        task = bar.add_task("dfa on " + (url or "the device runtime (own process)"), total=None, status="")
        if url:
            from .shared.datasets import load_dataset
            with _client(url, key_file, baud) as dev:
                dfa = profile_over_link(dev, bundle, cfg, load_dataset(data_spec) if data_spec else None,
                                        deploy=deploy)
        else:
            dfa = run_in_process("edgefa.profile_runs.session", bundle, cfg, data_spec)
        bar.update(task, total=1, completed=1)
        task = bar.add_task("bp in torch (own process)", total=None, status="")
        bp = run_in_process("edgefa.training.bp_profile", bundle, cfg, data_spec)
        bar.update(task, total=1, completed=1)
    result = compare(dfa, bp)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    write_report(out / "compare.html", render_compare_report(result))
    table = Table(title=escape(result["title"]))
    for col in ("", "dfa", "bp", "dfa / bp"):
        table.add_column(col, justify="right" if col else "left")
    r = result["ratios"]
    method = result["energy_method"]
    table.add_row("step time p50", *(f"{run['phases']['train_step']['latency_ms'].get('p50', float('nan')):.3f} ms"
                                     for run in (dfa, bp)), f"{r['step_time_p50']:.2f}")
    table.add_row("peak RSS", human_bytes(dfa["memory"]["peak_rss_bytes"]), human_bytes(bp["memory"]["peak_rss_bytes"]),
                  f"{r['peak_rss']:.2f}")
    table.add_row(f"energy per step ({method})", energy_text(dfa["energy"]["per_step_j"], dfa["energy"]["method"]),
                  energy_text(bp["energy"]["per_step_j"], bp["energy"]["method"]),
                  "-" if r["energy_per_step"] is None else f"{r['energy_per_step']:.2f}")
    console.print(table)
    _print_device_state(dfa, url)
    console.print(f"wrote {out / 'compare.json'} and {out / 'compare.html'}")


# --- the FPGA simulator and the accelerator cost model (device side: no torch) ------------------

@cli.group()
def fpga() -> None:
    """Fixed-point DFA in bit-exact simulation, and a cost model of a MAC-array accelerator."""


# (fpga simulate / sweep: numerics, below)

def _fpga_inputs(bundle, data_spec, eval_spec, config_path, lr):
    from .bundle import read_bundle
    from .shared.datasets import load_dataset
    from .fpga_sim.config import load_config
    from .fpga_sim.scope import require_full_mlp_dfa
    from .fpga_sim.simulate import float_reference_engine

    fxp = load_config(config_path)       # a bad config is refused before anything is read or run
    b = read_bundle(bundle)
    require_full_mlp_dfa(b.manifest, bundle)     # a bundle the datapath does not model: before the data
    fxp.learning_rate(b.manifest["optimizer"]["lr"] if lr is None else lr)   # one it cannot hold, too
    data = load_dataset(data_spec), load_dataset(eval_spec) if eval_spec else None
    engine = float_reference_engine(b)           # graphs that do not load: one line, before any output
    return b, *data, fxp, engine


def _sqnr_text(db: float | None) -> str:
    return "identical" if db is None else f"{db:.1f} dB"


def fpga_run_options(steps: int, config_help: str):
    """BUNDLE and the fine-tuning options shared by `fpga simulate` and `fpga sweep`."""
    def decorate(f):
        for option in reversed([
            click.argument("bundle", type=click.Path()),
            click.option("--data", "data_spec", required=True, help="training data: FILE.npz (X, y) or mnist:DIR"),
            click.option("--eval", "eval_spec", default=None, help="evaluation data (default: the training data)"),
            click.option("--steps", type=POSITIVE, default=steps, show_default=True),
            click.option("--batch-size", type=POSITIVE, default=32, show_default=True),
            click.option("--lr", type=LEARNING_RATE, default=None, help="learning rate (default: the bundle's)"),
            click.option("--seed", type=SEED, default=0, show_default=True, help="batch order seed"),
            click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help=config_help),
        ]):
            f = option(f)
        return f
    return decorate


@fpga.command()
@fpga_run_options(200, "fixed-point formats per tensor class (TOML; default: 16-bit data, 48-bit accumulators)")
@click.option("--json", "json_path", type=OUT_FILE, default=None, help="write the result as JSON")
def simulate(bundle, data_spec, eval_spec, steps, batch_size, lr, seed, config_path, json_path):
    """Fine-tune BUNDLE with DFA in bit-exact fixed point and, beside it, in float32 (onnxruntime)."""
    from .fpga_sim.simulate import SimulateConfig, simulate as run_simulate

    b, train_data, eval_data, fxp, engine = _fpga_inputs(bundle, data_spec, eval_spec, config_path, lr)
    with progress_bar() as bar:
        task = bar.add_task("fixed-point dfa", total=steps, status="")
        result = run_simulate(b, train_data, SimulateConfig(steps, batch_size, lr, seed), fxp, eval_data, engine=engine,
                              on_step=lambda s, lf, l32: bar.update(
                                  task, completed=s, status=f"loss {lf:.3f} (float32 {l32:.3f})"))
    if json_path:
        write_json(json_path, result)
    before, after = result["accuracy_before"], result["accuracy_after"]
    table = Table(title=f"fixed point vs float32: {steps} DFA steps, batch {batch_size}, "
                        f"lr {result['lr_fixed_point']:.6g} ({result['lr_mode']})")
    table.add_column("")
    table.add_column("fixed point", justify="right")
    table.add_column("float32 (onnxruntime)", justify="right")
    table.add_row(f"accuracy before ({result['eval_data']}, {result['eval_samples']} samples)",
                  pct(before["fixed"]), pct(before["float32"]))
    table.add_row("accuracy after", f"[bold]{pct(after['fixed'])}[/]", f"[bold]{pct(after['float32'])}[/]")
    table.add_row("loss, last step", f"{result['loss_last']['fixed']:.4f}", f"{result['loss_last']['float32']:.4f}")
    console.print(table)
    layers = Table(title="per-layer SQNR (over all elements of the layer)")
    for col in ("layer", "datapath (same weights)", "weights after the run"):
        layers.add_column(col, justify="left" if col == "layer" else "right")
    for name, db in result["datapath_sqnr_db"].items():
        layers.add_row(name, _sqnr_text(db), _sqnr_text((result["weight_sqnr_db"] or {}).get(name)))
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


@fpga.command()
@fpga_run_options(100, "formats of the classes not swept (TOML)")
@click.option("--widths", type=WIDTHS, default="6,8,10,12,14,16", show_default=True, help="word lengths W, comma-separated")
@click.option("--int-bits", type=click.IntRange(-256, 256), default=2, show_default=True, help="integer bits I of the swept formats")
@click.option("--rounding", "roundings", default="AP_RND_CONV,STOCHASTIC", show_default=True,
              help="rounding modes, comma-separated")
@click.option("--classes", default="weights,optimizer_state", show_default=True,
              help="tensor classes that get ap_fixed<W,I,mode,AP_SAT>")
@click.option("--out", type=OUT_FOLDER, required=True,
              help="folder for sweep.json, sweep.md, sweep.svg and sweep.html")
@force_option
def sweep(bundle, data_spec, eval_spec, steps, batch_size, lr, seed, config_path, widths, int_bits, roundings,
          classes, out, force):
    """Accuracy against word length, one line per rounding mode (a table and a plot)."""
    from .fpga_sim.simulate import SimulateConfig
    from .fpga_sim.sweep import FormatGrid, markdown_table, sweep as run_sweep
    from .report.html import render_sweep_report, standalone_svg, sweep_chart, write_report

    grid = FormatGrid(widths, tuple(r.strip() for r in roundings.split(",") if r.strip()),
                      int_bits, tuple(c.strip() for c in classes.split(",") if c.strip()))
    b, train_data, eval_data, fxp, engine = _fpga_inputs(bundle, data_spec, eval_spec, config_path, lr)
    check_out(out, "fpga-sweep", force)
    total = len(grid.widths) * len(grid.roundings)
    with progress_bar() as bar:
        task = bar.add_task("sweep", total=total, status="")
        result = run_sweep(b, train_data, SimulateConfig(steps, batch_size, lr, seed), grid, fxp, eval_data,
                           engine=engine, on_run=lambda row: bar.update(task, advance=1, status=(
                               f"W={row['width']} {row['rounding']}: {pct(row['accuracy'])}")))
    result = {"schema": "edgefa.fpga-sweep/1", **result}
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sweep.json").write_text(json.dumps(result, indent=2))
    (folder / "sweep.md").write_text(markdown_table(result))
    write_report(folder / "sweep.svg", standalone_svg(sweep_chart(result)))
    write_report(folder / "sweep.html", render_sweep_report(result))
    table = Table(title=f"accuracy after {steps} fixed-point DFA steps "
                        f"(swept: {', '.join(grid.classes)} as ap_fixed<W,{int_bits},mode,AP_SAT>)")
    table.add_column("W", justify="right")
    for mode in grid.roundings:
        table.add_column(mode, justify="right")
    cell = {(r["rounding"], r["width"]): r for r in result["rows"]}
    for w in grid.widths:
        table.add_row(str(w), *(f"{pct(cell[m, w]['accuracy'])} ({100 * cell[m, w]['zeroed_fraction']:.1f}% zeroed)"
                                for m in grid.roundings))
    console.print(table)
    console.print(f"float32 runtime: {pct(result['float32_accuracy_before'])} -> "
                  f"{pct(result['float32_accuracy_after'])} after the same steps")
    console.print(f"wrote {folder / 'sweep.json'}, sweep.md, sweep.svg, sweep.html")

# (fpga cost: the MAC-array cost model, below)

def _seconds_text(s: float) -> str:
    return f"{s * 1e6:,.2f} µs" if s < 1e-3 else f"{s * 1e3:,.3f} ms"


def _joules_text(j: float) -> str:
    return f"{j * 1e9:,.1f} nJ" if j < 1e-6 else f"{j * 1e6:,.3f} µJ"


@fpga.command("cost")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--array", "array_spec", default="16x16", show_default=True, help="ROWSxCOLS processing elements")
@click.option("--clock", "clock_spec", default="200MHz", show_default=True, help="200MHz | 1.5GHz | 200e6")
@click.option("--data-bits", type=click.IntRange(1, 64), default=16, show_default=True, help="width of every stored tensor")
@click.option("--acc-bits", type=click.IntRange(1, 64), default=32, show_default=True, help="accumulator width in the PEs")
@click.option("--onchip-kib", type=POSITIVE_FLOAT, default=972, show_default=True,
              help="on-chip memory, counted in BRAM36 blocks of 4.5 KiB (972 = 216 BRAM36)")
@click.option("--dram-gbps", type=POSITIVE_FLOAT, default=10.0, show_default=True, help="DRAM bandwidth when tensors spill")
@click.option("--batch", type=POSITIVE, default=32, show_default=True, help="training batch")
@click.option("--feedback", default="stored", show_default=True, help="DFA feedback: stored | lfsr (regenerated)")
@click.option("--json", "json_out", type=OUT_FILE, default=None, help="write everything here")
def fpga_cost(bundle, array_spec, clock_spec, data_bits, acc_bits, onchip_kib, dram_gbps, batch, feedback, json_out):
    """Cycles, latency, DSP/LUT, BRAM36, DRAM traffic and energy of one training step on an
    output-stationary MAC array: DFA against BP side by side. An analytic model, not a measurement."""
    from .fpga_sim.cost import MacArray, cost_of_bundle, parse_array, parse_clock

    rows, cols = parse_array(array_spec)
    array = MacArray(rows, cols, parse_clock(clock_spec), data_bits, acc_bits, onchip_kib, dram_gbps)
    result = cost_of_bundle(bundle, array, batch, feedback)
    dfa, bp = result["dfa"], result["bp"]
    basis = result["energy_basis"]
    title = (f"fpga cost (model): {Path(bundle).name} on a {rows}x{cols} output-stationary MAC array, "
             f"{array.clock_hz / 1e6:g} MHz, {data_bits}-bit data, {acc_bits}-bit accumulators, batch {batch}")
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
    table.add_row("latency per training step", *(_seconds_text(r["train_step"]["latency_s"])
                                                 + (" (DRAM-bound)" if r["train_step"]["bound"] == "dram" else "")
                                                 for r in (dfa, bp)),
                  ratio(dfa["train_step"]["latency_s"], bp["train_step"]["latency_s"]))
    row("latency per inference (batch 1)", dfa["inference"]["latency_s"], bp["inference"]["latency_s"], _seconds_text)
    row(f"energy per training step, {basis}", dfa["train_step"]["energy_j"], bp["train_step"]["energy_j"],
        _joules_text)
    row(f"energy per inference, {basis}", dfa["inference"]["energy_j"], bp["inference"]["energy_j"], _joules_text)
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
                             f"({s['bram36_saved']} BRAM36) and save {_joules_text(s['energy_j_saved'])} per step; "
                             f"energy: {basis}"), highlight=False)
    console.print(escape(f"all figures: analytic model, not a measurement; energy: {basis}; "
                         "assumptions in --json (\"assumptions\")"), highlight=False)
    if json_out:
        write_json(json_out, result, indent=1)
        console.print(f"wrote {escape(str(json_out))}")


# --- the demo --------------------------------------------------------------------------------

@cli.command()
@click.option("--out", type=OUT_FOLDER, default="demo-out", show_default=True)
@click.option("--epochs", type=POSITIVE, default=30, show_default=True, help="host pre-training epochs")
@click.option("--steps", type=POSITIVE, default=200, show_default=True, help="device fine-tuning steps")
@click.option("--seed", type=SEED, default=0, show_default=True)
@force_option
def demo(out, epochs, steps, seed, force):
    """Pretrain with DFA on digits, export, fine-tune on a shifted sensor through a torch-free device
    server behind a pseudo-terminal, and compare with BP fine-tuning on the host."""
    check_out(out, "demo", force)         # the folder and the ones the demo makes in it: before torch
    from .demo import DemoConfig, run_demo

    result = run_demo(DemoConfig(out=Path(out), epochs=epochs, steps=steps, seed=seed),
                      progress=progress_bar, say=err_console.print)
    table = Table(title=f"edgefa demo: digits seen through a shifted sensor ({result['shift']})")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("host DFA pre-training, clean test accuracy", pct(result["host_clean_accuracy"]))
    table.add_row("shifted test, before fine-tuning", pct(result["before"]))
    table.add_row("shifted test, after DFA fine-tuning on the device", f"[bold]{pct(result['after_device_dfa'])}[/]")
    table.add_row("shifted test, after BP fine-tuning on the host (reference)", pct(result["after_host_bp"]))
    table.add_row("gain from device fine-tuning", f"{100 * (result['after_device_dfa'] - result['before']):+.1f} points")
    table.add_row("device step time (median)", f"{result['device_step_ms_median']:.2f} ms")
    table.add_row("round trip per step over the pseudo-terminal (median)", f"{result['round_trip_ms_median']:.2f} ms")
    table.add_row("device process peak RSS", human_bytes(result["device_peak_rss_bytes"]))
    table.add_row(f"device energy per step ({result['energy_method']})", energy_text(result["energy_per_step_j"],
                                                                                 result["energy_method"]))
    table.add_row("bundle size", human_bytes(result["bundle_bytes"]))
    table.add_row("device samples (train / test)", f"{result['n_device_train']} / {result['n_device_test']}")
    console.print(table)
    console.print(f"report: {result['report_path']}")


refuse_empty_text(cli)       # every free-text option and argument: an empty value is refused while parsing


def main(argv: list[str] | None = None, prog_name: str = "edgefa") -> None:
    """Entry point: bad input becomes one line on stderr and exit status 2, never a traceback."""
    warnings.showwarning = _one_line_warnings
    try:
        cli.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except EdgefaError as exc:
        err_console.print(f"[red]edgefa: error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as exc:     # `edgefa` or `edgefa device` alone: the help
        exc.show()
        sys.exit(exc.exit_code)
    except click.ClickException as exc:                   # a bad option or argument: one line
        command = " ".join(exc.ctx.command_path.split()[1:]) if getattr(exc, "ctx", None) else ""
        where = f"{command}: " if command else ""
        err_console.print(f"[red]edgefa: error:[/] {escape(where + ' '.join(exc.format_message().split()))}",
                          highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
