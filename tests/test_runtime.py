"""The device runtime on the real exported graphs: NaN/Inf refusal, data errors, checkpoints and
resume, the atomic state writer, the fine-tuning report and the batch schedule."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_error_line, run_all, run_edgefa
from edgefa.bundle import read_bundle
from edgefa.shared.datasets import load_npz
from edgefa.errors import CheckpointError
from edgefa.shared.batches import batch_indices
from edgefa.runtime.engine import OrtEngine
from edgefa.runtime.finetune import standardize
from edgefa.runtime.state import DeviceState, load_state, save_state


# --- helpers ---------------------------------------------------------------------------------


def assert_ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("edgefa: error:")]


def npz_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def finetune_args(bundle, data, steps, *extra):
    return ("device", "finetune", bundle, "--data", data, "--steps", str(steps), *extra)


@pytest.fixture(scope="module")
def digits(digits_npz):
    return load_npz(digits_npz)


# --- NaN / Inf refusal -----------------------------------------------------------------------

def test_engine_refuses_a_nan_batch_and_keeps_its_state_byte_identical(tiny_bundle, digits):
    bundle = read_bundle(tiny_bundle)
    engine = OrtEngine(bundle, threads=1)
    X = standardize(bundle, digits, "test data")
    x, y = X[:32], digits.y[:32]
    before = engine.state()
    logits_before = engine.predict_logits(x)
    assert set(before) == {*bundle.weights, *(f"{k}.momentum" for k in bundle.weights)}

    poisoned = x.copy()
    poisoned[3, 5] = np.nan
    refused = engine.step(poisoned, y, 0.01)

    assert refused.accepted is False
    assert not np.isfinite(refused.loss)
    after = engine.state()
    assert after.keys() == before.keys()
    for name in before:
        assert after[name].dtype == before[name].dtype and after[name].shape == before[name].shape
        assert after[name].tobytes() == before[name].tobytes(), name
    np.testing.assert_array_equal(engine.predict_logits(x), logits_before)

    accepted = engine.step(x, y, 0.01)
    assert accepted.accepted is True
    assert np.isfinite(accepted.loss) and accepted.loss > 0
    assert accepted.logits.shape == (32, 10)
    trained = engine.state()
    assert all(np.isfinite(a).all() for a in trained.values())
    assert not np.array_equal(trained["head.weight"], before["head.weight"])
    assert np.any(trained["head.weight.momentum"] != 0)


def test_cli_huge_lr_refuses_steps_stops_after_max_refusals_and_saves_the_original_weights(tiny_bundle, digits_npz):
    original = read_bundle(tiny_bundle).weights
    proc = run_edgefa(*finetune_args(tiny_bundle, digits_npz, 10, "--lr", "1e38", "--max-refusals", "2"))

    everything = proc.stdout + proc.stderr
    assert proc.returncode == 2, everything
    assert "Traceback" not in everything
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: step ")]
    assert len(warnings) == 2, proc.stderr
    assert warnings[0].startswith("warning: step 0 refused: non-finite loss or weights")
    assert "(1 refused in this run, limit 2)" in warnings[0]
    assert warnings[1].startswith("warning: step 1 refused") and "(2 refused in this run, limit 2)" in warnings[1]
    errors = error_lines(proc)
    assert len(errors) == 1, proc.stderr
    # the line and the checkpoint agree: step 1 was the last one run, step 2 is the next to run
    assert ("stopped after step 1: 2 steps refused for NaN/Inf (steps [0, 1]); the last good weights are "
            "saved at step 2 (the next step to run)") in errors[0]

    saved = npz_arrays(tiny_bundle / "state" / "checkpoint.npz")
    assert int(saved["step"]) == 2
    assert saved["refused_steps"].tolist() == [0, 1]
    for name, weight in original.items():
        assert np.isfinite(saved[name]).all(), name
        np.testing.assert_array_equal(saved[name], weight)               # nothing was applied
        np.testing.assert_array_equal(saved[f"{name}.momentum"], np.zeros_like(weight))


# --- data errors -----------------------------------------------------------------------------

def test_bad_training_data_is_one_line_exit_2(tiny_bundle, digits, tmp_path):
    X, y = digits.X.copy(), digits.y.copy()
    files = {}

    nan_X = X.copy()
    nan_X[7, 9] = np.nan
    files["nan"] = (tmp_path / "nan.npz", dict(X=nan_X, y=y), ("nan.npz", "1 non-finite values (NaN/Inf)"))
    files["features"] = (tmp_path / "features.npz", dict(X=X[:, :63], y=y),
                         ("samples have (63,) features, the bundle expects 64",))
    bad_y = y.copy()
    bad_y[0] = 10
    files["labels"] = (tmp_path / "labels.npz", dict(X=X, y=bad_y), ("labels must lie in 0..9",))
    for path, arrays, _ in files.values():
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    results = run_all(*(finetune_args(tiny_bundle, path, 2) for path, _, _ in files.values()))

    for (case, (_, _, fragments)), proc in zip(files.items(), results):
        assert_one_error_line(proc, *fragments)
    assert not (tiny_bundle / "state").exists()


# --- checkpoints and resume ------------------------------------------------------------------

def test_resume_is_bit_identical_to_an_uninterrupted_run(tiny_bundle, digits_npz, tmp_path):
    resumed, straight = tiny_bundle, tmp_path / "straight"
    shutil.copytree(tiny_bundle, straight)
    reports = {name: tmp_path / f"{name}.json" for name in ("first", "second", "again", "straight")}

    first, whole = run_all(
        finetune_args(resumed, digits_npz, 10, "--checkpoint-every", "5", "--report", reports["first"]),
        finetune_args(straight, digits_npz, 20, "--report", reports["straight"]),
    )
    assert_ok(first)
    assert_ok(whole)
    assert int(npz_arrays(resumed / "state" / "checkpoint.npz")["step"]) == 10
    assert_ok(run_edgefa(*finetune_args(resumed, digits_npz, 20, "--checkpoint-every", "5",
                                        "--report", reports["second"])))
    after_resume = npz_arrays(resumed / "state" / "checkpoint.npz")
    assert_ok(run_edgefa(*finetune_args(resumed, digits_npz, 20, "--report", reports["again"])))

    second = json.loads(reports["second"].read_text())
    assert (second["resumed_from_step"], second["final_step"], second["steps_run"]) == (10, 20, 10)
    uninterrupted = npz_arrays(straight / "state" / "checkpoint.npz")
    assert after_resume.keys() == uninterrupted.keys()
    assert {"fc0.weight", "head.bias.momentum", "feedback/fc0", "feedback/fc1", "step"} <= set(after_resume)
    assert int(after_resume["step"]) == 20
    for name in uninterrupted:
        assert after_resume[name].dtype == uninterrupted[name].dtype, name
        assert np.array_equal(after_resume[name], uninterrupted[name]), name
    # and the training did move the weights
    assert not np.array_equal(after_resume["fc0.weight"], read_bundle(straight).weights["fc0.weight"])

    again = json.loads(reports["again"].read_text())
    assert (again["resumed_from_step"], again["final_step"], again["steps_run"]) == (20, 20, 0)
    assert again["loss_first"] is None
    final = npz_arrays(resumed / "state" / "checkpoint.npz")
    for name in after_resume:
        assert np.array_equal(final[name], after_resume[name]), name

    # the fine-tune's lock and the last two checkpoints (one, where only the final one was taken); no *.tmp
    assert sorted(os.listdir(resumed / "state")) == [".lock", "checkpoint.npz", "checkpoint.prev.npz"]
    assert sorted(os.listdir(straight / "state")) == [".lock", "checkpoint.npz"]


def test_checkpoint_stores_feedback_and_refuses_a_foreign_one(tiny_bundle, digits_npz):
    bundle = read_bundle(tiny_bundle)
    engine = OrtEngine(bundle, threads=1)
    save_state(bundle, DeviceState(3, engine.state(), []))
    path = tiny_bundle / "state" / "checkpoint.npz"
    arrays = npz_arrays(path)
    for layer, b in bundle.feedback.items():
        np.testing.assert_array_equal(arrays[f"feedback/{layer}"], b)
    assert load_state(bundle, engine.state_names).step == 3

    arrays["feedback/fc1"] = arrays["feedback/fc1"].copy()
    arrays["feedback/fc1"][0, 0] += 1.0
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(CheckpointError, match="feedback matrix 'fc1' differs from the bundle's"):
        load_state(bundle, engine.state_names)

    finetune, evaluate = run_all(finetune_args(tiny_bundle, digits_npz, 5),
                                 ("device", "evaluate", tiny_bundle, "--data", digits_npz))
    for proc in (finetune, evaluate):
        assert_one_error_line(proc, str(path), "feedback matrix 'fc1' differs from the bundle's")
    assert sorted(os.listdir(tiny_bundle / "state")) == [".lock", "checkpoint.npz"]   # the fine-tune's lock

    del arrays["feedback/fc1"]                                   # a checkpoint without feedback
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(CheckpointError, match="feedback matrix 'fc1' differs"):
        load_state(bundle, engine.state_names)


class _Unsaveable:
    """A 'tensor' that breaks np.savez halfway through writing the archive."""

    def __array__(self, *args, **kwargs):
        raise RuntimeError("sensor unplugged mid-write")


def test_save_state_crash_mid_write_leaves_the_old_checkpoint_loadable(tiny_bundle):
    bundle = read_bundle(tiny_bundle)
    engine = OrtEngine(bundle, threads=1)
    good = engine.state()
    save_state(bundle, DeviceState(7, good, [4]))
    path = tiny_bundle / "state" / "checkpoint.npz"
    old_bytes = path.read_bytes()

    broken = {name: (a * 2 if i < 3 else a) for i, (name, a) in enumerate(good.items())}
    broken["zzz.unsaveable"] = _Unsaveable()          # after some real arrays were written
    with pytest.raises(RuntimeError, match="sensor unplugged"):
        save_state(bundle, DeviceState(8, broken, []))

    assert path.read_bytes() == old_bytes
    loaded = load_state(bundle, engine.state_names)
    assert loaded.step == 7 and loaded.refused_steps == [4]
    for name, a in good.items():
        assert np.array_equal(loaded.tensors[name], a), name
    assert sorted(os.listdir(tiny_bundle / "state")) == ["checkpoint.npz"]


# --- the report: loss goes down, accuracy is measured ----------------------------------------

def test_finetune_report_loss_decreases_and_accuracy_is_reported(tiny_bundle, digits_npz, tmp_path):
    report = tmp_path / "r.json"
    # Full-batch steps (batch size >= 1797 samples): loss_first and loss_last are then the loss of
    # the same samples before the first and the last update, not of two random mini-batches.
    proc = run_edgefa(*finetune_args(tiny_bundle, digits_npz, 60, "--batch-size", "2048",
                                     "--eval", digits_npz, "--report", report))
    assert_ok(proc)
    r = json.loads(report.read_text())

    assert (r["final_step"], r["steps_run"], r["batch_size"], r["refused_steps"]) == (60, 60, 2048, [])
    assert r["lr"] == read_bundle(tiny_bundle).manifest["optimizer"]["lr"]     # the bundle's default
    assert r["providers"] and r["providers"][-1] == "CPUExecutionProvider"
    for key in ("accuracy_before", "accuracy_after"):
        assert isinstance(r[key], float) and 0.0 <= r[key] <= 1.0, key
    assert r["accuracy_after"] > r["accuracy_before"] + 0.05
    assert r["step_time_ms_median"] > 0 and r["step_time_ms_p95"] >= r["step_time_ms_median"]
    assert isinstance(r["peak_rss_bytes"], int) and r["peak_rss_bytes"] > 10 * 2**20
    assert r["loss_last"] < 0.8 * r["loss_first"]
    assert f"{100 * r['accuracy_before']:.1f}% -> {100 * r['accuracy_after']:.1f}%" in proc.stdout


# --- batch_indices ---------------------------------------------------------------------------

def test_batch_indices_are_deterministic_permutations_with_a_fixed_batch_size():
    n, bs, seed = 100, 32, 5
    per_epoch = n // bs                                   # 3 batches; the last 4 samples are dropped
    batches = [batch_indices(n, bs, seed, step) for step in range(3 * per_epoch)]

    for step, batch in enumerate(batches):
        assert batch.shape == (bs,), step
        assert np.array_equal(batch, batch_indices(n, bs, seed, step))         # a pure function
    epochs = [np.concatenate(batches[e * per_epoch:(e + 1) * per_epoch]) for e in range(3)]
    for epoch in epochs:
        assert len(np.unique(epoch)) == per_epoch * bs                         # no repeats in an epoch
        assert epoch.min() >= 0 and epoch.max() < n
    assert not np.array_equal(epochs[0], epochs[1])                            # reshuffled each epoch
    assert not np.array_equal(batch_indices(n, bs, seed + 1, 0), batches[0])  # the seed matters

    whole = batch_indices(10, 64, seed, 0)                                     # batch > samples
    assert sorted(whole.tolist()) == list(range(10))
    assert batch_indices(10, 64, seed, 1).shape == (10,)
    with pytest.raises(ValueError, match="no samples"):
        batch_indices(0, 32, seed, 0)
