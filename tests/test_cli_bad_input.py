"""Every option of every `edgefa` command, fed the values that cannot be right.

The walk reads click's own metadata (cli.commands, recursively, and each parameter's type), so a
new command or option is covered the day it is added. For each parameter a catalogue of bad
values is drawn from its type: the value just outside each bound of a range, 0 and -1 where they
are below the minimum, NaN, +-inf, a huge number, an empty string, text where a number is wanted;
for paths a missing path, a file where a folder is wanted, a folder where a file is wanted, and a
path that cannot be written (under a regular file: the tests run as root, for whom no permission
bit refuses anything). Every case must end the way bad input ends in edgefa: exit status 2, one
line on stderr naming the parameter (or the path), no traceback, nothing on stdout, and no file
in the test's folder changed.

A meta-test keeps the walk honest: an INT or FLOAT option must use a range type (click.IntRange,
cli_types.Finite) or one of cli_types' checked types, so a new option without one fails here.

In process (cli_in_process: edgefa.cli.main, the real entry point), so a case that click refuses
while parsing costs well under a millisecond; the few that reach the library (a missing run or
bundle folder) import what they need once.
"""

from __future__ import annotations

import math
import signal
from pathlib import Path

import click
import pytest

from conftest import assert_one_error_line, cli_in_process
from edgefa.cli import cli
from edgefa.cli_types import Finite, IntList, ListenAddress, OutputPath, Text

CASE_TIMEOUT_S = 30            # a case that starts real work instead of refusing: fail, do not hang


def commands(group: click.Group = cli, path: tuple[str, ...] = ()):
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))
        else:
            yield (*path, name), command


def parameters(command: click.Command):
    """The parameters that take a value (flags and --help take none)."""
    for param in command.params:
        if isinstance(param, click.Option) and (param.is_flag or param.count):
            continue
        yield param


def label(param: click.Parameter) -> str:
    return param.opts[0] if isinstance(param, click.Option) else param.human_readable_name


# --- the catalogue of bad values, by type ----------------------------------------------------------

def below(bound: float, open_: bool) -> float:
    return bound if open_ else math.nextafter(bound, -math.inf)


def above(bound: float, open_: bool) -> float:
    return bound if open_ else math.nextafter(bound, math.inf)


def bad_values(param: click.Parameter, place: dict[str, Path]) -> list[tuple[str, str]]:
    """(what, value) pairs that `param` must refuse. `place`: a regular file, an existing folder
    and a path that does not exist, in the test's folder."""
    t, cases = param.type, []
    if isinstance(t, click.IntRange):
        if t.min is not None:
            low = t.min - 1 if not t.min_open else t.min
            cases += [("just below the minimum", str(low))]
            cases += [(f"{v} (below the minimum)", str(v)) for v in (0, -1) if v < t.min or (v == t.min and t.min_open)]
        if t.max is not None:
            cases += [("just above the maximum", str(t.max + 1 if not t.max_open else t.max)), ("huge", str(10 ** 30))]
        cases += [("not an integer", "1.5"), ("NaN", "nan"), ("empty", "")]
    elif isinstance(t, Finite):
        if t.min is not None:
            cases += [("just below the minimum", repr(below(t.min, t.min_open)))]
            cases += [(f"{v} (below the minimum)", str(v)) for v in (0, -1)
                      if v < t.min or (v == t.min and t.min_open)]
        if t.max is not None:
            cases += [("just above the maximum", repr(above(t.max, t.max_open)))]
        cases += [("NaN", "nan"), ("inf", "inf"), ("-inf", "-inf"), ("huge (overflows to inf)", "1e309"),
                  ("text", "abc"), ("empty", "")]
    elif isinstance(t, IntList):
        cases += [("empty", ""), ("text", "abc"), ("0", "0"), ("-1", "-1"), ("a gap and text", "8,,x"), ("1.5", "1.5"),
                  ("huge", f"8,{10 ** 30}")]
    elif isinstance(t, ListenAddress):
        cases += [("empty", ""), ("port too large", "127.0.0.1:99999"), ("negative port", "127.0.0.1:-1"),
                  ("no port", "127.0.0.1"), ("port not a number", "localhost:http")]
    elif isinstance(t, OutputPath):
        cases += [("empty", ""), ("under a regular file (unwritable)", str(place["file"] / "sub" / "x"))]
        if t.folder:
            cases += [("a file where a folder is wanted", str(place["file"]))]
        else:
            cases += [("a folder where a file is wanted", str(place["folder"]))]
    elif isinstance(t, click.Path):
        cases += [("missing", str(place["missing"]))]
        if not t.file_okay:
            cases += [("a file where a folder is wanted", str(place["file"]))]
        if not t.dir_okay:
            cases += [("a folder where a file is wanted", str(place["folder"]))]
    elif isinstance(t, Text):
        cases += [("empty", ""), ("blank", "  ")]
    elif isinstance(t, click.Choice):
        cases += [("empty", ""), ("not a choice", "no-such-choice")]
    return cases


