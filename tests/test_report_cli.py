"""`edgefa report RUN/`: a real tiny run, its table and HTML report; runs without alignment; bad files."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import assert_one_error_line, cli_in_process, run_edgefa


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    proc = cli_in_process("train", "--epochs", "2", "--hidden", "16", "--device", "cpu", "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.fixture
def run_copy(small_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(small_run, dst)
    return dst


def test_train_logs_alignment_per_epoch(small_run):
    metrics = json.loads((small_run / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["epochs"]] == [1, 2]
    for row in metrics["epochs"]:
        found = row["alignment"]
        assert found["probe_samples"] == 256 and found["dtype"] == "float64"
        assert "per weight tensor, flattened" in found["aggregation"]["weight_grad_cosine"]
        assert set(found["layers"]) == {"hidden_layers.0", "head"}
        assert set(found["stages"]) == {"hidden_layers.0"}


def test_report_prints_the_table_and_writes_html(run_copy):
    proc = run_edgefa("report", run_copy)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "hidden_layers.0" in proc.stdout and "per weight tensor, flattened" in proc.stdout
    assert "signal cosine" in proc.stdout
    page = (run_copy / "report.html").read_text()
    assert page.count("<svg") >= 3          # accuracy, weight-gradient cosine, signal cosine
    for kind in ("accuracy", "alignment-weight-cosine", "alignment-signal-cosine"):
        assert f'data-plot="{kind}"' in page
    assert "<script" not in page and "http" not in page.replace("http://www.w3.org", "")


def test_report_out_option_and_without_torch(run_copy, tmp_path):
    target = tmp_path / "elsewhere" / "r.html"
    proc = run_edgefa("report", run_copy, "--out", target, without_torch=True)   # reading JSON needs no torch
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "<svg" in target.read_text()
    assert not (run_copy / "report.html").exists()


def test_fa_run_reports_alignment_error(tmp_path):
    from edgefa.training.trainer import TrainConfig, save_run, train   # in-process: one torch import less

    out = tmp_path / "fa"
    save_run(train(TrainConfig(method="fa", hidden=[8], epochs=1, device="cpu")), out)
    proc = run_edgefa("report", out, without_torch=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "||W - B||_F" in proc.stdout and "(B unused)" in proc.stdout
    assert 'data-plot="alignment-error"' in (out / "report.html").read_text()


def test_run_without_alignment_still_reports_accuracy(run_copy):
    path = run_copy / "metrics.json"
    metrics = json.loads(path.read_text())
    for row in metrics["epochs"]:
        row.pop("alignment")
    path.write_text(json.dumps(metrics))
    proc = run_edgefa("report", run_copy, without_torch=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "alignment was not logged" in proc.stdout
    page = (run_copy / "report.html").read_text()
    assert 'data-plot="accuracy"' in page and "alignment was not logged" in page
    assert "alignment-weight-cosine" not in page


def test_degenerate_cosines_read_as_degenerate(run_copy):
    path = run_copy / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["epochs"][-1]["alignment"]["layers"]["hidden_layers.0"]["weight_grad_cosine"] = None
    path.write_text(json.dumps(metrics))
    proc = run_edgefa("report", run_copy, without_torch=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "degenerate" in proc.stdout
    assert "degenerate" in (run_copy / "report.html").read_text()


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"epochs": 3}', b"\xff\xfe\x00"])
def test_corrupt_metrics_is_one_line(run_copy, content):
    path = run_copy / "metrics.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    proc = run_edgefa("report", run_copy, without_torch=True)
    assert_one_error_line(proc, "metrics.json")
    assert not (run_copy / "report.html").exists()


def test_missing_metrics_is_one_line(tmp_path):
    proc = run_edgefa("report", tmp_path / "nowhere", without_torch=True)
    assert_one_error_line(proc, "metrics.json", "no metrics file")
