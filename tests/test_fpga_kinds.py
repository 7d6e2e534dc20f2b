"""The FPGA simulator and cost model on `trainable: last:K` MLPs and Bradley-Terry scorers, and the
one-line refusals of what they do not model (resmlp, cnn, a frozen trunk).

With the wide formats of test_fpga_datapath the fixed-point step follows the float32 runtime step
(train_step.onnx in onnxruntime) within 1e-6: a last:K step trains exactly the runtime's layers and
leaves the frozen ones at their quantized bundle values; a scorer's step on pairs takes its error
from the softmax unit on the pair's two scores, which is the Bradley-Terry error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import assert_one_error_line, run_edgefa
from test_device_preference import DIM, save_pairs, scorer_run
from test_fpga_datapath import PARITY_TOL, WIDE, batches
from test_trainable import LR, mlp_run
from edgefa.bundle import momentum_name, read_bundle, trainable_params
from edgefa.errors import EdgefaError
from edgefa.exporters.export import export_bundle
from edgefa.fpga_sim import scope
from edgefa.fpga_sim.cost import MacArray, compare, cost_of_bundle, cost_report
from edgefa.fpga_sim.datapath import FixedPointDFA
from edgefa.fpga_sim.simulate import SimulateConfig, float_reference_engine, simulate
from edgefa.runtime.engine import OrtEngine
from edgefa.shared.datasets import Dataset
from edgefa.shared.preference_pairs import synthetic_pairs

MLP3 = {"kind": "mlp", "in_features": 20, "n_classes": 5, "activation": "relu",
        "layers": [{"name": "fc0", "in": 20, "out": 48}, {"name": "fc1", "in": 48, "out": 24},
                   {"name": "head", "in": 24, "out": 5}]}


def assert_follows_the_runtime(fixed: FixedPointDFA, engine: OrtEngine, bundle, momentum: float) -> None:
    """`engine`: float_reference_engine's, which trains copies, so `bundle.weights` are the start."""
    device, mine, start = engine.state(), fixed.weights_float(), bundle.weights
    for name in bundle.weights:
        if name in device:                                        # trained
            if name != "head.bias" or not fixed.pairs:     # a scorer's head bias: sum(e_w + e_l) = 0
                assert np.abs(device[name] - start[name]).max() > 1e-3, f"{name} hardly moved"
            assert np.abs(mine[name] - device[name]).max() <= PARITY_TOL, name
            if momentum:
                assert np.abs(fixed.velocity_float()[name] - device[momentum_name(name)]).max() <= PARITY_TOL
        else:                                                     # frozen: its quantized bundle value
            assert name not in fixed.velocity
            assert np.abs(mine[name] - start[name]).max() <= 2.0 ** -24, name
    assert sum(fixed.counters.overflowed.values()) == 0


