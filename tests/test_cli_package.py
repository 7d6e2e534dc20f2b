"""edgefa/cli/ as a package of thin commands: the entry points still work, and the logic the CLI
once held lives in the library, where these tests call it (TrainConfig.check, finetune_remote)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, assert_one_error_line, run_edgefa
from edgefa.errors import EdgefaError
from edgefa.link.client import DeviceClient, finetune_remote
from edgefa.shared.datasets import load_dataset
from edgefa.training.config import TrainConfig
from test_fleet import start_server


def test_python_dash_m_edgefa_cli_is_the_edgefa_command():
    version = subprocess.run([sys.executable, "-m", "edgefa.cli", "--version"], capture_output=True, text=True,
                             cwd=REPO, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("edgefa, version "), version.stdout + version.stderr
    bad = subprocess.run([sys.executable, "-m", "edgefa.cli", "device", "finetune"], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "device finetune: Missing argument 'BUNDLE'" in bad.stderr, bad.stderr


@pytest.mark.parametrize("settings, fragment", [
    (dict(batch_size=32, nproc=3), "--batch-size 32 is not divisible by --nproc 3"),
    (dict(activation="gelu"), "--activation gelu is for resmlp, cnn, vit and transformer"),
    (dict(penalty=1e-3), "--penalty and --freeze-blocks need residual blocks"),
    (dict(freeze_blocks=True), "--penalty and --freeze-blocks need residual blocks"),
])
def test_train_config_check_refuses_what_no_run_can_take(settings, fragment):
    with pytest.raises(EdgefaError, match=fragment.replace("-", r"\-")):
        TrainConfig(model="mlp", **settings).check()
    TrainConfig(model="resmlp", **{k: v for k, v in settings.items() if k != "nproc"}).check()   # blocks: fine


def test_train_refuses_a_bad_combination_before_torch_is_imported(tmp_path):
    proc = run_edgefa("train", "--activation", "gelu", "--out", tmp_path / "run", without_torch=True)
    assert_one_error_line(proc, "--activation gelu is for resmlp, cnn, vit and transformer")
    assert not (tmp_path / "run").exists()


def test_finetune_remote_evaluates_tunes_evaluates_and_leaves_a_finished_device_alone(tiny_bundle, digits_npz,
                                                                                    tmp_path):
    data = load_dataset(str(digits_npz))
    server, url = start_server(tmp_path / "store")
    try:
        with DeviceClient(url) as dev:
            dev.deploy(tiny_bundle)
            starts, steps = [], []
            result = finetune_remote(dev, data, 6, 16, 0, None, data, on_start=starts.append,
                                     on_step=lambda step, loss, rtt: steps.append(step), device_memory=True)
            assert starts == [0] and len(steps) == 6 and steps[-1] == 6
            assert (result["resumed_from_step"], result["final_step"], result["steps_run"]) == (0, 6, 6)
            assert 0.0 <= result["accuracy_before"] <= 1.0
            assert result["accuracy_after"] == dev.evaluate(data.X, data.y)["accuracy"]   # the weights it left
            assert result["device_peak_rss_bytes"] > 0 and result["link"]["frames_sent"] > 6

            starts.clear()                 # at --steps already: `finetune --device` has nothing to do
            assert finetune_remote(dev, data, 6, 16, on_start=starts.append, stop_if_reached=True) is None
            assert starts == [6]
            again = finetune_remote(dev, data, 6, 16)      # `fleet finetune` asks anyway: no step runs
            assert (again["final_step"], again["steps_run"], again["accuracy_before"]) == (6, 0, None)
            assert "device_peak_rss_bytes" not in again
    finally:
        server.terminate()
        server.wait(10)
