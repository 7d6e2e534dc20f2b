"""The files a command leaves in its --out folder, written by one writer (write_files): `edgefa
profile`, `profile compare` and `fpga sweep` call the functions below, `audit` and `experiment
preference` their own (experiments/), which use write_files too. Each file is written whole or not
at all.

Device side: standard library only (with the page modules beside it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from edgefa.report.compare_page import render_compare_report
from edgefa.report.fpga_sweep_page import markdown_table, render_sweep_report, sweep_chart
from edgefa.report.page import standalone_svg, write_report
from edgefa.report.profile_page import render_profile_report


def write_files(folder: str | os.PathLike, files: dict[str, str]) -> list[Path]:
    """Write each of `files` (name -> text) into `folder`, made when missing, atomically
    (page.write_report); their paths, in the order given."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in files.items():
        write_report(folder / name, text)
        paths.append(folder / name)
    return paths


def write_profile(result: dict, folder: str | os.PathLike) -> list[Path]:
    """`edgefa profile`: profile.json and report.html."""
    return write_files(folder, {"profile.json": json.dumps(result, indent=1),
                                  "report.html": render_profile_report(result)})


def write_compare(result: dict, folder: str | os.PathLike) -> list[Path]:
    """`edgefa profile compare`: compare.json and compare.html."""
    return write_files(folder, {"compare.json": json.dumps(result, indent=1),
                                  "compare.html": render_compare_report(result)})


def write_fpga_sweep(result: dict, folder: str | os.PathLike) -> list[Path]:
    """`edgefa fpga sweep`: sweep.json, sweep.md (the table), sweep.svg (the plot) and sweep.html."""
    return write_files(folder, {"sweep.json": json.dumps(result, indent=2),
                                  "sweep.md": markdown_table(result),
                                  "sweep.svg": standalone_svg(sweep_chart(result)),
                                  "sweep.html": render_sweep_report(result)})