@pytest.mark.parametrize("spec", ["last:1", "last:2"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_last_k_fixed_point_step_matches_the_runtime(tmp_path, spec, activation):
    run = mlp_run(momentum=0.9)
    run.model.config.activation = activation                     # (the same weights; tanh exercises the table)
    bundle = read_bundle(export_bundle(run, tmp_path / "b", trainable=spec))
    engine, fixed = float_reference_engine(bundle), FixedPointDFA(bundle, WIDE, lr=LR)
    assert fixed.trained == ["head"] if spec == "last:1" else ["fc1", "head"]
    assert set(fixed.velocity) == set(trainable_params(bundle.model))
    for x, y in batches(20, 5):
        engine.step(x, y, LR)
        fixed.step(x, y)
    assert_follows_the_runtime(fixed, engine, bundle, 0.9)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_bradley_terry_fixed_point_step_matches_the_runtime(tmp_path, momentum):
    bundle = read_bundle(export_bundle(scorer_run(momentum=momentum), tmp_path / "b"))
    engine, fixed = float_reference_engine(bundle), FixedPointDFA(bundle, WIDE, lr=LR)
    rng = np.random.default_rng(4)
    for n in (8, 5, 16, 8):
        chosen, rejected = (rng.normal(size=(n, DIM)).astype(np.float32) for _ in range(2))
        float_loss = engine.step_pairs(chosen, rejected, LR).loss
        assert abs(fixed.step_pairs(chosen, rejected) - float_loss) <= 1e-5
    assert_follows_the_runtime(fixed, engine, bundle, momentum)
    with pytest.raises(EdgefaError, match="trains on pairs"):
        fixed.step(chosen, np.zeros(len(chosen), np.int64))


def test_simulate_a_scorer_on_pairs_reports_preference_accuracy(tmp_path):
    bundle = read_bundle(export_bundle(scorer_run(), tmp_path / "b"))
    train, held_out = synthetic_pairs(256, DIM, seed=1), synthetic_pairs(128, DIM, seed=2)
    r = simulate(bundle, train, SimulateConfig(steps=40, batch_size=16), WIDE, held_out)
    assert r["metric"] == "preference accuracy" and r["eval_samples"] == 128
    assert r["accuracy_after"]["float32"] > r["accuracy_before"]["float32"]
    assert abs(r["accuracy_after"]["fixed"] - r["accuracy_after"]["float32"]) <= 1 / 128
    assert abs(r["loss_last"]["fixed"] - r["loss_last"]["float32"]) <= 1e-4
    with pytest.raises(EdgefaError, match="preference pairs"):         # labelled data for a scorer: one line
        simulate(bundle, Dataset(np.zeros((4, DIM), np.float32), np.zeros(4, np.int64), 1, "labels"),
                 SimulateConfig(steps=1), WIDE)


def test_cost_of_last_k_counts_only_the_trained_layers():
    array = MacArray(4, 4)
    whole, last1 = cost_report(MLP3, array, "dfa", 8), cost_report(dict(MLP3, trainable="last:1"), array, "dfa", 8)
    assert last1["phases"]["forward"] == whole["phases"]["forward"]          # the forward runs every layer
    assert last1["phases"]["projection"]["cycles"] == 0                       # the head's error is e itself
    assert last1["network"]["trained_layers"] == ["head"]
    head = 5 * 25
    assert last1["memory"]["tensors"]["momentum"]["elements"] == head == last1["network"]["trained_parameters"]
    assert last1["memory"]["tensors"]["feedback"]["elements"] == 0
    assert last1["phases"]["update"]["cycles"] == -(-head // 4)
    assert last1["phases"]["outer_products"]["matmuls"] == 1
    last2 = cost_report(dict(MLP3, trainable="last:2"), array, "dfa", 8)
    assert last2["memory"]["tensors"]["feedback"]["elements"] == 5 * 24          # B of fc1 only
    assert last2["memory"]["tensors"]["errors"]["elements"] == 8 * 24
    bp2 = cost_report(dict(MLP3, trainable="last:2"), array, "bp", 8)
    assert bp2["memory"]["tensors"]["weights_t"]["elements"] == 5 * 24        # W_head^T: the backward stops at fc1
    assert bp2["phases"]["projection"]["matmuls"] == 1
    all3 = cost_report(dict(MLP3, trainable="last:3"), array, "dfa", 8)
    assert {k: v for k, v in all3.items() if k != "network"} == {k: v for k, v in whole.items() if k != "network"}


def test_cost_of_pairs_is_the_step_on_two_rows_per_pair():
    scorer = dict(MLP3, n_classes=1, layers=[*MLP3["layers"][:2], {"name": "head", "in": 24, "out": 1}])
    pairs, rows = (compare(scorer, MacArray(), 16, pairs=True), compare(scorer, MacArray(), 32))
    for rule in ("dfa", "bp"):
        assert pairs[rule]["rows"] == 32 and pairs[rule]["batch"] == 16 and pairs[rule]["pairs"]
        assert pairs[rule]["phases"] == rows[rule]["phases"]
        assert pairs[rule]["train_step"] == rows[rule]["train_step"]


def test_cli_simulate_and_cost_serve_last_k_and_preference_bundles(tmp_path):
    last2 = export_bundle(mlp_run(), tmp_path / "last2", trainable="last:2")
    scorer = export_bundle(scorer_run(), tmp_path / "scorer")
    pairs = tmp_path / "pairs.npz"
    save_pairs(pairs, synthetic_pairs(64, DIM, seed=3))
    rng = np.random.default_rng(0)
    samples = tmp_path / "samples.npz"
    np.savez(samples, X=rng.standard_normal((64, 20)).astype(np.float32), y=rng.integers(0, 5, 64))
    sim = run_edgefa("fpga", "simulate", scorer, "--data", pairs, "--steps", "3", "--json", tmp_path / "s.json",
                     without_torch=True)
    assert sim.returncode == 0, sim.stdout + sim.stderr
    assert "preference accuracy before" in sim.stdout
    assert json.loads((tmp_path / "s.json").read_text())["metric"] == "preference accuracy"
    cost = run_edgefa("fpga", "cost", last2, "--json", tmp_path / "c.json", without_torch=True)
    assert cost.returncode == 0, cost.stdout + cost.stderr
    assert "trains last:2" in cost.stdout
    assert json.loads((tmp_path / "c.json").read_text())["dfa"]["network"]["trained_layers"] == ["fc1", "head"]
    assert cost_of_bundle(scorer, MacArray())["dfa"]["pairs"] is True
    wrong = run_edgefa("fpga", "simulate", scorer, "--data", samples, "--steps", "3", without_torch=True)
    assert_one_error_line(wrong, "preference pairs")


@pytest.mark.parametrize("model,reason", [
    ({"kind": "resmlp"}, "model kind 'resmlp' (its LayerNorms need a per-row mean, variance and reciprocal "
                         "square root"),
    ({"kind": "cnn"}, "model kind 'cnn' (conv stages (im2col matmuls) and max-pool routing are not in the datapath"),
    (dict(MLP3, trunk={"graph": "trunk.onnx"}), "a frozen trunk (an arbitrary ONNX graph"),
    (dict(MLP3, trainable="head"), "trainable 'head' (not 'all' or 'last:K')"),
])
def test_what_is_not_modelled_is_one_line_naming_what_is_and_why_not(model, reason):
    with pytest.raises(scope.OutOfScope) as info:
        scope.require_in_scope({"model": model}, "B")
    line = str(info.value)
    assert "\n" not in line and reason in line
    assert line.startswith("B: fpga: the fixed-point datapath models an MLP's DFA step (every layer or the last K")
    with pytest.raises(scope.OutOfScope):
        cost_report(model, MacArray())
    assert scope.out_of_scope({"model": MLP3, "loss": "hinge"}) == ["loss 'hinge' (not cross-entropy or bradley-terry)"]
