"""The click parameter types every `edgefa` command checks its input with, before any work.

One validation layer: a value that cannot be right (a batch of 0, a seed of -1, a NaN learning
rate, a port of 99999, a report in a folder that does not exist) is refused while click parses
the command line, as one line naming the option, exit status 2. Library code still checks what
it is handed; these types make sure the CLI never hands it a value it would choke on late.

Numbers: integers use click.IntRange, floats `Finite` (click's FloatRange lets NaN through every
bound, and inf through an open one). tests/test_cli_bad_input.py walks every option of every
command and fails on an INT or FLOAT option that uses neither, so a new option needs a range.

Device side: imports click and the standard library only (no torch, no numpy).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import click

# numpy's legacy seeding and torch's manual_seed both take any seed in [0, 2**32)
SEED = click.IntRange(0, 2 ** 32 - 1)
# The largest count any option takes (steps, epochs, batch sizes, widths, samples, ...). Far above
# any real run: a billion DFA steps is weeks of device time even at a millisecond a step. A larger
# value is a typo that would otherwise run until killed (`--steps 99999999999999999999`), and
# below 2**31 every count also fits the int32 and int64 fields it ends up in.
COUNT_MAX = 10 ** 9


def counts(min: int = 0) -> click.IntRange:
    """Integers from `min` to COUNT_MAX: the type of every count option."""
    return click.IntRange(min, COUNT_MAX)


POSITIVE = counts(1)
COUNT = counts(0)
PORT_MAX = 65535


class Finite(click.FloatRange):
    """A float within optional bounds that is never NaN or +-inf."""

    name = "finite float"

    def convert(self, value, param, ctx):
        number = click.types.FloatParamType.convert(self, value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


POSITIVE_FLOAT = Finite(min=0, min_open=True)
NON_NEGATIVE_FLOAT = Finite(min=0)
LEARNING_RATE = Finite(min=0, min_open=True)
MOMENTUM = Finite(0, 1, max_open=True)                  # 1 never forgets: the velocity grows without end
FRACTION = Finite(0, 1, min_open=True, max_open=True)   # a share strictly between none and all


class Text(click.types.StringParamType):
    """Free text (a data spec, a URL, a provider name) that is not empty: what it means is checked
    by the library it is given to, before the work; an empty one means nothing anywhere."""

    name = "text"

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not value.strip():
            self.fail("an empty value", param, ctx)
        return value


TEXT = Text()


class MeanStd(Text):
    """MEAN,STD of the standardization (x - MEAN) / STD a bundle applies to raw input: two finite
    numbers, STD above 0. -> (mean, std)."""

    name = "MEAN,STD"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        items = super().convert(value, param, ctx).split(",")
        try:
            mean, std = (float(v) for v in items)
        except ValueError:
            self.fail(f"{value!r} is not two comma-separated numbers MEAN,STD", param, ctx)
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            self.fail(f"{value!r}: MEAN must be finite and STD finite and above 0", param, ctx)
        return mean, std


MEAN_STD = MeanStd()


def refuse_empty_text(group: click.Group) -> None:
    """Give every plain-string parameter of every command under `group` the TEXT type, so a new
    option is covered without anyone remembering to (tests/test_cli_bad_input.py checks it)."""
    for command in group.commands.values():
        if isinstance(command, click.Group):
            refuse_empty_text(command)
            continue
        for param in command.params:
            if type(param.type) is click.types.StringParamType:
                param.type = TEXT


class IntList(click.ParamType):
    """Comma-separated integers, each at least `min`, at least one: "256,256" -> (256, 256)."""

    name = "integers"

    def __init__(self, min: int = 1, max: int = COUNT_MAX):
        self.min, self.max = min, max

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        items = [v.strip() for v in str(value).split(",")]
        try:
            numbers = tuple(int(v) for v in items if v)
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)
        if not numbers:
            self.fail("needs at least one integer", param, ctx)
        if min(numbers) < self.min:
            self.fail(f"{value!r}: every value must be at least {self.min}", param, ctx)
        if max(numbers) > self.max:
            self.fail(f"{value!r}: every value must be at most {self.max}", param, ctx)
        return numbers


WIDTHS = IntList(min=1)


class ListenAddress(click.ParamType):
    """ADDR:PORT to listen on (":PORT" for 127.0.0.1; port 0: any free port). Stays a string."""

    name = "ADDR:PORT"

    def convert(self, value, param, ctx):
        host, colon, port = str(value).rpartition(":")
        if not colon or not port.isdigit() or not 0 <= int(port) <= PORT_MAX:
            self.fail(f"{value!r} is not ADDR:PORT with a port from 0 to {PORT_MAX}", param, ctx)
        return str(value)


LISTEN_ADDRESS = ListenAddress()


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


class OutputPath(click.Path):
    """A file (`folder=False`) or folder (`folder=True`) edgefa will write, checked before the work:
    not empty, not the wrong kind of thing, and creatable where it is asked for: its missing
    parent folders are made when it is written, so the nearest one that exists must be a
    writable folder (not a file, not a read-only mount)."""

    def __init__(self, folder: bool):
        super().__init__(file_okay=not folder, dir_okay=folder, writable=True)
        self.folder = folder

    def convert(self, value, param, ctx):
        if str(value).strip() == "":
            self.fail("an empty path", param, ctx)
        value = super().convert(value, param, ctx)      # an existing path of the wrong kind, unwritable
        path = Path(value)
        where = path if self.folder and path.exists() else _nearest_existing(path.parent)
        if not where.is_dir():
            self.fail(f"{str(value)!r}: {str(where)!r} is a file, not a folder", param, ctx)
        if not os.access(where, os.W_OK | os.X_OK):
            self.fail(f"{str(value)!r}: the folder {str(where)!r} is not writable", param, ctx)
        return value


OUT_FOLDER = OutputPath(folder=True)
OUT_FILE = OutputPath(folder=False)
