"""Shared fixtures: one small trained run and its bundle, made once per test session."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Mark the tests of the quick tier (tests/quick_tier.py) `quick`: `pytest -m quick` runs them."""
    from quick_tier import in_quick_tier, selectors

    chosen = selectors()
    for item in items:
        if in_quick_tier(item.path.name, getattr(item, "originalname", item.name), chosen):
            item.add_marker(pytest.mark.quick)


def run_edgefa(*args: str, without_torch: bool = False, cwd: Path | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real CLI in a second process; `without_torch` makes `import torch` fail there."""
    entry = "edgefa.without_torch" if without_torch else "edgefa.cli"
    env = dict(os.environ, COLUMNS="120", PYTHONWARNINGS="default")
    return subprocess.run([sys.executable, "-m", entry, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env, timeout=timeout)


def cli_in_process(*args) -> subprocess.CompletedProcess:
    """`edgefa ARGS` through edgefa.cli.main in this process (the CLI's code, without a second torch
    import), as a CompletedProcess; the consoles write to sys.stdout / sys.stderr as they are now."""
    from edgefa.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(["edgefa", *map(str, args)], code, out.getvalue(), err.getvalue())


def run_all(*calls: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """Run several CLI invocations at once (each a real subprocess); results in order."""
    with ThreadPoolExecutor(max_workers=min(len(calls), 4)) as pool:
        return list(pool.map(lambda args: run_edgefa(*args), calls))


def assert_one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2, no traceback, stdout empty and stderr exactly one line holding the fragments."""
    everything = proc.stdout + proc.stderr
    assert "Traceback" not in everything, everything
    assert proc.returncode == 2, everything
    assert proc.stdout == "", everything
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("edgefa: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A DFA run on digits: 64 -> 32 -> 16 -> 10, 3 epochs (a second or two on the CPU)."""
    from edgefa.training.trainer import TrainConfig, save_run, train

    run = train(TrainConfig(method="dfa", hidden=[32, 16], epochs=3, lr=0.01, device="cpu"))
    out = tmp_path_factory.mktemp("run")
    save_run(run, out)
    return out


@pytest.fixture(scope="session")
def tiny_bundle_master(tiny_run, tmp_path_factory):
    from edgefa.exporters.export import export_bundle
    from edgefa.training.trainer import load_run

    return export_bundle(load_run(tiny_run), tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture
def tiny_bundle(tiny_bundle_master, tmp_path) -> Path:
    """A private copy of the session's bundle, free to corrupt or train."""
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_master, dst)
    return dst


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory) -> Path:
    """The digits as a device data file (raw pixels, as a sensor would give them)."""
    from edgefa.shared.datasets import load_digits, save_npz

    path = tmp_path_factory.mktemp("data") / "digits.npz"
    save_npz(path, load_digits())
    return path
