"""Grids of host runs: `edgefa audit` (the diagnostic protocol over rules and seeds) and `edgefa
experiment preference` (torch, imported inside each command)."""

from __future__ import annotations

import click
from rich.markup import escape

from ..cli_types import FRACTION, LEARNING_RATE, MOMENTUM, NON_NEGATIVE_FLOAT, OUT_FOLDER, POSITIVE, WIDTHS, counts
from ..report.format import fmt_pct
from .common import check_out, console, force_option, progress_bar
from .host import protocol_options, protocol_settings


@click.command("audit")
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
def audit_command(configs, seeds, dataset, width, depth, activation, epochs, train_batch, lr, momentum, jobs, device,
                  out, force, **protocol):
    """The protocol over BP, FA, DFA, hybrid and penalized DFA on the residual MLP, over seeds (table, plots)."""
    from dataclasses import asdict

    from ..experiments.audit import AuditConfig, parse_configs, run_audit, table, write_outputs
    from ..experiments.grid import parse_seeds
    from ..report.terminal import audit_table

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
    console.print(audit_table(f"audit: resmlp {width}x{depth} on {dataset}, seeds {seeds} (every column: audit.md)",
                              header, rows))
    for path in write_outputs(result, out):
        console.print(f"wrote {path}")


@click.group("experiment")
def experiment_group() -> None:
    """Grids of host runs that write a table, a plot and an HTML report."""


@experiment_group.command("preference")
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
def experiment_preference_command(sigmas, rules, seeds, pairs, epochs, dim, hidden, activation, batch_size, lr,
                                  momentum, loss, margin, test_fraction, device, out, force):
    """Held-out preference accuracy against label noise sigma, per rule, over seeds (table and plot)."""
    from ..experiments.grid import parse_seeds
    from ..experiments.preference import (SweepConfig, parse_rules, parse_sigmas, run_sweep,
                                          summary, table_rows, write_outputs)
    from ..report.terminal import text_table

    config = SweepConfig(parse_sigmas(sigmas), parse_rules(rules), parse_seeds(seeds), pairs, epochs, dim, list(hidden),
                         activation, batch_size, lr, momentum, loss, margin, test_fraction, device)
    config.check()                         # every bad value is one line before torch is imported
    check_out(out, "preference-sweep", force)
    total = len(config.sigmas) * len(config.rules) * len(config.seeds)
    with progress_bar() as bar:
        task = bar.add_task("preference sweep", total=total, status="")
        result = run_sweep(config, on_run=lambda r: bar.update(task, advance=1, status=(
            f"sigma {r['sigma']:g} {r['rule']} seed {r['seed']}: {fmt_pct(r['heldout_accuracy'])}")))
    paths = write_outputs(result, out)
    header, rows = table_rows(result)
    console.print(text_table(f"held-out preference accuracy ({len(config.seeds)} seeds"
                             + (", mean ± sample std" if len(config.seeds) > 1 else "") + ")", header, rows))
    ceiling = ", ".join(fmt_pct(m) for m, _ in summary(result)["ceiling"])
    console.print(f"ceiling: held-out labels that agree with the noise-free utility ({ceiling} at sigma "
                  f"{', '.join(f'{s:g}' for s in config.sigmas)}); {total} runs in {result['seconds']:.0f} s",
                  highlight=False)
    console.print("wrote " + ", ".join(escape(str(p)) for p in paths), highlight=False)


COMMANDS = (audit_command,)
