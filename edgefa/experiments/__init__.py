"""Experiments: grids of host runs with a table, a plot and a report (`edgefa experiment ...`).

Each module parses its grid without importing torch (so a bad spec is one line at once) and
imports the training code only when it runs.
"""
