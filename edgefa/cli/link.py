"""What a host runs against device servers over the link: `edgefa deploy`, `edgefa finetune
--device`, `edgefa device info`, `edgefa device pull`, and `edgefa fleet ...` (every device of an
inventory at once). numpy only: no torch."""

from __future__ import annotations

import contextlib
import json

import click
from rich.markup import escape

from ..cli_types import LEARNING_RATE, OUT_FILE, OUT_FOLDER, POSITIVE, SEED
from ..errors import EdgefaError
from .common import (check_out, console, device_client, force_option, link_options, max_refusals_option,
                     progress_bar, stopped_run_report, transfer_bar, write_json)


def remote_finetune_options(f):
    """The options of fine-tuning over a link, shared by `finetune` and `fleet finetune`."""
    for option in reversed([
        click.option("--data", "data_spec", required=True,
                     help="training data: FILE.npz (X, y) or mnist:DIR; "
                          "a bradley-terry bundle: FILE.npz (chosen, rejected)"),
        click.option("--steps", type=POSITIVE, required=True,
                     help="total device steps to reach (continues from the device's step)"),
        click.option("--batch-size", type=POSITIVE, default=32, show_default=True),
        click.option("--lr", type=LEARNING_RATE, default=None, help="learning rate (default: the bundle's)"),
        click.option("--seed", type=SEED, default=0, show_default=True, help="batch order seed"),
        click.option("--eval", "eval_spec", default=None,
                     help="evaluation data (accuracy before and after; pairs: preference accuracy)"),
        max_refusals_option,
    ]):
        f = option(f)
    return f


@click.command("info")
@click.argument("url")
@link_options
@click.option("--json", "as_json", is_flag=True, help="print the raw answer as JSON")
def info_command(url, key_file, baud, as_json):
    """What a device is and holds: versions, execution providers, bundle, step."""
    from ..report.terminal import device_info_table

    with device_client(url, key_file, baud) as dev:
        answer = dev.info()
    answer.pop("ok", None)
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    console.print(device_info_table(url, answer))


@click.command("deploy")
@click.argument("bundle", type=click.Path())
@click.option("--device", "url", required=True, help="the device: a pyserial URL (/dev/ttyUSB0, socket://HOST:PORT)")
@link_options
def deploy_command(bundle, url, key_file, baud):
    """Send a bundle to a device in acknowledged, resumable chunks; the device verifies it."""
    from ..bundle import read_bundle
    from ..report.terminal import deploy_lines

    read_bundle(bundle)   # a bad bundle stops here, before anything is sent
    # transient: the line printed below says what was sent; a refusal is then the only line
    with device_client(url, key_file, baud) as dev, transfer_bar(transient=True) as bar:
        task = bar.add_task(f"deploy -> {url}", total=None)
        result = dev.deploy(bundle, on_progress=lambda done, total: bar.update(task, completed=done, total=total))
        stats = dev.stats
    console.print(escape(deploy_lines(result, url))
                  + (f" ({stats.retransmits} frames repeated, {dev.reconnects} reconnects)"
                     if stats.retransmits or dev.reconnects else ""), soft_wrap=True)


@click.command("finetune")
@click.option("--device", "url", required=True, help="the device: a pyserial URL")
@remote_finetune_options
@click.option("--report", type=OUT_FILE, default=None, help="write the report as JSON")
@link_options
def finetune_command(url, data_spec, steps, batch_size, lr, seed, eval_spec, max_refusals, report, key_file, baud):
    """Fine-tune the bundle on a device, sending it one batch per step over the link."""
    from ..link.client import finetune_remote
    from ..report.terminal import remote_finetune_table
    from ..runtime.finetune import load_training_data

    train_data = load_training_data(data_spec)
    eval_data = load_training_data(eval_spec) if eval_spec else None
    started = {}
    with device_client(url, key_file, baud) as dev, stopped_run_report(report), contextlib.ExitStack() as later:
        bar = task = None

        def on_step(step, loss, rtt):
            nonlocal bar, task
            if bar is None:    # the bar opens with the first step: a device with nothing to do shows none
                bar = later.enter_context(progress_bar())
                task = bar.add_task(f"dfa on {url}", total=steps, completed=started["step"], status="")
            bar.update(task, completed=step, status=f"loss {loss:.3f}  rtt {rtt:.1f} ms")

        result = finetune_remote(dev, train_data, steps, batch_size, seed, lr, eval_data, train_spec=data_spec,
                                 eval_spec=eval_spec, max_refusals=max_refusals,
                                 on_start=lambda step: started.update(step=step), on_step=on_step,
                                 stop_if_reached=True, device_memory=True)
    if result is None:
        console.print(f"the device is already at step {started['step']} (>= --steps {steps}): nothing to do")
        return
    if report:
        write_json(report, result)
    console.print(remote_finetune_table(url, result))


@click.command("pull")
@click.argument("url")
@click.option("--out", type=OUT_FOLDER, required=True, help="bundle directory to write")
@click.option("--kept", default=None, metavar="NAME",
              help="pull a bundle a deploy replaced, with its state: bundle.prev or retired/NAME "
                   "(as the deploy line and `device info` name them)")
