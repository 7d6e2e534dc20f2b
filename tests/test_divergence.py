"""Divergence is a stop, not a result: the rule (runtime/divergence.py), a local `device finetune`
that runs away, the same over the link against a real server process, and the host's data check
before anything is sent. Real bundles (conftest's digits MLP), real onnxruntime sessions."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from conftest import cli_in_process, run_edgefa
from edgefa.bundle import read_bundle
from edgefa.shared.datasets import load_dataset
from edgefa.errors import DataError
from edgefa.link.client import ClientConfig, DeviceClient, DeviceError
from edgefa.runtime.divergence import (DEFAULT_MAX_REFUSALS, DIVERGED, OK, REFUSED, TOO_MANY_REFUSALS, Diverged,
                                       DivergenceGuard, DivergenceRule, TooManyRefusals, chance_loss)
from edgefa.runtime.finetune import FinetuneConfig, Finetuner
from test_link_live import device_server, fast_timing

CHANCE = math.log(10)          # the digits bundle's 10 classes


def error_lines(proc) -> list[str]:
    everything = proc.stdout + proc.stderr
    assert "Traceback" not in everything, everything
    return [line for line in proc.stderr.splitlines() if line.startswith("edgefa: error:")]


def state_files(bundle) -> dict[str, bytes]:
    state = bundle / "state"
    return {p.name: p.read_bytes() for p in sorted(state.glob("checkpoint*.npz"))} if state.is_dir() else {}


def accuracy_of(bundle, digits_npz) -> str:
    proc = run_edgefa("device", "evaluate", bundle, "--data", digits_npz, without_torch=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def digits(digits_npz):
    return load_dataset(str(digits_npz))


# --- the rule --------------------------------------------------------------------------------

def test_rule_non_finite_and_runaway_losses_diverge_noise_does_not():
    guard = DivergenceGuard(CHANCE)
    assert guard.judge(50.0, True, 0) == OK          # the first loss is the start's, never judged runaway
    guard.reset()
    for loss in (0.3, 0.1, 0.2):
        assert guard.judge(loss, True, 0) == OK
    # the reference is at least the chance loss: 10 x 2.3 = 23 is not a runaway, 23.1 is
    assert guard.judge(10 * CHANCE * 0.999, True, 0) == OK
    assert guard.judge(10 * CHANCE * 1.001, True, 0) == DIVERGED
    assert "chance loss 2.3" in guard.reason
    for bad in (float("nan"), float("inf")):
        assert guard.judge(bad, False, 1) == DIVERGED and guard.reason == f"loss {bad}"


def test_rule_follows_the_recent_median_within_its_window():
    rule = DivergenceRule(factor=10, window=5)
    guard = DivergenceGuard(CHANCE, rule)
    for loss in [100.0] * 5:                          # a run whose losses are high (above chance)
        assert guard.judge(loss, True, 0) == OK
    assert guard.judge(999.0, True, 0) == OK and guard.judge(1001.0, True, 0) == DIVERGED
    for loss in [1.0] * 5:                            # the window forgets: the median is 1 now
        assert guard.judge(loss, True, 0) == OK
    assert len(guard.recent) == 5
    assert guard.judge(CHANCE * 10 + 1, True, 0) == DIVERGED


def test_rule_counts_refusals_against_the_limit():
    guard = DivergenceGuard(CHANCE, max_refusals=2)
    assert guard.judge(0.5, True, 0) == OK
    assert guard.judge(0.5, False, 1) == REFUSED
    assert guard.judge(0.5, False, 2) == TOO_MANY_REFUSALS
    assert list(guard.recent) == [0.5]                 # a refused step's loss is not history
    assert DEFAULT_MAX_REFUSALS == 3 and chance_loss(1, pairs=True) == pytest.approx(math.log(2))


# --- local fine-tuning ---------------------------------------------------------------------------

def test_default_lr_never_triggers_over_hundreds_of_steps(tiny_bundle, digits):
    """Normal fine-tuning noise: the bundle's lr, batch 32, 300 steps, three batch orders."""
    for seed in range(3):
        shutil.rmtree(tiny_bundle / "state", ignore_errors=True)
        tuner = Finetuner(read_bundle(tiny_bundle), digits,
                          FinetuneConfig(steps=300, batch_size=32, checkpoint_every=25, seed=seed, threads=1))
        result = tuner.run()
        tuner.state_lock.release()
        assert result["final_step"] == 300 and result["stopped"] is None
        assert result["refused_steps"] == [] and result["rolled_back_steps"] == 0


