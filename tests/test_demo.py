"""`edgefa demo` end to end, as a user runs it: the table, and a real gain on the shifted sensor,
for the MLP (the default) and the 2-D CNN whose conv stages the device trains by DFA."""

from __future__ import annotations

import json

import numpy as np
from conftest import run_edgefa


def check_device_process(report: dict) -> None:
    """The device was a server behind a pseudo-terminal, run by edgefa.without_torch (where any
    `import torch` raises), and it ran every step: so it never imported torch."""
    device = report["device_report"]
    assert device["server_command"][:2] == ["-m", "edgefa.without_torch"]
    assert device["server_command"][2:4] == ["device", "serve"]
    assert device["tty"].startswith("/dev/pts/")
    assert device["steps_run"] == report["steps"] and device["final_step"] == report["steps"]
    assert device["refused_steps"] == [] and device["stopped"] is None


def test_demo_prints_table_and_device_finetuning_helps(tmp_path):
    proc = run_edgefa("demo", "--out", tmp_path / "demo")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for row in ("before fine-tuning", "after DFA fine-tuning on the device", "after BP fine-tuning",
                "device step time", "peak RSS", "bundle size", "device energy per step"):
        assert row in proc.stdout
    report = json.loads((tmp_path / "demo" / "demo_report.json").read_text())
    assert report["model"] == "mlp" and "CNN" not in proc.stdout
    assert report["after_device_dfa"] - report["before"] >= 0.20
    assert report["after_host_bp"] > report["before"]
    check_device_process(report)
    assert report["device_step_ms_median"] > 0 and report["device_peak_rss_bytes"] > 0
    # energy per step, from a sensor where the machine has one, else estimated and labelled so
    assert report["energy_per_step_j"] > 0 and report["energy_method"] in ("measured", "estimated")
    if report["energy_method"] == "estimated":
        assert "device energy per step (estimated)" in proc.stdout
    # the device was a server behind a pseudo-terminal, and its fine-tuned bundle came back
    assert report["round_trip_ms_median"] >= report["device_step_ms_median"]
    assert (tmp_path / "demo" / "device-bundle" / "state" / "checkpoint.npz").is_file()


def test_demo_cnn_trains_every_conv_stage_on_the_device(tmp_path):
    # short: 5 host epochs (about 75 % clean) and 60 device steps still gain some 50 points
    proc = run_edgefa("demo", "--model", "cnn", "--epochs", "5", "--steps", "60", "--out", tmp_path / "demo")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CNN 1x8x8, conv3 16-32, fc 128" in proc.stdout
    report = json.loads((tmp_path / "demo" / "demo_report.json").read_text())
    assert report["model"] == "cnn" and report["steps"] == 60
    check_device_process(report)
    assert report["after_device_dfa"] - report["before"] >= 0.20
    assert report["after_host_bp"] > report["before"]
    # the bundle the device trained holds every conv stage (no frozen trunk), and it came back trained
    manifest = json.loads((tmp_path / "demo" / "device-bundle" / "manifest.json").read_text())
    assert manifest["model"]["kind"] == "cnn" and "trunk" not in manifest["model"]
    assert manifest["model"]["trainable"] == "all"
    # every stage, conv0 included, moved away from the exported weights on the device
    with np.load(tmp_path / "demo" / "bundle" / "weights.npz", allow_pickle=False) as exported, \
            np.load(tmp_path / "demo" / "device-bundle" / "state" / "checkpoint.npz", allow_pickle=False) as tuned:
        for name in ("conv0.weight", "conv1.weight", "fc.weight", "head.weight"):
            assert np.abs(tuned[name] - exported[name]).max() > 1e-4, name
