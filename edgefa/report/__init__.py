"""Everything edgefa writes for people to read, on either side (standard library only, no torch):

  format.py            numbers as text (bytes, percentages, cosines, seconds, joules, ...)
  page.py              the HTML page shell and its pieces (headings, notes, tables, figures), writing
  svg.py               charts as inline SVG (histogram, bars, lines)
  markdown.py          markdown tables
  profile_page.py      `edgefa profile`: report.html
  compare_page.py      `edgefa profile compare`: compare.html
  training_page.py     `edgefa report RUN/`: RUN/report.html
  fpga_sweep_page.py   `edgefa fpga sweep`: sweep.html, sweep.svg, sweep.md
  outputs.py           the one writer of the files `profile`, `profile compare`, `fpga sweep` leave
  terminal.py          what `edgefa ...` prints: its tables (rich), from the library's results

The experiments (`edgefa audit`, `edgefa experiment preference`) build their pages and tables from
page.py, svg.py and markdown.py.
"""

from edgefa.report.compare_page import render_compare_report
from edgefa.report.page import write_report
from edgefa.report.profile_page import render_profile_report

__all__ = ["render_compare_report", "render_profile_report", "write_report"]