@force_option
@link_options
def pull_command(url, out, kept, force, key_file, baud):
    """Bring a device's bundle back with its current weights (a checkpoint is taken first)."""
    from ..bundle import read_bundle
    from ..runtime.state import load_state

    check_out(out, "bundle", force)
    with device_client(url, key_file, baud) as dev, transfer_bar() as bar:
        task = bar.add_task(f"pull <- {url}" + (f" ({kept})" if kept else ""), total=None)
        path = dev.pull(out, on_progress=lambda done, total: bar.update(task, completed=done, total=total), kept=kept)
    saved = load_state(read_bundle(path), [])
    console.print(f"pulled {escape(str(path))} ({escape(kept) + ', its' if kept else 'device'} state at step "
                  f"{saved.step if saved else 0})")


# the `device` group's commands a host runs against a device server (the group is in device.py)
DEVICE_COMMANDS = (info_command, pull_command)


# --- fleets: several devices at once ------------------------------------------------------------

@click.group("fleet")
def fleet_group() -> None:
    """Drive every device of an inventory file at once (one line of progress each)."""


inventory_option = click.option("--inventory", type=click.Path(exists=True, dir_okay=False), required=True,
                                help="devices.toml: [[device]] tables with name, url, optional key_file, baud")


def print_fleet(title: str, results, columns: list[str], row) -> None:
    """Print one row per device, then fail with one line if any device failed."""
    from ..report.terminal import fleet_table

    console.print(fleet_table(title, results, columns, row))
    failed = [r for r in results if not r.ok]
    if failed:
        raise EdgefaError(f"{len(failed)} of {len(results)} devices failed: "
                          + "; ".join(f"{r.device.name}: {r.error}" for r in failed))


@fleet_group.command("info")
@inventory_option
def fleet_info_command(inventory):
    """Versions, providers, bundle and step of every device."""
    from ..link.fleet import load_inventory, run_fleet
    from ..report.terminal import fleet_info_cells

    results = run_fleet(load_inventory(inventory), lambda entry, dev: dev.info())
    print_fleet("fleet", results, ["device", "providers", "bundle", "step"], fleet_info_cells)


@fleet_group.command("deploy")
@click.argument("bundle", type=click.Path())
@inventory_option
def fleet_deploy_command(bundle, inventory):
    """Send one bundle to every device."""
    from ..bundle import read_bundle
    from ..link.fleet import load_inventory, run_fleet
    from ..report.terminal import FLEET_DEPLOY_COLUMNS, fleet_deploy_cells

    read_bundle(bundle)
    entries = load_inventory(inventory)
    with transfer_bar() as bar:
        tasks = {e.name: bar.add_task(f"deploy -> {e.name}", total=None) for e in entries}

        def action(entry, dev):
            result = dev.deploy(bundle, on_progress=lambda done, total: bar.update(tasks[entry.name],
                                                                                 completed=done, total=total))
            return {**result, "retransmits": dev.stats.retransmits, "reconnects": dev.reconnects}

        results = run_fleet(entries, action)
    print_fleet(f"fleet deploy {escape(str(bundle))}", results, FLEET_DEPLOY_COLUMNS, fleet_deploy_cells)


@fleet_group.command("finetune")
@inventory_option
@remote_finetune_options
def fleet_finetune_command(inventory, data_spec, steps, batch_size, lr, seed, eval_spec, max_refusals):
    """Fine-tune every device on the same data, all at once (a device that stops, diverged or
    refusing, is rolled back and reported; the others carry on)."""
    from ..link.client import finetune_remote
    from ..link.fleet import load_inventory, run_fleet
    from ..report.terminal import fleet_finetune_cells, fleet_finetune_columns
    from ..runtime.finetune import load_training_data
    from ..shared.preference_pairs import PreferencePairs

    entries = load_inventory(inventory)
    train_data = load_training_data(data_spec)
    eval_data = load_training_data(eval_spec) if eval_spec else None
    with progress_bar() as bar:
        tasks = {e.name: bar.add_task(f"dfa on {e.name}", total=steps, status="") for e in entries}

        def action(entry, dev):
            result = finetune_remote(dev, train_data, steps, batch_size, seed, lr, eval_data, train_spec=data_spec,
                                     eval_spec=eval_spec, max_refusals=max_refusals,
                                     on_step=lambda s, loss, rtt: bar.update(tasks[entry.name], completed=s,
                                                                             status=f"loss {loss:.3f}"))
            bar.update(tasks[entry.name], completed=result["final_step"])
            return result

        results = run_fleet(entries, action)
    pairs = isinstance(train_data, PreferencePairs)
    print_fleet("fleet fine-tuning (DFA" + (", preference pairs)" if pairs else ")"), results,
                fleet_finetune_columns("preference accuracy" if pairs else "accuracy"),
                lambda a: fleet_finetune_cells(a, evaluated=eval_data is not None))


COMMANDS = (deploy_command, finetune_command)