def fill_value(param: click.Parameter, place: dict[str, Path]) -> str:
    """A value for a required parameter the case does not test: one that parses, so that the case's
    own error is the one reported."""
    t = param.type
    if isinstance(t, OutputPath):
        return str(place["missing"] / "out")
    if isinstance(t, click.Path):
        return str(place["folder"] if t.dir_okay else place["file"])
    if isinstance(t, IntList):                    # a required list of widths (`bundle from-onnx --head`)
        return str(max(t.min, 8))
    if isinstance(t, click.IntRange) and t.min is not None:
        return str(t.min if not t.min_open else t.min + 1)
    if isinstance(t, click.types.IntParamType):
        return "1"
    if param.human_readable_name == "URL" or (isinstance(param, click.Option) and "url" == param.name):
        return "socket://127.0.0.1:1"
    return "digits"


def cases():
    for path, command in commands():
        for param in parameters(command):
            yield path, command, param


ALL = list(cases())


def arguments_for(command: click.Command, param: click.Parameter, value: str, place) -> list[str]:
    """The bad value first (click processes what it is given in command-line order, so the case's
    error comes before any other), then every other required parameter with a fill value. (A bad
    argument goes first too: positionals may come before options.)"""
    args = [param.opts[0], value] if isinstance(param, click.Option) else []
    positional = []
    for other in command.params:
        if other is param or not other.required:
            if other is param and isinstance(other, click.Argument):
                positional.append(value)
            continue
        fill = fill_value(other, place)
        if isinstance(other, click.Argument):
            positional.append(fill)
        else:
            args += [other.opts[0], fill]
    return positional + args if isinstance(param, click.Argument) else args + positional


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                # anything a case wrongly wrote would land here
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "keep.txt").write_text("a user's file\n")
    (tmp_path / "file").write_text("a regular file\n")
    return {"file": tmp_path / "file", "folder": tmp_path / "folder", "missing": tmp_path / "missing"}


class Hung(Exception):
    pass


def run_case(args: list[str]):
    def alarm(signum, frame):
        raise Hung(f"edgefa {' '.join(args)}: still running after {CASE_TIMEOUT_S} s (it started work)")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(CASE_TIMEOUT_S)
    try:
        return cli_in_process(*args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("path, command, param", ALL,
                         ids=[f"{' '.join(p)} {label(param)}" for p, _, param in ALL])
def test_every_bad_value_is_one_line_and_exit_2(path, command, param, place, tmp_path):
    catalogue = bad_values(param, place)
    assert catalogue, f"{label(param)}: a {type(param.type).__name__} the walk has no bad values for"
    for what, value in catalogue:
        before = snapshot(tmp_path)
        args = [*path, *arguments_for(command, param, value, place)]
        proc = run_case(args)
        try:
            line = assert_one_error_line(proc)
        except AssertionError as exc:
            raise AssertionError(f"edgefa {' '.join(args)} ({what}): {exc}") from None
        # the line names the parameter, or the path it could not use (a library's own check)
        assert f"'{label(param)}'" in line or (value.strip() and value in line), (what, args, line)
        assert snapshot(tmp_path) == before, (what, args, "changed files")


def test_every_parameter_has_a_checked_type():
    """A new INT or FLOAT option without a range, or a plain string one, fails here."""
    unchecked = [f"{' '.join(path)} {label(param)}: {type(param.type).__name__}"
                 for path, command, param in ALL
                 if isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType))
                 and not isinstance(param.type, (click.IntRange, Finite))]
    unchecked += [f"{' '.join(path)} {label(param)}: an IntRange with no maximum (a huge count runs until killed)"
                  for path, command, param in ALL if isinstance(param.type, click.IntRange) and param.type.max is None]
    unchecked += [f"{' '.join(path)} {label(param)}: click.FloatRange lets NaN through"
                  for path, command, param in ALL
                  if isinstance(param.type, click.FloatRange) and not isinstance(param.type, Finite)]
    unchecked += [f"{' '.join(path)} {label(param)}: a plain string (cli_types.refuse_empty_text missed it)"
                  for path, command, param in ALL if type(param.type) is click.types.StringParamType]
    assert not unchecked, "\n".join(unchecked)


