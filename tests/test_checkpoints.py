"""Device checkpoints survive damage: the last two are kept, every I/O point of a save is crashed
(and the disk filled) in turn the way SQLite tests its commits, a damaged newest falls back to the
previous one with one line, both damaged is one error line, temporary files a killed run left are
cleaned, and a lock keeps a second fine-tune (or a server) off a bundle's state.

Real checkpoints of the session's small bundle, real CLI processes; faults come from the
documented seam edgefa.storage.faults, never from patching edgefa's code."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from conftest import REPO, assert_one_error_line, run_edgefa
from edgefa import storage
from edgefa.bundle import read_bundle
from edgefa.errors import CheckpointError
from edgefa.runtime.engine import OrtEngine
from edgefa.runtime.state import (CheckpointFallback, DeviceState, load_state, lock_state, save_state,
                                  stray_temp_files)


def states(bundle, steps) -> dict[int, DeviceState]:
    """A distinct state per step: the bundle's own tensors scaled by the step."""
    base = OrtEngine(bundle, threads=1).state()
    return {s: DeviceState(s, {k: (a * (1 + s)).astype(a.dtype) for k, a in base.items()}, [s - 1])
            for s in steps}


def assert_is(loaded: DeviceState, expected: DeviceState) -> None:
    assert loaded.step == expected.step and loaded.refused_steps == expected.refused_steps
    for name, a in expected.tensors.items():
        assert loaded.tensors[name].tobytes() == a.tobytes(), name


