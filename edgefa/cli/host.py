"""Host training and runs: `edgefa train`, `train-preference`, `report`, `diagnose` (torch, imported
inside each command: never at the top of this module)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.markup import escape

from ..errors import EdgefaError
from ..cli_types import (COUNT, FRACTION, LEARNING_RATE, MOMENTUM, NON_NEGATIVE_FLOAT, OUT_FILE, OUT_FOLDER,
                         POSITIVE, POSITIVE_FLOAT, SEED, WIDTHS, Finite, counts)
from ..report.format import fmt_pct
from .common import check_out, console, force_option, progress_bar

METHODS = click.Choice(["bp", "fa", "dfa", "usf", "hybrid"])
MODELS = click.Choice(["mlp", "resmlp", "cnn", "vit", "transformer"])
ACTIVATIONS = click.Choice(["relu", "tanh", "gelu"])


@click.command("train")
@click.option("--method", type=METHODS, default="dfa", show_default=True,
              help="bp | fa | dfa | usf (sign-symmetric feedback) | hybrid (dfa with a bp step every --hybrid-every)")
@click.option("--hybrid-every", type=POSITIVE, default=10, show_default=True,
              help="hybrid: every k-th step is a true BP step (10, 50 and 100 are the interesting values)")
@click.option("--dataset", default="digits", show_default=True,
              help="digits | npz:FILE (arrays X, y) | mnist:DIR (IDX files) | cifar10:DIR (binary batches) | mnist1d[:N] (generated)")
@click.option("--model", "model_kind", type=MODELS, default="mlp", show_default=True,
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
@click.option("--activation", type=ACTIVATIONS, default="relu", show_default=True,
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
def train_command(method, hybrid_every, dataset, model_kind, hidden, width, depth, expansion, heads, patch, penalty,
                  freeze_blocks, activation, epochs, batch_size, lr, momentum, seed, feedback_seed, device, nproc, out,
                  force):
    """Train a model on the host with bp, fa, dfa, usf or hybrid; write checkpoint.pt and metrics.json."""
    from ..training.config import TrainConfig     # no torch: a bad combination is one quick line

    config = TrainConfig(method, dataset, list(hidden), activation, epochs, batch_size, lr, momentum, seed,
                         feedback_seed, device=device, hybrid_every=hybrid_every, model=model_kind, width=width,
                         depth=depth, expansion=expansion, heads=heads, patch=patch, penalty=penalty,
                         freeze_blocks=freeze_blocks, nproc=nproc)
    config.check()
    check_out(out, "run", force)
    from ..training.launch import prepare_training

    prepared = prepare_training(config)    # every check that needs torch or the data: before the bar
    if not prepared.reports:
        prepared.run(out)                  # a rank torchrun started: rank 0 reports and writes the run
        return
    with progress_bar() as bar:
        task = bar.add_task(f"train {model_kind} {method}", total=epochs, status="")

        def on_epoch(epoch, row):
            bar.update(task, completed=epoch,
                       status=f"loss {row['batch_loss_mean']:.3f}  test {fmt_pct(row['test_accuracy'])}")

        metrics, path = prepared.run(out, on_epoch)
    if "diverged" in metrics:
        kept = metrics["diverged"].get("weights_of_epoch")
        console.print(f"[yellow]warning:[/] diverged at epoch {metrics['diverged']['epoch']}: "
                      f"{metrics['diverged']['note']}" + (f"; the saved weights are those of epoch {kept}" if kept else ""))
    procs = f" x {metrics['world_size']} processes ({metrics['backend']})" if "world_size" in metrics else ""
    console.print(f"final test accuracy [bold]{fmt_pct(metrics['final_test_accuracy'])}[/] "
                  f"({model_kind} {method}, {metrics['dataset']}, {epochs} epochs on {metrics['device']}{procs}) -> {path}")
    console.print(f"judge it before you report it: edgefa diagnose {escape(str(out))}", highlight=False)


@click.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", type=OUT_FILE, default=None, help="HTML file to write (default RUN/report.html)")
def report_command(run_dir, out):
    """Report a run: accuracy and alignment with BP per layer (table), over epochs (RUN/report.html)."""
    from ..diagnostics import epoch_alignment, read_diagnosis, read_metrics
    from ..report.page import write_report
    from ..report.terminal import DIAGNOSTIC_NAMES, print_run_alignment
    from ..report.training_page import render_training_report

    metrics = read_metrics(run_dir)
    rows = metrics["epochs"]
    last = rows[-1] if rows else {}
    console.print(f"{escape(str(run_dir))}: {metrics.get('model', 'mlp')} {metrics.get('method', '?')} on "
                  f"{metrics.get('dataset', '?')}, {len(rows)} epochs, test accuracy "
                  f"[bold]{fmt_pct(last.get('test_accuracy'))}[/] (train {fmt_pct(last.get('train_accuracy'))})",
                  highlight=False)
    logged = [(row.get("epoch"), epoch_alignment(row)) for row in rows]
    logged = [(e, a) for e, a in logged if a is not None]
    if not logged:
        console.print("alignment was not logged for this run (TrainConfig.alignment off, or an older run)")
    else:
        print_run_alignment(console, *logged[-1])
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
    from ..diagnostics import measure_dtype_name

    measure_dtype_name(dtype)                # float16 is refused before torch is imported
    from ..diagnostics.diagnosis import Settings, Thresholds

    return Settings(Thresholds(growth_max, grad_floor, stability_max, margin / 100.0), eval_batch, batches,
                    stability_batch, null_draws, probes, eps, dtype)


@click.command("diagnose")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--baseline", type=click.Path(exists=True, file_okay=False), default=None,
              help="a frozen-random-blocks run to compare with (default: RUN/frozen_baseline/, trained when absent)")
@click.option("--no-baseline", is_flag=True, help="skip (d) instead of training the baseline")
@protocol_options
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda")
@click.option("--json", "as_json", is_flag=True, help="print the diagnosis as JSON instead of tables")
@click.option("--fail-on-walk-back", is_flag=True, help="exit with status 1 when the verdict is 'walk back'")
def diagnose_command(run_dir, baseline, no_baseline, device, as_json, fail_on_walk_back, **protocol):
    """Judge a trained run: four diagnostics, a verdict, honest alignment (writes RUN/diagnosis.json)."""
    settings = protocol_settings(**protocol)          # float16 and bad values: one line, before torch
    from ..diagnostics.diagnosis import diagnose, frozen_baseline, write_diagnosis
    from ..report.terminal import print_diagnosis
    from ..shared.datasets import load_dataset
    from ..training.trainer import load_run

    run = load_run(run_dir, device)
    data = load_dataset(run.config.dataset)
    with progress_bar(transient=True) as bar:
        task = bar.add_task("frozen-blocks baseline", total=run.config.epochs, status="")

        def on_epoch(epoch, row):
            bar.update(task, completed=epoch, status=f"test {fmt_pct(row['test_accuracy'])}")

        base = None if no_baseline else frozen_baseline(run, Path(run_dir), baseline, device, data, on_epoch)
        bar.update(task, description="diagnose", status="measuring")
        result = diagnose(run, settings, base, data, device)
    path = write_diagnosis(result, run_dir)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        print_diagnosis(console, result, run_dir)
        console.print(f"diagnosis: {path}")
    if fail_on_walk_back and result["verdict"] != "trustworthy":
        sys.exit(1)


@click.command("train-preference")
@click.option("--data", "data_spec", default="synthetic", show_default=True,
              help="synthetic[:N] (N pairs from a hidden utility, default 2000) | jsonl:FILE (prompt, chosen, "
                   "rejected per line)")
@click.option("--sigma", type=NON_NEGATIVE_FLOAT, default=0.0, show_default=True,
              help="synthetic: std of the Gaussian noise added to u(a) - u(b) before the label is drawn")
@click.option("--dim", type=POSITIVE, default=16, show_default=True, help="synthetic: features per item")
@click.option("--max-len", type=POSITIVE, default=128, show_default=True,
              help="jsonl: tokens per item (prompt bytes, SEP, response bytes; cut from the left)")
@click.option("--method", type=METHODS, default="dfa", show_default=True)
@click.option("--hybrid-every", type=POSITIVE, default=10, show_default=True, help="hybrid: every k-th step is a BP step")
@click.option("--loss", type=click.Choice(["bradley-terry", "hinge"]), default="bradley-terry", show_default=True,
              help="-log sigmoid(s_w - s_l) | max(0, m - (s_w - s_l))")
@click.option("--margin", type=NON_NEGATIVE_FLOAT, default=1.0, show_default=True, help="hinge: the margin m")
@click.option("--model", "model_kind", type=MODELS,
              default=None, help="the scorer (default: mlp for synthetic pairs, transformer for jsonl)")
@click.option("--hidden", type=WIDTHS, default="64,64", show_default=True, help="mlp: hidden widths, comma-separated")
@click.option("--width", type=POSITIVE, default=None, help="model dim of the other models (transformer 64)")
@click.option("--depth", type=POSITIVE, default=None, help="blocks of the other models (transformer 2)")
@click.option("--heads", type=POSITIVE, default=4, show_default=True, help="attention heads (transformer, vit)")
@click.option("--activation", type=ACTIVATIONS, default="relu", show_default=True,
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
def train_preference_command(data_spec, sigma, dim, max_len, method, hybrid_every, loss, margin, model_kind, hidden,
                             width, depth, heads, activation, epochs, batch_size, lr, momentum, seed, feedback_seed,
                             test_fraction, device, out, force):
    """Train a scorer s(x) on preference pairs (chosen over rejected); write checkpoint.pt and metrics.json."""
    check_out(out, "run", force)
    from ..training.config import TrainConfig
    from ..training.preference_train import load_pairs_spec, scorer_model, train_preference
    from ..training.trainer import save_run

    pairs = load_pairs_spec(data_spec, sigma, dim, seed, max_len)     # a bad file is one line, before the bar
    kind = scorer_model(pairs, model_kind, data_spec)
    config = TrainConfig(method, data_spec, list(hidden), activation, epochs, batch_size, lr, momentum, seed,
                         feedback_seed, test_fraction=test_fraction, hybrid_every=hybrid_every, device=device,
                         model=kind, width=width, depth=depth, heads=heads, loss=loss)
    config.check()
    with progress_bar() as bar:
        task = bar.add_task(f"train-preference {kind} {method}", total=epochs, status="")

        def on_epoch(epoch, row):
            bar.update(task, completed=epoch,
                       status=f"loss {row['batch_loss_mean']:.3f}  held-out {fmt_pct(row['test_accuracy'])}")

        try:
            run = train_preference(config, pairs, margin=margin, on_epoch=on_epoch)
        except ValueError as exc:          # a model that does not fit the data (heads, width)
            raise EdgefaError(f"{kind}: {exc}") from None
    path = save_run(run, out)
    m = run.metrics
    extra = ""
    if m.get("heldout_ceiling") is not None:
        extra = (f"; ceiling {fmt_pct(m['heldout_ceiling'])} (labels that agree with the noise-free utility), "
                 f"agrees with the true utility on {fmt_pct(m['final_test_true_accuracy'])}")
    console.print(f"held-out preference accuracy [bold]{fmt_pct(m['final_test_accuracy'])}[/] on {m['n_test']} pairs"
                  f"{extra} ({kind} {method}, {escape(m['dataset'])}, {loss}, {epochs} epochs on {m['device']}) "
                  f"-> {escape(str(path))}", highlight=False)


COMMANDS = (train_command, train_preference_command, report_command, diagnose_command)