def test_the_walk_covers_every_command():
    """The walk is not vacuous: every leaf command, and the counts reported in the README."""
    names = {" ".join(path) for path, _ in commands()}
    assert {"train", "export", "device finetune", "device serve", "device pull", "fpga simulate",
            "profile run", "fleet finetune", "demo"} <= names
    numbered = [p for _, _, p in ALL if isinstance(p.type, (click.IntRange, Finite))]
    assert len(numbered) > 100 and len(names) >= 29


# --- the known cases of issue 17, one by one (each failed before) ------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (("train", "--batch-size", "0", "--out", "o"), "'--batch-size': 0 is not in the range 1<=x<=1000000000"),
    (("train", "--seed", "-1", "--out", "o"), "'--seed': -1 is not in the range"),
    (("train", "--hidden", "abc", "--out", "o"), "'--hidden': 'abc' is not a comma-separated list of integers"),
    (("train", "--lr", "nan", "--out", "o"), "'--lr': 'nan' is not a finite number"),
    (("device", "serve", "--listen", "127.0.0.1:99999", "--store", "s"), "port from 0 to 65535"),
    (("finetune", "--device", "socket://127.0.0.1:1", "--data", "digits", "--steps", "3",
      "--report", "file/r.json"), "'file' is a file, not a folder"),
    (("fpga", "sweep", "b", "--data", "digits", "--widths", "8,x", "--out", "s"), "'--widths'"),
    # issue 17 B.3: accepted, and ran until killed
    (("device", "finetune", "b", "--data", "digits", "--steps", "99999999999999999999"),
     "'--steps': 99999999999999999999 is not in the range 1<=x<=1000000000"),
])
def test_issue_17_bad_inputs_are_refused_while_parsing(args, fragment, place, tmp_path):
    before = snapshot(tmp_path)
    assert_one_error_line(cli_in_process(*args), fragment)
    assert snapshot(tmp_path) == before


def test_fpga_simulate_refuses_a_learning_rate_it_cannot_hold(tiny_bundle, digits_npz, tmp_path):
    """--lr 3 was clamped silently to the largest ap_ufixed<16,0> value; now one line names the
    range. Shift mode, too: 2**-shift for shift 0..40."""
    line = assert_one_error_line(cli_in_process("fpga", "simulate", tiny_bundle, "--data", digits_npz, "--lr", "3",
                                                "--steps", "1"), "learning rate 3", "ap_ufixed<16,0")
    assert "1.52588e-05 .. 0.999985" in line, line
    tiny = assert_one_error_line(cli_in_process("fpga", "simulate", tiny_bundle, "--data", digits_npz, "--lr", "1e-7",
                                                "--steps", "1"), "learning rate 1e-07")
    assert "0.999985" in tiny
    config = tmp_path / "shift.toml"
    config.write_text('[learning_rate]\nmode = "shift"\n')
    assert_one_error_line(cli_in_process("fpga", "simulate", tiny_bundle, "--data", digits_npz, "--lr", "3",
                                         "--config", config, "--steps", "1"), "2**-40 .. 1")


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only bind mount of a folder: the one thing that refuses root a write. Skipped where
    this process may not mount (an unprivileged CI runner)."""
    import subprocess

    source, view = tmp_path / "ro-source", tmp_path / "ro"
    source.mkdir()
    view.mkdir()
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(source), str(view)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here: {mounted.stderr.decode().strip()}")
    try:
        yield view
    finally:
        subprocess.run(["umount", str(view)], check=True)


def test_a_read_only_folder_is_refused_before_the_work(read_only_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    for args in (("train", "--out", read_only_folder / "run"),
                 ("finetune", "--device", "socket://127.0.0.1:1", "--data", "digits", "--steps", "1",
                  "--report", read_only_folder / "r.json"),
                 ("profile", tmp_path, "--out", read_only_folder / "p")):
        assert_one_error_line(cli_in_process(*args), "is not writable")
    assert snapshot(tmp_path) == before


def test_a_report_in_a_folder_not_yet_made_is_written_after_the_work(tiny_bundle, digits_npz, tmp_path):
    """`--report nodir/r.json` ended in a traceback after the work was done; its folder is made now
    (as --out folders are), and what cannot be made is refused before the work (above)."""
    report = tmp_path / "nodir" / "deeper" / "r.json"
    proc = cli_in_process("device", "finetune", tiny_bundle, "--data", digits_npz, "--steps", "2", "--report", report)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '"final_step": 2' in report.read_text()