def load_quietly(bundle, names):
    """load_state and the CheckpointFallback warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = load_state(bundle, names)
    return state, [w for w in caught if issubclass(w.category, CheckpointFallback)]


def state_files(bundle) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(bundle.state_dir.iterdir()) if p.name != ".lock"}


# --- crash at every I/O point of a save, and a full disk from every point --------------------

@pytest.mark.parametrize("history", [[], [3, 4]], ids=["first save", "rotating save"])
def test_a_crash_at_every_io_point_of_save_state_leaves_the_old_state_or_the_new(tiny_bundle, history):
    bundle = read_bundle(tiny_bundle)
    by_step = states(bundle, [3, 4, 5])
    names = list(by_step[3].tensors)
    for step in history:
        save_state(bundle, by_step[step])
    before = state_files(bundle) if history else {}

    with storage.faults() as plan:                   # count the I/O points, fault-free
        save_state(bundle, by_step[5])
    ops = [op for op, _ in plan.ops]
    assert ops == (["write", "fsync", "rename", "rename", "fsync_dir"] if history
                   else ["mkdir", "write", "fsync", "rename", "fsync_dir"])

    outcomes = set()
    for n in range(1, len(ops) + 1):
        shutil.rmtree(bundle.state_dir)                # back to the state before the save
        if history:
            bundle.state_dir.mkdir()
        for name, data in before.items():
            (bundle.state_dir / name).write_bytes(data)
        with storage.faults(crash_at=n), pytest.raises(storage.InjectedCrash):
            save_state(bundle, by_step[5])
        # a fresh start: take the lock (which cleans the dead save's temporary file), then resume
        with lock_state(bundle):
            assert stray_temp_files(bundle) == []
            loaded, fell_back = load_quietly(bundle, names)
        if loaded is None:
            assert not history, n                      # nothing before, nothing after: the old state
            outcomes.add("old")
            continue
        expected = by_step[5] if loaded.step == 5 else by_step[history[-1] if history else 5]
        assert loaded.step in (history[-1:] + [5]), (n, ops[n - 1], loaded.step)
        assert_is(loaded, expected)
        outcomes.add("new" if loaded.step == 5 else "old")
        # only a crash between the two renames leaves no newest, and says so in one warning
        between_renames = history and ops[:n - 1].count("rename") == 1
        assert len(fell_back) == (1 if between_renames else 0), (n, fell_back)
    assert outcomes == {"old", "new"}


def test_a_full_disk_at_every_io_point_of_save_state_keeps_the_old_checkpoints(tiny_bundle):
    bundle = read_bundle(tiny_bundle)
    by_step = states(bundle, [3, 4, 5])
    names = list(by_step[3].tensors)
    save_state(bundle, by_step[3])
    save_state(bundle, by_step[4])
    before = state_files(bundle)
    with storage.faults() as plan:
        save_state(bundle, by_step[5])
    count = len(plan.ops)

    for n in range(1, count + 1):
        for name, data in before.items():              # back to steps 4 (newest) and 3 (previous)
            (bundle.state_dir / name).write_bytes(data)
        with storage.faults(disk_full_from=n) as faulty, pytest.raises(OSError) as full:
            save_state(bundle, by_step[5])
        assert "No space left" in str(full.value)
        assert stray_temp_files(bundle) == []           # the process lives: it cleaned up itself
        loaded, fell_back = load_quietly(bundle, names)
        assert fell_back == []
        failed = next(op for op, _ in faulty.ops[n - 1:] if op in storage.WRITING_OPS)   # renames still work
        if failed == "fsync_dir":                        # the last point: both renames were done
            assert_is(loaded, by_step[5])
        else:                                           # the checkpoints are byte for byte the old ones
            assert state_files(bundle) == before, n
            assert_is(loaded, by_step[4])


# --- damage: truncated newest, both damaged ---------------------------------------------------

def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_with_one_line(tiny_bundle, digits_npz, tmp_path):
    bundle = read_bundle(tiny_bundle)
    by_step = states(bundle, [3, 4])
    save_state(bundle, by_step[3])
    save_state(bundle, by_step[4])
    newest = tiny_bundle / "state" / "checkpoint.npz"
    truncate(newest)

    loaded, fell_back = load_quietly(bundle, list(by_step[3].tensors))
    assert_is(loaded, by_step[3])
    assert len(fell_back) == 1
    message = str(fell_back[0].message)
    assert "\n" not in message and str(newest) in message and "checkpoint.prev.npz (step 3)" in message

    evaluated = run_edgefa("device", "evaluate", tiny_bundle, "--data", digits_npz, without_torch=True)
    assert evaluated.returncode == 0 and "Traceback" not in evaluated.stderr, evaluated.stderr
    assert "device state at step 3" in evaluated.stdout
    lines = [line for line in evaluated.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning:") and "checkpoint.prev.npz" in lines[0], lines

    report = tmp_path / "r.json"
    tuned = run_edgefa("device", "finetune", tiny_bundle, "--data", digits_npz, "--steps", "6",
                       "--checkpoint-every", "4", "--report", report, without_torch=True)
    assert tuned.returncode == 0 and "Traceback" not in tuned.stderr, tuned.stderr
    assert sum("checkpoint.prev.npz (step 3)" in line for line in tuned.stderr.splitlines()) == 1
    assert '"resumed_from_step": 3' in report.read_text()
    # the damaged file was replaced, not kept as the previous one: both checkpoints are whole now
    loaded, fell_back = load_quietly(bundle, list(by_step[3].tensors))
    assert loaded.step == 6 and fell_back == []
    with np.load(tiny_bundle / "state" / "checkpoint.prev.npz") as z:
        assert int(z["step"]) == 4                        # saved at 4 over the damaged file, then 6


@pytest.mark.parametrize("saves", [2, 1], ids=["both damaged", "the only one truncated"])
def test_no_usable_checkpoint_is_one_error_line_saying_what_to_do(tiny_bundle, digits_npz, saves):
    bundle = read_bundle(tiny_bundle)
    by_step = states(bundle, [3, 4])
    for step in [3, 4][-saves:]:
        save_state(bundle, by_step[step])
    truncate(tiny_bundle / "state" / "checkpoint.npz")
    if saves == 2:
        (tiny_bundle / "state" / "checkpoint.prev.npz").write_bytes(b"not a zip at all")
    before = state_files(bundle)
    fragments = (("checkpoint.npz", "checkpoint.prev.npz", "move both out of") if saves == 2
                 else ("checkpoint.npz", "unreadable device checkpoint", "move it out of"))

    with pytest.raises(CheckpointError) as unusable:
        load_state(bundle, list(by_step[3].tensors))
    assert "\n" not in str(unusable.value)
    for fragment in fragments:
        assert fragment in str(unusable.value)

    for args in (("device", "finetune", tiny_bundle, "--data", digits_npz, "--steps", "6"),
                 ("device", "evaluate", tiny_bundle, "--data", digits_npz)):
        assert_one_error_line(run_edgefa(*args, without_torch=True), *fragments)
    assert state_files(bundle) == before                  # nothing overwritten


# --- temporary files and the lock -----------------------------------------------------------

def test_stray_temp_files_of_a_killed_save_are_cleaned_at_start(tiny_bundle, digits_npz):
    bundle = read_bundle(tiny_bundle)
    save_state(bundle, states(bundle, [3])[3])
    strays = [tiny_bundle / "state" / f".checkpoint.npz.{pid}.tmp" for pid in (4242, 99999)]
    for stray in strays:
        stray.write_bytes(b"half a checkpoint")
    keep = tiny_bundle / "state" / "notes.txt"            # not edgefa's: never touched
    keep.write_text("mine")
    tuned = run_edgefa("device", "finetune", tiny_bundle, "--data", digits_npz, "--steps", "5", without_torch=True)
    assert tuned.returncode == 0, tuned.stderr
    assert not any(s.exists() for s in strays)
    assert keep.read_text() == "mine"
    assert sorted(os.listdir(tiny_bundle / "state")) == [".lock", "checkpoint.npz", "checkpoint.prev.npz",
                                                         "notes.txt"]


def _wait_for_holder(lock, proc, timeout=60.0) -> None:
    """Until `proc` holds `lock` and has written its first checkpoint beside it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock.exists() and lock.read_text().strip() == str(proc.pid) \
                and (lock.parent / "checkpoint.npz").exists():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the first fine-tune never took the lock")


