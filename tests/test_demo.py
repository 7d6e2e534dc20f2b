"""`edgefa demo` end to end, as a user runs it: the table, and a real gain on the shifted sensor."""

from __future__ import annotations

import json

from conftest import run_edgefa


def test_demo_prints_table_and_device_finetuning_helps(tmp_path):
    proc = run_edgefa("demo", "--out", tmp_path / "demo")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for row in ("before fine-tuning", "after DFA fine-tuning on the device", "after BP fine-tuning",
                "device step time", "peak RSS", "bundle size", "device energy per step"):
        assert row in proc.stdout
    report = json.loads((tmp_path / "demo" / "demo_report.json").read_text())
    assert report["after_device_dfa"] - report["before"] >= 0.20
    assert report["after_host_bp"] > report["before"]
    assert report["device_report"]["steps_run"] == report["steps"]
    assert report["device_report"]["refused_steps"] == []
    assert report["device_step_ms_median"] > 0 and report["device_peak_rss_bytes"] > 0
    # energy per step, from a sensor where the machine has one, else estimated and labelled so
    assert report["energy_per_step_j"] > 0 and report["energy_method"] in ("measured", "estimated")
    if report["energy_method"] == "estimated":
        assert "device energy per step (estimated)" in proc.stdout
    # the device was a server behind a pseudo-terminal, and its fine-tuned bundle came back
    assert report["device_report"]["tty"].startswith("/dev/pts/")
    assert report["round_trip_ms_median"] >= report["device_step_ms_median"]
    assert (tmp_path / "demo" / "device-bundle" / "state" / "checkpoint.npz").is_file()
