"""`edgefa fleet`: three real device servers on loopback, driven at once from one inventory."""

from __future__ import annotations

import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_edgefa
from test_store_faults import variant


def start_server(store: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "edgefa.without_torch", "device", "serve",
                             "--listen", "127.0.0.1:0", "--store", str(store)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    line = proc.stdout.readline()
    assert "listening on" in line, line
    return proc, "socket://" + line.split()[-1]


@pytest.fixture
def three_servers(tmp_path):
    with ExitStack() as stack:
        urls = []
        for i in range(3):
            proc, url = start_server(tmp_path / f"device{i}")
            stack.callback(proc.wait, 10)
            stack.callback(proc.terminate)
            urls.append(url)
        yield urls


def write_inventory(path: Path, urls: list[str]) -> Path:
    path.write_text("".join(f'[[device]]\nname = "dev{i}"\nurl = "{u}"\n\n' for i, u in enumerate(urls)))
    return path


def test_fleet_deploys_finetunes_and_reports_three_devices(three_servers, tiny_bundle, digits_npz, tmp_path):
    inventory = write_inventory(tmp_path / "devices.toml", three_servers)
    deploy = run_edgefa("fleet", "deploy", tiny_bundle, "--inventory", inventory)
    assert deploy.returncode == 0, deploy.stderr
    assert deploy.stdout.count(" ok ") == 3, deploy.stdout

    tune = run_edgefa("fleet", "finetune", "--inventory", inventory, "--data", digits_npz, "--steps", "12",
                      "--batch-size", "16", "--eval", digits_npz)
    assert tune.returncode == 0, tune.stderr
    assert tune.stdout.count("0 -> 12") == 3, tune.stdout

    info = run_edgefa("fleet", "info", "--inventory", inventory)
    assert info.returncode == 0, info.stderr
    for i in range(3):
        assert f"dev{i}" in info.stdout

    # Same bundle, same data, same batches: every device holds the same weights afterwards.
    from edgefa.link.client import DeviceClient

    states = []
    for url in three_servers:
        with DeviceClient(url) as dev:
            states.append(dev.get_state())
    assert all(int(s["step"]) == 12 for s in states)
    for name in states[0]:
        assert np.array_equal(states[0][name], states[1][name]) and np.array_equal(states[0][name], states[2][name])

    # Another bundle over the fine-tuned ones: every device keeps what it trained and the table says where.
    other = variant(tiny_bundle, tmp_path / "other", lr=0.02)
    again = run_edgefa("fleet", "deploy", other, "--inventory", inventory)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("step 12 kept as bundle.prev") == 3, again.stdout


def test_fleet_reports_a_dead_device_and_still_serves_the_others(three_servers, tmp_path):
    inventory = write_inventory(tmp_path / "devices.toml", three_servers[:2] + ["socket://127.0.0.1:1"])
    proc = run_edgefa("fleet", "info", "--inventory", inventory)
    assert proc.returncode == 2
    assert proc.stdout.count(" ok ") == 2, proc.stdout
    error_lines = [l for l in proc.stderr.splitlines() if l.startswith("edgefa: error:")]
    assert len(error_lines) == 1 and "1 of 3 devices failed: dev2" in error_lines[0], proc.stderr


@pytest.mark.parametrize("text, fragment", [
    ("", "no [[device]] entries"),
    ("[[device]]\nname = 'a'\n", "needs a url"),
    ("[[device]]\nurl = 'loop://'\nname='a'\n[[device]]\nurl = 'loop://'\nname='a'\n", "appears twice"),
    ("[[device\n", "not valid TOML"),
])
def test_bad_inventory_is_one_clear_line(tmp_path, text, fragment):
    from conftest import assert_one_error_line

    path = tmp_path / "devices.toml"
    path.write_text(text)
    assert_one_error_line(run_edgefa("fleet", "info", "--inventory", path), fragment)
