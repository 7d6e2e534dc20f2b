"""The budget against a measurement on this machine, with the profile detected here: predicted peak
memory within 25 % of the measured peak RSS of a real fine-tuning process, and the roofline bound
never above any measured step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import assert_one_error_line, run_all, run_edgefa

# (name, input, hidden, momentum): small and cache-resident, two wide ones, a deep one, no momentum
MODELS = [("tiny", 64, [32, 16], 0.9), ("mid", 784, [1024, 1024], 0.9),
          ("wide", 256, [4096], 0.0), ("deep", 128, [512] * 6, 0.9)]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    import torch

    from edgefa.shared.datasets import Standardizer
    from edgefa.exporters.export import export_bundle
    from edgefa.models import MLP, MLPConfig
    from edgefa.training.trainer import Run, TrainConfig, make_optimizer

    out = tmp_path_factory.mktemp("budget-bundles")
    paths = {}
    for name, inputs, hidden, momentum in MODELS:
        torch.manual_seed(0)
        model = MLP(MLPConfig(inputs, hidden, 10, rule="dfa"))
        run = Run(model, make_optimizer(model, 0.003, momentum),
                  TrainConfig(method="dfa", hidden=hidden, lr=0.003, momentum=momentum),
                  Standardizer(0.0, 1.0), {"final_test_accuracy": None}, None)
        paths[name] = export_bundle(run, out / name, momentum=momentum)
    return paths


@pytest.fixture(scope="module")
def measured(bundles, tmp_path_factory) -> dict[tuple[str, int], dict]:
    """`edgefa profile` of each bundle at batch 32 and 256, each in its own torch-free process
    (two at a time: peak RSS is per process, and the step-time bound only gets easier under load)."""
    out = tmp_path_factory.mktemp("budget-profiles")
    cases = [(name, batch) for name in bundles for batch in (32, 256)]
    procs = []
    for i in range(0, len(cases), 2):
        procs += run_all(*[("profile", bundles[n], "--steps", "30", "--batch", str(b), "--warmup", "3",
                            "--out", out / f"{n}-{b}") for n, b in cases[i:i + 2]])
    for proc in procs:
        assert proc.returncode == 0, proc.stderr
    return {(n, b): json.loads((out / f"{n}-{b}" / "profile.json").read_text()) for n, b in cases}


@pytest.mark.parametrize("name", [m[0] for m in MODELS])
@pytest.mark.parametrize("batch", [32, 256])
def test_predicted_peak_memory_is_within_25_percent_of_the_measured_peak(measured, name, batch):
    p = measured[(name, batch)]
    assert p["device_profile"]["name"] == "generic-x86" and p["budget"]["profile"] == "generic-x86"
    predicted, actual = p["budget"]["peak_bytes"], p["memory"]["peak_rss_bytes"]
    assert abs(predicted - actual) <= 0.25 * actual, (name, batch, predicted >> 20, actual >> 20,
                                                      p["budget"]["memory_bytes"])


@pytest.mark.parametrize("name", [m[0] for m in MODELS])
@pytest.mark.parametrize("batch", [32, 256])
def test_the_step_time_bound_is_never_above_a_measured_step(measured, name, batch):
    p = measured[(name, batch)]
    bound_ms = p["budget"]["step_lower_bound_s"] * 1e3
    fastest_ms = min(p["phases"]["train_step"]["samples_ms"])
    assert 0 < bound_ms <= fastest_ms, (name, batch, bound_ms, fastest_ms, p["budget"]["bound_by"])


def test_budget_command_tells_whether_it_fits(bundles):
    ok, too_big = run_all(("budget", bundles["mid"], "--profile", "jetson-nano-4gb", "--batch", "64", "--json"),
                          ("budget", bundles["mid"], "--profile", "jetson-nano-4gb", "--batch", "64",
                           "--samples", "200000000"))
    assert ok.returncode == 0, ok.stderr
    b = json.loads(ok.stdout)
    assert b["fits"] and b["provider"] == "CPUExecutionProvider" and b["profile"] == "jetson-nano-4gb"
    # the nano's onnxruntime is the CPU one: the step updates in place, no second side, one scratch
    assert b["memory_bytes"]["ping-pong"] == 0
    assert 0 < b["memory_bytes"]["update temp"] < b["memory_bytes"]["weights"]
    assert b["step_lower_bound_s"] == max(b["compute_s"], b["memory_s"])
    assert too_big.returncode == 0 and "does not fit" in too_big.stdout


def test_budget_names_an_unknown_profile(bundles):
    proc = run_edgefa("budget", bundles["tiny"], "--profile", "jetson-tx9")
    assert_one_error_line(proc, "jetson-tx9", "jetson-nano-4gb")
