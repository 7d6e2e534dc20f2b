"""Distributed host training: N gloo processes on one global batch take the single process's steps.

Process start-up dominates here (each worker imports torch and the modules torch's determinism
switch pulls in), so every equivalence case runs in *one* world of 2 processes, one job after
another, and the CLI test is the only other world.

Smooth activations (tanh, gelu) on purpose: with ReLU, float rounding that differs in the last bit
(a sum over 2 shards instead of 1 batch, as between any two BLAS builds) can flip a pre-activation
sitting at 0 and change that step's update by lr * grad; a single process averaging two half-batch
gradients in memory does the same (resmlp, dfa, lr 0.01: 4e-8 -> 6e-5 at step 14).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time

import pytest
import torch

from conftest import assert_one_error_line, run_edgefa
from edgefa.errors import EdgefaError
from edgefa.training.distributed import root_cause, spawn
from edgefa.training.trainer import TrainConfig, load_run, train

TOL = 1e-5
BASE = dict(epochs=2, batch_size=64, lr=0.01, momentum=0.9, device="cpu", alignment=False)
CASES = {
    "mlp-bp": dict(method="bp", hidden=[32, 16], activation="tanh"),
    "mlp-dfa": dict(method="dfa", hidden=[32, 16], activation="tanh"),
    "mlp-fa": dict(method="fa", hidden=[32, 16], activation="tanh"),
    "mlp-usf": dict(method="usf", hidden=[32, 16], activation="tanh"),
    "mlp-hybrid": dict(method="hybrid", hidden=[32, 16], activation="tanh", hybrid_every=3),
    "resmlp-bp": dict(method="bp", model="resmlp", width=16, depth=2, activation="gelu"),
    "resmlp-dfa": dict(method="dfa", model="resmlp", width=16, depth=2, activation="gelu"),
}
# the loss is NaN within the first epoch: every rank must stop where train() stops
DIVERGES = dict(method="dfa", hidden=[32, 16], activation="tanh", lr=1e38)


def config(name: str) -> TrainConfig:
    return TrainConfig(**{**BASE, **(DIVERGES if name == "diverges" else CASES[name])})


def max_abs_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Over every parameter and buffer; NaN must sit in the same places (and counts as equal)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].isnan(), sb[k].isnan()), k
    return max(torch.nan_to_num(sa[k] - sb[k], nan=0.0).abs().max().item() for k in sa)


def assert_close(mine, theirs, path="") -> None:
    """JSON-like trees equal, numbers within 1e-5 (absolute or relative)."""
    if isinstance(theirs, dict):
        assert isinstance(mine, dict) and mine.keys() == theirs.keys(), path
        for k in theirs:
            assert_close(mine[k], theirs[k], f"{path}.{k}")
    elif isinstance(theirs, list):
        assert isinstance(mine, list) and len(mine) == len(theirs), path
        for i, (m, t) in enumerate(zip(mine, theirs)):
            assert_close(m, t, f"{path}[{i}]")
    elif isinstance(theirs, float) and not isinstance(theirs, bool):
        assert mine == pytest.approx(theirs, rel=1e-5, abs=1e-5, nan_ok=True), path
    else:
        assert mine == theirs, path


@pytest.fixture(scope="module")
def world_runs(tmp_path_factory):
    """Every case trained by 2 gloo processes in one world: {name: (metrics, run dir)}."""
    from edgefa.shared.datasets import load_dataset

    root = tmp_path_factory.mktemp("ddp")
    names = [*CASES, "diverges"]
    results = spawn([(config(n), root / n) for n in names], 2, data=load_dataset("digits"))
    return {n: (metrics, path.parent) for n, (metrics, path) in zip(names, results)}


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_take_the_single_process_steps(world_runs, name):
    metrics, run_dir = world_runs[name]
    single = train(config(name))
    got = load_run(run_dir)
    diff = max_abs_diff(got.model, single.model)
    print(f"{name}: max |w_2proc - w_1proc| = {diff:.3g}")
    assert diff <= TOL, (name, diff)
    # the checkpoint is the module's own: no DDP `module.` prefixes, feedback included
    assert not any(k.startswith("module.") for k in got.model.state_dict())
    assert got.config.nproc == 2
    assert metrics["world_size"] == 2 and metrics["backend"] == "gloo" and metrics["batch_per_process"] == 32
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk["world_size"] == 2 and on_disk["backend"] == "gloo"
    assert on_disk.get("diverged") == single.metrics.get("diverged")
    assert_close(on_disk["epochs"], single.metrics["epochs"])


def test_every_rank_stops_where_a_diverging_single_process_stops(world_runs):
    metrics, run_dir = world_runs["diverges"]
    single = train(config("diverges"))
    assert single.metrics["diverged"]["epoch"] == 1 and len(single.metrics["epochs"]) == 1
    assert metrics["diverged"] == single.metrics["diverged"]
    assert len(metrics["epochs"]) == 1
    assert load_run(run_dir).metrics["diverged"]["epoch"] == 1      # and it wrote the run (NaN and all)


def test_cli_nproc_2_trains_loads_and_exports(tmp_path):
    from edgefa.bundle import read_bundle
    from edgefa.exporters.export import export_bundle

    out = tmp_path / "run"
    proc = run_edgefa("train", "--nproc", "2", "--method", "dfa", "--hidden", "32,16", "--activation", "tanh",
                      "--epochs", "2", "--batch-size", "64", "--lr", "0.01", "--device", "cpu", "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    assert "x 2 processes (gloo)" in proc.stdout, proc.stdout
    run = load_run(out)
    assert run.metrics["world_size"] == 2 and run.metrics["backend"] == "gloo"
    single = train(TrainConfig(method="dfa", hidden=[32, 16], activation="tanh", epochs=2, batch_size=64,
                               lr=0.01, device="cpu"))     # the CLI's defaults otherwise: alignment logged
    assert max_abs_diff(run.model, single.model) <= TOL
    assert "alignment" in run.metrics["epochs"][-1]
    assert_close(run.metrics["epochs"], single.metrics["epochs"])
    read_bundle(export_bundle(run, tmp_path / "bundle"))


def test_batch_not_divisible_is_one_line(tmp_path):
    proc = run_edgefa("train", "--nproc", "2", "--batch-size", "33", "--out", tmp_path / "run")
    assert_one_error_line(proc, "--batch-size 33", "--nproc 2")
    assert not (tmp_path / "run").exists()


def test_a_dead_worker_fails_the_launch_in_one_line_without_a_hang(tmp_path):
    """rank 1 killed at once (as the OOM killer would): the parent ends rank 0 and names rank 1."""
    def kill_rank1():
        while True:
            for child in multiprocessing.active_children():
                if child.name == "edgefa-rank1" and child.pid:
                    os.kill(child.pid, signal.SIGKILL)
                    return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_rank1, daemon=True)
    killer.start()
    start = time.monotonic()
    with pytest.raises(EdgefaError) as err:
        spawn([(config("mlp-dfa"), tmp_path / "run")], 2)
    assert time.monotonic() - start < 60
    line = str(err.value)
    assert "\n" not in line and "rank 1: killed by SIGKILL" in line, line
    assert not [c for c in multiprocessing.active_children() if c.name.startswith("edgefa-rank")]


def test_root_cause_names_the_rank_that_died_first():
    # a rank that died without a word caused its peers' connection errors
    assert root_cause([(0, 1), (1, -9)], [(0, "RuntimeError: Connection closed by peer")]) == "rank 1: killed by SIGKILL"
    # otherwise the first line said: a rank reports before it exits, its peers only after
    assert root_cause([(0, 1), (1, 1)], [(1, "ValueError: patch 5 does not divide 8"),
                                         (0, "RuntimeError: Connection closed by peer")]) \
        == "rank 1: ValueError: patch 5 does not divide 8"
    assert root_cause([(1, 3)], []) == "rank 1: exited with status 3"


def test_spawn_refuses_a_batch_that_does_not_split(tmp_path):
    with pytest.raises(EdgefaError, match="not divisible by 3 processes"):
        spawn([(config("mlp-bp"), tmp_path / "run")], 3)