def test_lr_10_stops_with_one_line_and_keeps_the_good_checkpoint(tiny_bundle, digits_npz, tmp_path):
    good = run_edgefa("device", "finetune", tiny_bundle, "--data", digits_npz, "--steps", 30, without_torch=True)
    assert good.returncode == 0, good.stderr
    before_files, before_accuracy = state_files(tiny_bundle), accuracy_of(tiny_bundle, digits_npz)

    report = tmp_path / "r.json"
    proc = run_edgefa("device", "finetune", tiny_bundle, "--data", digits_npz, "--steps", 200, "--lr", 10,
                      "--report", report, without_torch=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    (line,) = error_lines(proc)
    assert "diverged at step 31:" in line and "rolled back to the last good checkpoint, at step 30" in line
    assert "lower --lr (was 10) and run again" in line and "check the data" not in line   # the data is fine
    assert state_files(tiny_bundle) == before_files                 # not one byte of the good state changed
    assert accuracy_of(tiny_bundle, digits_npz) == before_accuracy
    r = json.loads(report.read_text())
    assert r["stopped"]["reason"] == DIVERGED and r["stopped"]["message"] in line
    assert (r["final_step"], r["rolled_back_steps"], r["steps_run"]) == (30, 1, 1)


@pytest.mark.parametrize("scale, stop", [(1e38, "diverged at step"), (1e30, "steps refused for NaN/Inf")],
                         ids=["a few samples at 1e38: diverged", "every sample x 1e30: refused"])
def test_a_stop_caused_by_the_data_says_to_check_it(tiny_bundle, digits, tmp_path, scale, stop):
    """Issue 17 B.4: X = 1e38 stopped with "lower --lr" alone, at the bundle's own small lr."""
    X = digits.X.astype(np.float64)
    if scale == 1e38:
        X[:50] = scale
    else:
        X *= scale
    data = tmp_path / "huge.npz"
    np.savez(data, X=X.astype(np.float32), y=digits.y)
    (line,) = error_lines(cli_in_process("device", "finetune", tiny_bundle, "--data", data, "--steps", 20))
    assert stop in line and "lower --lr" in line, line
    assert "or check the data (its largest |x| after standardizing is " in line, line
    largest = float(line.split("after standardizing is ")[1].split(")")[0])
    assert largest > 1e29, line


def test_a_run_that_ends_diverged_writes_no_checkpoint(tiny_bundle, digits):
    """One step at lr 1e6: its loss is the start's (fine), the state it leaves is not. The final
    checkpoint judges that state first: nothing is written, the engine is back at the bundle's weights."""
    bundle = read_bundle(tiny_bundle)
    original = {k: v.copy() for k, v in bundle.weights.items()}
    tuner = Finetuner(bundle, digits, FinetuneConfig(steps=1, lr=1e6, threads=1), digits)
    with pytest.raises(Diverged, match=r"diverged at step 1: .*at step 0 \(the next step to run\)") as stop:
        tuner.run()
    assert state_files(tiny_bundle) == {}
    assert stop.value.result["rolled_back_steps"] == 1
    assert stop.value.result["accuracy_after"] == stop.value.result["accuracy_before"]
    for name, weight in tuner.engine.state().items():
        expected = original[name] if name in original else np.zeros_like(weight)
        np.testing.assert_array_equal(weight, expected)


@pytest.mark.parametrize("option, value", [("--steps", "-3"), ("--steps", "0"), ("--checkpoint-every", "0"),
                                           ("--max-refusals", "0")])
def test_finetune_counts_are_checked_before_any_work(tiny_bundle, digits_npz, option, value):
    args = {"--steps": "5", "--checkpoint-every": "5", "--max-refusals": "3", option: value}
    proc = cli_in_process("device", "finetune", tiny_bundle, "--data", digits_npz,
                          *(item for pair in args.items() for item in pair))
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert option in line
    assert state_files(tiny_bundle) == {}


# --- over the link: a real device server -----------------------------------------------------------

def test_link_lr_1e6_stops_and_the_device_rolls_back(tmp_path, tiny_bundle, digits, digits_npz):
    with device_server(tmp_path / "store", listen="127.0.0.1:0") as srv:
        with DeviceClient(srv.url, ClientConfig(timing=fast_timing())) as dev:
            dev.deploy(tiny_bundle)
            assert dev.finetune(digits.X, digits.y, 20, 16)["final_step"] == 20    # ends checkpointed
            good_state, good = dev.get_state(), dev.evaluate(digits.X, digits.y)

        report = tmp_path / "r.json"
        proc = run_edgefa("finetune", "--device", srv.url, "--data", digits_npz, "--steps", 200, "--lr", "1e6",
                          "--eval", digits_npz, "--report", report, without_torch=True)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        (line,) = error_lines(proc)
        assert "diverged at step 21:" in line and "at step 20 (the next step to run)" in line
        assert "lower --lr (was 1e+06)" in line
        r = json.loads(report.read_text())
        assert (r["stopped"]["reason"], r["final_step"], r["rolled_back_steps"], r["refused_steps"]) == \
               (DIVERGED, 20, 1, [])

        with DeviceClient(srv.url, ClientConfig(timing=fast_timing())) as dev:
            status = dev.status()
            assert (status["step"], status["checkpointed_step"]) == (20, 20)
            state = dev.get_state()
            for name, value in good_state.items():
                np.testing.assert_array_equal(state[name], value)
            assert dev.evaluate(digits.X, digits.y)["accuracy"] == good["accuracy"]

            # the library call stops the same way; the last stop is answered again to a host that
            # missed it (a step beyond the device's)
            with pytest.raises(Diverged, match="diverged at step 21"):
                dev.finetune(digits.X, digits.y, 200, 32, lr=1e6)
            with pytest.raises(DeviceError) as missed:
                dev.train_step(25, digits.X[:16], digits.y[:16], lr=1e6)
            assert missed.value.code == DIVERGED and "diverged at step 21" in str(missed.value)
            assert dev.status()["step"] == 20


def test_link_refusals_stop_at_the_shared_limit_and_the_checkpoint_agrees(tmp_path, tiny_bundle, digits):
    with device_server(tmp_path / "store", listen="127.0.0.1:0") as srv:
        with DeviceClient(srv.url, ClientConfig(timing=fast_timing())) as dev:
            dev.deploy(tiny_bundle)
            original = dev.get_state()
            with pytest.raises(TooManyRefusals, match=r"stopped after step 1: 2 steps refused .*at step 2 "
                                                      r"\(the next step to run\)") as stop:
                dev.finetune(digits.X, digits.y, 10, 16, lr=1e38, max_refusals=2)
            assert stop.value.result["refused_steps"] == [0, 1]
            status = dev.status()
            assert (status["step"], status["checkpointed_step"], status["refused_steps"]) == (2, 2, 2)
            state = dev.get_state()
            for name, value in original.items():
                if name != "step":
                    np.testing.assert_array_equal(state[name], value)


def test_host_checks_data_before_anything_is_sent(tmp_path, tiny_bundle, digits, digits_npz):
    bad_labels = tmp_path / "bad_labels.npz"
    np.savez(bad_labels, X=digits.X, y=np.where(np.arange(len(digits.y)) == 7, 10, digits.y))
    few_features = tmp_path / "few_features.npz"
    np.savez(few_features, X=digits.X[:, :63], y=digits.y)
    inventory = tmp_path / "devices.toml"
    with device_server(tmp_path / "store", listen="127.0.0.1:0") as srv:
        inventory.write_text(f'[[device]]\nname = "d0"\nurl = "{srv.url}"\n')
        with DeviceClient(srv.url, ClientConfig(timing=fast_timing())) as dev:
            dev.deploy(tiny_bundle)
            dev.profile(clear=True)
        runs = [("finetune", "--device", srv.url, "--data", bad_labels, "--steps", 5),
                ("finetune", "--device", srv.url, "--data", digits_npz, "--eval", few_features, "--steps", 5),
                ("fleet", "finetune", "--inventory", inventory, "--data", bad_labels, "--steps", 5)]
        for args, fragment in zip(runs, ["labels must lie in 0..9, found 0..10", "the bundle expects 64",
                                         "labels must lie in 0..9"]):
            proc = run_edgefa(*args, without_torch=True)
            assert proc.returncode == 2, proc.stdout + proc.stderr
            (line,) = error_lines(proc)
            assert fragment in line, line
        with DeviceClient(srv.url, ClientConfig(timing=fast_timing())) as dev:
            with pytest.raises(DataError, match="non-finite"):
                dev.evaluate(np.full((2, 64), np.nan), np.zeros(2, np.int64))
            status, phases = dev.status(), dev.profile()["phases"]
    assert (status["step"], status["refused_steps"]) == (0, 0)
    assert not {"batch", "train_step", "forward"} & set(phases), sorted(phases)   # no data reached the device


def test_the_probe_measures_the_train_steps_own_loss(tiny_bundle, digits):
    """A checkpoint's judge (mean_loss: a forward pass in numpy) and the rule's history (the
    train-step graph's loss) must be the same number, or the factor would mean something else."""
    from edgefa.runtime.engine import OrtEngine
    from edgefa.runtime.finetune import mean_loss, standardize

    bundle = read_bundle(tiny_bundle)
    engine = OrtEngine(bundle, threads=1)
    X = standardize(bundle, digits, "digits")
    for rows in (slice(0, 32), slice(100, 101), slice(0, 1797)):
        probe = mean_loss(engine, False, X[rows], digits.y[rows])
        # (float32 in the graph: a near-zero loss of one sample agrees to ~1e-7 absolute)
        assert engine.step(X[rows], digits.y[rows], 0.0).loss == pytest.approx(probe, rel=1e-5, abs=1e-6)
