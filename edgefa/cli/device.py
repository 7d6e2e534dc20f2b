"""`edgefa device ...` run on the device itself: verify, build-engine, finetune, evaluate, serve
(numpy, onnxruntime; never torch). `device info` and `device pull`, which a host runs against a
device server, are in link.py."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.markup import escape

from ..cli_types import LEARNING_RATE, LISTEN_ADDRESS, OUT_FILE, OUT_FOLDER, POSITIVE, POSITIVE_FLOAT, SEED
from ..report.format import fmt_pct
from .common import (console, err_console, feature_cache_options, link_options, max_refusals_option, progress_bar,
                     stopped_run_report, write_json)


@click.group("device")
def device_group() -> None:
    """Device-side commands (numpy + onnxruntime; no torch needed)."""


@device_group.command("verify")
@click.argument("bundle", type=click.Path())
def verify_command(bundle):
    """Verify a bundle (hashes, version, shapes; its graphs load and run a forward pass on the
    CPU) and show what it holds, its device state/ too."""
    from ..bundle import read_bundle
    from ..report.terminal import bundle_table
    from ..runtime.backends import graph_names, open_checked_engine
    from ..runtime.state import describe_state

    b = read_bundle(bundle)
    engine = open_checked_engine(b, "CPUExecutionProvider", threads=1)    # every check before any output
    graphs = graph_names(b)                                                 # open_checked_engine loaded each
    state = describe_state(b, engine.state_names)
    console.print(bundle_table(b))
    console.print(f"graphs: {', '.join(graphs)} load in onnxruntime (forward pass on a zero batch: finite)",
                  highlight=False, soft_wrap=True)
    console.print(f"state/: {escape(state)}", highlight=False, soft_wrap=True)


@device_group.command("build-engine")
@click.argument("bundle", type=click.Path())
@click.option("--force", is_flag=True, help="rebuild even the engines that match this TensorRT and GPU")
def build_engine_command(bundle, force):
    """Build TensorRT engines for infer and train_step into BUNDLE/engines/ (where TensorRT lives)."""
    from ..runtime.tensorrt_build import build_bundle_engines

    with progress_bar(transient=True) as bar:
        task = bar.add_task("tensorrt", total=None, status="")
        engines = build_bundle_engines(bundle, force, lambda graph: bar.update(task, status=f"building {graph}"))
    for graph, e in engines.items():
        console.print(f"{graph}: {e['file']} (TensorRT {e['tensorrt']}, {escape(e['gpu'])} sm {e['compute_capability']}, "
                      f"{e['precision']}{', refittable' if e.get('refittable') else ''}, "
                      f"batch {e['profile']['min']}..{e['profile']['max']})", highlight=False)


@device_group.command("finetune")
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
@feature_cache_options
def finetune_command(bundle, data_spec, steps, batch_size, lr, checkpoint_every, max_refusals, seed, threads,
                     provider, eval_spec, report, feature_cache, cache_mb):
    """Fine-tune a bundle on this device with DFA (onnxruntime or its TensorRT engines), checkpointing into BUNDLE/state/."""
    from ..bundle import read_bundle
    from ..report.terminal import device_finetune_table
    from ..runtime.finetune import FinetuneConfig, Finetuner, load_finetune_data

    b = read_bundle(bundle)
    train_data = load_finetune_data(b, data_spec)
    eval_data = load_finetune_data(b, eval_spec) if eval_spec else None
    config = FinetuneConfig(steps, batch_size, lr, checkpoint_every, max_refusals, seed, threads, provider,
                            feature_cache=feature_cache, cache_bytes=cache_mb << 20)
    tuner = Finetuner(b, train_data, config, eval_data)  # every input check happens here, before the bar
    with stopped_run_report(report), progress_bar() as bar:
        task = bar.add_task("device dfa", total=steps, completed=tuner.start, status="")
        result = tuner.run(on_step=lambda s, loss: bar.update(task, completed=s, status=f"loss {loss:.3f}"))
        bar.update(task, completed=result["final_step"])
    if report:
        write_json(report, result)
    console.print(device_finetune_table(result))


@device_group.command("evaluate")
@click.argument("bundle", type=click.Path())
@click.option("--data", "data_spec", required=True,
              help="FILE.npz (X, y) or mnist:DIR; for a bradley-terry scorer FILE.npz of pairs (chosen, rejected)")
def evaluate_command(bundle, data_spec):
    """Accuracy of the bundle's current weights (its device state when present); a scorer's
    preference accuracy on pairs."""
    from ..bundle import read_bundle
    from ..runtime.finetune import evaluate, is_preference, load_finetune_data

    b = read_bundle(bundle)
    result = evaluate(b, load_finetune_data(b, data_spec))
    what = ("preference accuracy", "pairs") if is_preference(b) else ("accuracy", "samples")
    console.print(f"{what[0]} [bold]{fmt_pct(result['accuracy'])}[/] on {result['samples']} {what[1]} "
                  f"(device state at step {result['step']})")


@device_group.command("serve")
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
@feature_cache_options
@link_options
def serve_command(port, listen_address, store, checkpoint_every, provider, threads, max_bundle_mb, profile_name,
                  idle_timeout, keep_retired, feature_cache, cache_mb, key_file, baud):
    """Serve this device to a host over a serial line or TCP (one host at a time)."""
    from ..link.client import read_key
    from ..link.server import serve_device
    from ..link.service import ServiceConfig

    if (port is None) == (listen_address is None):
        raise click.UsageError("give exactly one of --port URL and --listen ADDR:PORT")
    if listen_address is not None and not listen_address.startswith((":", "127.", "localhost:", "[::1]:")):
        err_console.print(f"[yellow]warning:[/] listening on {escape(listen_address)}: reachable beyond this "
                          "machine" + ("" if key_file else ", and without a shared key (--key-file)"))
    key = read_key(key_file)

    def say(line: str) -> None:
        click.echo(f"edgefa device server: {line}", err=True)

    def ready(line: str) -> None:
        click.echo(f"edgefa device server: {line}")   # stdout, one line: what a script waits for
        sys.stdout.flush()

    config = ServiceConfig(Path(store), checkpoint_every, provider, threads, max_bundle_bytes=max_bundle_mb << 20,
                           keep_retired=keep_retired, feature_cache_bytes=(cache_mb << 20) if feature_cache else None)
    serve_device(config, port=port, listen_address=listen_address, key=key, baudrate=baud, profile_name=profile_name,
                 idle_timeout=idle_timeout, ready=ready, log=say)
