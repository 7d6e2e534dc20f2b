"""`edgefa audit`: the protocol over rules and penalties, over seeds, with its table and plots.

One tiny audit (resmlp 16 x 1, one epoch, one seed) runs in this process through the CLI's own
code; the spec errors run as real subprocesses without torch (they are refused before it loads).
"""

from __future__ import annotations

import json

import pytest

from edgefa.errors import EdgefaError
from edgefa.experiments.audit import FILES, AuditSpec, lambda_text, markdown, parse_configs, render_report

from conftest import assert_one_error_line, cli_in_process, run_edgefa

TINY = ("--configs", "bp,dfa,dfa+1e-2", "--seeds", "0", "--width", "16", "--depth", "1", "--epochs", "1",
        "--null-draws", "2", "--probes", "8", "--eval-batch", "64")


def test_config_specs():
    assert parse_configs("bp,dfa+1e-2,hybrid") == [AuditSpec("bp"), AuditSpec("dfa", 0.01), AuditSpec("hybrid")]
    assert [s.label for s in parse_configs("dfa+1e-4,dfa+0.1,fa")] == ["dfa λ=1e-4", "dfa λ=1e-1", "fa"]
    assert lambda_text(2.5e-3) == "2.5e-3"
    for bad, fragment in [("sgd", "not RULE"), ("dfa+x", "not a number"), ("dfa+0", "> 0"), ("dfa+nan", "> 0"),
                          ("bp,bp", "more than once"), ("", "comma-separated")]:
        with pytest.raises(EdgefaError, match=fragment):
            parse_configs(bad)


@pytest.fixture(scope="module")
def audit_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit")
    proc = cli_in_process("audit", *TINY, "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


def test_audit_writes_its_table_plots_and_runs(audit_dir):
    out, proc = audit_dir
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    result = json.loads((out / "audit.json").read_text())
    assert result["schema"] == "edgefa.audit/1"
    assert [s["config"] for s in result["summary"]] == ["bp", "dfa", "dfa λ=1e-2"]
    assert len(result["runs"]) == 3
    # every run was diagnosed, in its own folder, against a frozen baseline
    for row in result["runs"]:
        saved = json.loads((out / "runs" / row["run_dir"].split("/runs/")[1] / "diagnosis.json").read_text())
        assert saved["verdict"] == row["verdict"] and saved["fired"] == row["fired"]
        assert row["baseline_accuracy"] is not None and 0 <= row["accuracy"] <= 1
        assert list(row["gamma"]) == ["embed", "block0"]
        assert len(row["trajectory"]) == 1 and row["trajectory"][0]["h_L"] > 0
    # one baseline per (rule, seed): penalized DFA shares DFA's (its penalty is inert on frozen blocks)
    assert sorted(p.name for p in (out / "baselines").iterdir()) == ["bp-seed0", "dfa-seed0"]
    by = {r["config"]: r for r in result["runs"]}
    assert by["dfa"]["baseline_accuracy"] == by["dfa λ=1e-2"]["baseline_accuracy"]
    assert by["bp"]["gamma"]["block0"] == pytest.approx(1.0, abs=1e-6)
    assert abs(by["dfa"]["gamma"]["block0"]) < 0.999                 # DFA's signal is not the gradient


def test_audit_table_names_its_reductions_and_the_reference(audit_dir):
    out, proc = audit_dir
    text = (out / "audit.md").read_text()
    assert text == markdown(json.loads((out / "audit.json").read_text()))
    assert "mean ± sample std (ddof 1) over seeds" in text and "median over seeds" in text
    assert "| dfa λ=1e-2 |" in text and "CIFAR-10" in text and "237x" in text
    assert "\\|\\|g_L\\|\\|" in text                # the norm bars do not break the markdown table
    assert "walk" in proc.stdout or "trust" in proc.stdout          # the verdict column (wrapped at 80)
    html = (out / "audit.html").read_text()
    assert html.count("<svg") == 3 and "Gamma per stage" in html
    with pytest.raises(EdgefaError, match="edgefa.audit/1"):
        render_report({"schema": "other"})


@pytest.mark.parametrize("args, fragment", [
    (("--configs", "foo"), "not RULE"),
    (("--seeds", "x"), "whole number"),
    (("--epochs", "0"), "'--epochs': 0 is not in the range 1<=x<=1000000000"),
    (("--dtype", "fp16"), "refused"),
])
def test_bad_audit_specs_are_one_line_without_torch(tmp_path, args, fragment):
    proc = run_edgefa("audit", *args, "--out", tmp_path / "a", without_torch=True)
    assert_one_error_line(proc, fragment)
    assert not (tmp_path / "a").exists()
