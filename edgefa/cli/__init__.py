"""`edgefa ...`: one entry point for host and device.

One module per group of commands, each command parse -> one library call -> render (the tables in
edgefa/report/terminal.py):

  host.py         train, train-preference, report, diagnose        (torch: host)
  export.py       export                                           (torch: host)
  bundle.py       bundle from-onnx (your own model)                (torch: host)
  experiments.py  audit, experiment preference                     (torch: host)
  demo.py         demo                                             (torch: host)
  device.py       device verify | build-engine | finetune | evaluate | serve   (on the device)
  link.py         deploy, finetune --device, device info | pull, fleet ...     (a host, over the link)
  profiling.py    profile [run] | compare, profiles ..., budget
  fpga.py         fpga simulate | sweep | cost
  common.py       consoles, progress bars, the options several commands share

Host commands import torch-based modules inside their bodies, never at the top of any of these
modules, so the device commands run where torch is not installed (tests/test_no_torch.py). This
module holds the root group, its registration of every command, and `main`: bad input becomes one
line and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import sys
import warnings

import click
from rich.markup import escape

from .. import __version__
from ..cli_types import refuse_empty_text
from ..errors import EdgefaError
from . import bundle, demo, device, experiments, export, fpga, host, link, profiling
from .common import err_console


@click.group()
@click.version_option(__version__, prog_name="edgefa")
def cli() -> None:
    """Train with feedback alignment on the host; fine-tune with DFA on the device without torch."""


def _register_commands() -> None:
    for module in (host, export, experiments, link, profiling, demo):
        for command in module.COMMANDS:
            cli.add_command(command)
    for group in (experiments.experiment_group, device.device_group, link.fleet_group, profiling.profiles_group,
                  profiling.profile_group, fpga.fpga_group, bundle.bundle_group):
        cli.add_command(group)
    for command in link.DEVICE_COMMANDS:       # `device info`, `device pull`: a host's, over the link
        device.device_group.add_command(command)
    refuse_empty_text(cli)   # every free-text option and argument: an empty value is refused while parsing


_register_commands()


def _one_line_warnings(message, category, filename, lineno, file=None, line=None):
    err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


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
