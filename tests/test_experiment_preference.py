"""`edgefa experiment preference`: the grid's specs, the summary (sample std), and a tiny sweep from
the CLI that writes the JSON, the table, the plot and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import assert_one_error_line, run_all
from edgefa.cli import main
from edgefa.errors import EdgefaError
from edgefa.experiments.grid import parse_seeds
from edgefa.experiments.preference import FILES, RuleSpec, markdown_table, parse_rules, parse_sigmas, summary


def test_rule_sigma_and_seed_specs():
    assert parse_rules("bp, dfa,hybrid-10,usf,fa,hybrid-3") == [
        RuleSpec("bp", "bp"), RuleSpec("dfa", "dfa"), RuleSpec("hybrid-10", "hybrid", 10), RuleSpec("usf", "usf"),
        RuleSpec("fa", "fa"), RuleSpec("hybrid-3", "hybrid", 3)]
    assert parse_rules("hybrid") == [RuleSpec("hybrid-10", "hybrid", 10)]
    assert parse_sigmas("1,0,0.25") == [0.0, 0.25, 1.0]
    assert parse_seeds("0,3") == [0, 3]
    for call, text, message in [
        (parse_rules, "foo", "unknown rule 'foo'"), (parse_rules, "hybrid-0", "K must be at least 1"),
        (parse_rules, "hybrid--2", "K must be at least 1"), (parse_rules, "hybrid-x", "unknown rule"),
        (parse_rules, "bp,bp", "more than once"), (parse_rules, "hybrid,hybrid-10", "same rule twice"),
        (parse_rules, "bp,,dfa", "comma-separated"), (parse_sigmas, "-1", "finite and >= 0"),
        (parse_sigmas, "nan", "finite"), (parse_sigmas, "a", "not a number"), (parse_seeds, "1.5", "whole number"),
        (parse_seeds, "-1", ">= 0")]:
        with pytest.raises(EdgefaError, match=message):
            call(text)


def _fake(rows) -> dict:
    sigmas = sorted({r[0] for r in rows})
    rules = list(dict.fromkeys(r[1] for r in rows))
    seeds = sorted({r[2] for r in rows})
    runs = [{"sigma": s, "rule": rule, "seed": seed, "heldout_accuracy": a, "ceiling": c, "n_test": 10}
            for s, rule, seed, a, c in rows]
    config = {"pairs": 40, "dim": 4, "hidden": [8], "activation": "relu", "loss": "bradley-terry", "margin": 1.0,
              "epochs": 1, "batch_size": 8, "lr": 0.01, "momentum": 0.9}
    return {"sigmas": sigmas, "rules": rules, "seeds": seeds, "runs": runs, "config": config,
            "ceiling_definition": "the ceiling"}


def test_the_table_is_mean_and_sample_std_over_seeds():
    result = _fake([(0.0, "bp", 0, 0.9, 1.0), (0.0, "bp", 1, 0.8, 1.0), (0.0, "bp", 2, 0.7, 1.0),
                    (1.0, "bp", 0, 0.6, 0.8), (1.0, "bp", 1, 0.5, 0.7), (1.0, "bp", 2, 0.7, 0.6)])
    s = summary(result)
    mean, std = s["accuracy"]["bp"][0]
    assert mean == pytest.approx(0.8) and std == pytest.approx(np.std([0.9, 0.8, 0.7], ddof=1)) == pytest.approx(0.1)
    assert s["ceiling"][1] == pytest.approx((0.7, 0.1))
    md = markdown_table(result)
    assert "| 0 | 80.0 ± 10.0% | 100.0 ± 0.0% |" in md and "| 1 | 60.0 ± 10.0% | 70.0 ± 10.0% |" in md
    assert "sample std (ddof=1)" in md
    one_seed = _fake([(0.0, "bp", 0, 0.9, 1.0)])          # one seed: a mean and no std (ddof=1 is undefined)
    assert summary(one_seed)["accuracy"]["bp"] == [(pytest.approx(0.9), None)]
    assert "| 0 | 90.0% | 100.0% |" in markdown_table(one_seed) and "one seed" in markdown_table(one_seed)


def test_bad_specs_are_one_line_before_anything_runs(tmp_path):
    results = run_all(*(("experiment", "preference", *args, "--out", tmp_path / "never") for args in (
        ("--rules", "foo"), ("--rules", "bp,hybrid-0"), ("--sigmas=-1",), ("--sigmas", "0,-0.5"),
        ("--pairs", "2"))))
    for proc, fragment in zip(results, ("--rules: unknown rule 'foo'", "--rules: hybrid-0: K must be at least 1",
                                        "--sigmas: sigma must be finite and >= 0, got -1", "got -0.5",
                                        "'--pairs': 2 is not in the range 4<=x<=1000000000")):
        assert_one_error_line(proc, fragment)
    assert not (tmp_path / "never").exists()


def test_a_tiny_sweep_from_the_cli_writes_the_table_and_the_plot(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["experiment", "preference", "--sigmas", "2,0,0.5", "--rules", "bp,hybrid-2", "--seeds", "0,1",
            "--pairs", "120", "--epochs", "2", "--hidden", "8", "--batch-size", "16", "--device", "cpu",
            "--out", str(out)]
    capsys.readouterr()
    try:
        main(args)
    except SystemExit as exc:                           # pragma: no cover - a failure shows its output
        pytest.fail(f"exit {exc.code}: {capsys.readouterr()}")
    printed = capsys.readouterr().out
    assert "held-out preference accuracy" in printed and "hybrid-2" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)

    result = json.loads((out / "preference.json").read_text())
    assert result["schema"] == "edgefa.preference-sweep/1"
    assert result["sigmas"] == [0.0, 0.5, 2.0] and result["rules"] == ["bp", "hybrid-2"] and result["seeds"] == [0, 1]
    runs = result["runs"]
    assert len(runs) == 3 * 2 * 2
    assert {(r["sigma"], r["rule"], r["seed"]) for r in runs} == {
        (s, rule, seed) for s in (0.0, 0.5, 2.0) for rule in ("bp", "hybrid-2") for seed in (0, 1)}
    for r in runs:
        assert {"sigma", "rule", "k", "seed", "heldout_accuracy", "ceiling"} <= set(r)
        assert 0 <= r["heldout_accuracy"] <= 1 and r["n_test"] == 30
        assert r["k"] == (2 if r["rule"] == "hybrid-2" else None)
    # every rule of a seed sees the same held-out pairs: one ceiling per (sigma, seed)
    ceiling = {(r["sigma"], r["seed"]): r["ceiling"] for r in runs}
    assert all(r["ceiling"] == ceiling[r["sigma"], r["seed"]] for r in runs)
    # the ceiling falls with sigma: for each seed (the same noise draws, scaled) and on average
    for seed in (0, 1):
        per_seed = [ceiling[s, seed] for s in (0.0, 0.5, 2.0)]
        assert per_seed[0] == 1.0 and per_seed == sorted(per_seed, reverse=True)
    means = [m for m, _ in summary(result)["ceiling"]]
    assert means[0] > means[1] > means[2]

    lines = (out / "preference.md").read_text().splitlines()
    table = lines[:lines.index("")]                            # the table, then its caption
    assert len(table) == 2 + 3                                 # header, rule, one row per sigma
    assert [c.strip() for c in table[0].strip("|").split("|")] == ["sigma", "bp", "hybrid-2", "ceiling (Bayes)"]
    assert all(len(row.strip("|").split("|")) == 4 for row in table)
    assert [row.split("|")[1].strip() for row in table[2:]] == ["0", "0.5", "2"]
    assert table[2].rstrip(" |").endswith("100.0 ± 0.0%")
    assert "sample std (ddof=1)" in "\n".join(lines)

    svg = (out / "preference.svg").read_text()
    assert svg.startswith('<svg xmlns="http://www.w3.org/2000/svg"') and 'data-plot="preference-sweep"' in svg
    assert svg.count("<polyline") == 3                         # two rules and the ceiling
    assert "ceiling (Bayes)" in svg and "hybrid-2" in svg
    html = (out / "preference.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<svg" in html and "ceiling (Bayes)" in html
    assert "<script" not in html and html.count("<tr>") >= 3 + 12
