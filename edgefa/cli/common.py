"""What every command module of the CLI shares: the consoles, the progress bars, the --force,
--key-file/--baud, --max-refusals and feature-cache options, the --out check and the link's client.

Device side: imports no host module (torch), at the top or anywhere.
"""

from __future__ import annotations

import contextlib
import json

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..cli_types import COUNT, POSITIVE
from ..runtime.divergence import DEFAULT_MAX_REFUSALS

console = Console()
err_console = Console(stderr=True)


def progress_bar(transient: bool = False) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                    console=err_console, transient=transient)


def transfer_bar(transient: bool = False) -> Progress:
    from rich.progress import DownloadColumn, TransferSpeedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeElapsedColumn(), console=err_console, transient=transient)


def warn(line: str) -> None:
    """A warning on stderr, one line (rich markup in `line` is escaped)."""
    err_console.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)


force_option = click.option("--force", is_flag=True,
                            help="write --out even where it holds something else: what it held is kept "
                                 "beside it as OUT.replaced-<time>/ (edgefa never deletes what it did not write)")


def check_out(out, kind: str, force: bool) -> None:
    """Before the work: may `kind` be written to --out (edgefa.out_folders)? Where only --force
    allows it, the old folder is set aside now and put back if the command fails."""
    from ..out_folders import out_folder

    def note(line: str) -> None:
        err_console.print(f"[yellow]note:[/] {escape(line)}", highlight=False, soft_wrap=True)

    click.get_current_context().with_resource(out_folder(out, kind, force, say=note))


def write_json(path, result: dict, indent: int = 2) -> None:
    """An output file (--report, --json): its folders made, written whole or not at all."""
    from ..bundle import write_atomically

    write_atomically(path, (json.dumps(result, indent=indent) + "\n").encode())


# --- fine-tuning's stops: shared by `device finetune`, `finetune` and `fleet finetune` ---------------

max_refusals_option = click.option(
    "--max-refusals", type=POSITIVE, default=DEFAULT_MAX_REFUSALS, show_default=True,
    help="stop after this many steps refused for NaN/Inf in one run (a diverged loss stops at once, "
         "rolled back to the last good checkpoint)")


@contextlib.contextmanager
def stopped_run_report(report: str | None):
    """A run that stops early (divergence, refusals) still writes --report: what it did up to the
    stop, and why (`stopped`); the error line follows."""
    from ..runtime.divergence import RunStopped

    try:
        yield
    except RunStopped as stop:
        if report and stop.result is not None:
            write_json(report, stop.result)
        raise


def feature_cache_options(f):
    """--feature-cache/--no-feature-cache and --cache-mb: a bundle with a frozen trunk computes each
    sample's trunk features once and keeps them (runtime/feature_cache.py)."""
    from ..device_profiles.budget import DEFAULT_FEATURE_CACHE_MB

    f = click.option("--cache-mb", type=COUNT, default=DEFAULT_FEATURE_CACHE_MB, show_default=True,
                     help="memory for cached trunk features; a larger cache goes to a file in the bundle's state/")(f)
    return click.option("--feature-cache/--no-feature-cache", default=True, show_default=True,
                        help="a bundle with a frozen trunk: run the trunk once per sample and cache its features "
                             "(the same weights, bit for bit; epochs after the first run the trained part only)")(f)


# --- the link ------------------------------------------------------------------------------------

def link_options(f):
    """--key-file and --baud, shared by every command that opens a link."""
    f = click.option("--baud", type=POSITIVE, default=115200, show_default=True,
                     help="line rate for a real serial port (ignored by sockets and pseudo-terminals)")(f)
    return click.option("--key-file", type=click.Path(exists=True, dir_okay=False), default=None,
                        help="shared key: authenticate every frame with HMAC-SHA256")(f)


def device_client(url: str, key_file, baud):
    """A client of the device server at `url` (use it in a `with`)."""
    from ..link.client import ClientConfig, DeviceClient, read_key

    return DeviceClient(url, ClientConfig(key=read_key(key_file), baudrate=baud))