def test_a_second_finetune_or_a_server_on_a_locked_state_fails_at_once_naming_the_holder(tmp_path, tiny_bundle_master,
                                                                                          digits_npz):
    store = tmp_path / "store"
    store.mkdir()
    shutil.copytree(tiny_bundle_master, store / "bundle")
    bundle_dir = store / "bundle"
    first = subprocess.Popen([sys.executable, "-m", "edgefa.without_torch", "device", "finetune", str(bundle_dir),
                              "--data", str(digits_npz), "--steps", "100000000", "--checkpoint-every", "1"],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_holder(bundle_dir / "state" / ".lock", first)
        started = time.monotonic()
        second = run_edgefa("device", "finetune", bundle_dir, "--data", digits_npz, "--steps", "5",
                            without_torch=True)
        server = run_edgefa("device", "serve", "--listen", "127.0.0.1:0", "--store", store, without_torch=True,
                            timeout=60)
        assert time.monotonic() - started < 30                # at once: neither waited for the lock
        for proc in (second, server):
            assert_one_error_line(proc, f"in use by process {first.pid}", str(bundle_dir))
        assert first.poll() is None                           # the holder trains on, undisturbed
        step_seen = int(np.load(bundle_dir / "state" / "checkpoint.npz")["step"])
    finally:
        os.kill(first.pid, signal.SIGKILL)                     # killed mid-run: the kernel drops its lock
        first.wait(timeout=30)
        first.stderr.close()
    after = run_edgefa("device", "finetune", bundle_dir, "--data", digits_npz, "--steps", step_seen + 3,
                       without_torch=True)
    assert after.returncode == 0, after.stderr
    assert stray_temp_files(read_bundle(bundle_dir)) == []
