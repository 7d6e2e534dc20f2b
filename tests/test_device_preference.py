"""Preference bundles: an MLP scorer (one output) fine-tuned on the device with DFA on
Bradley-Terry pairs. Both items of a pair go through the same weights, and one update sums the
two passes' contributions; the device matches a host DFA run on the same batches within 1e-5."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import assert_one_error_line, run_edgefa
from edgefa.bundle import LOSS_BRADLEY_TERRY, momentum_name, read_bundle
from edgefa.shared.datasets import Standardizer
from edgefa.shared.preference_pairs import synthetic_pairs
from edgefa.errors import DataError, EdgefaError
from edgefa.exporters.export import _param_name, export_bundle
from edgefa.models import MLP, MLPConfig
from edgefa.shared.batches import batch_indices
from edgefa.runtime.engine import OrtEngine
from edgefa.runtime.finetune import FinetuneConfig, Finetuner, load_pairs
from edgefa.training.preference import bradley_terry_loss
from edgefa.training.trainer import Run, TrainConfig, make_optimizer

TOL = 1e-5
LR = 0.05
DIM = 16


def scorer_run(hidden=(32, 16), activation="relu", momentum=0.9, seed=0, loss="bradley-terry") -> Run:
    torch.manual_seed(seed)
    model = MLP(MLPConfig(DIM, list(hidden), 1, activation, "dfa", feedback_seed=seed + 7))
    config = TrainConfig(method="dfa", hidden=list(hidden), activation=activation, lr=LR, momentum=momentum,
                         loss=loss)
    return Run(model, make_optimizer(model, LR, momentum), config, Standardizer(0.1, 1.5),
               {"final_test_accuracy": None})


def host_state(run: Run) -> dict[str, np.ndarray]:
    out = {}
    for key, p in run.model.named_parameters():
        name = _param_name(key)
        out[name] = p.detach().numpy().copy()
        buf = run.optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            out[momentum_name(name)] = buf.numpy().copy()
    return out


def save_pairs(path, pairs) -> None:
    with open(path, "wb") as f:
        np.savez(f, chosen=pairs.chosen, rejected=pairs.rejected)


def test_the_run_s_loss_makes_a_preference_bundle(tmp_path):
    bundle = read_bundle(export_bundle(scorer_run(), tmp_path / "b"))
    assert bundle.manifest["loss"] == LOSS_BRADLEY_TERRY == "bradley-terry"
    sess = ort.InferenceSession(str(tmp_path / "b" / "train_step.onnx"), providers=["CPUExecutionProvider"])
    inputs = {i.name for i in sess.get_inputs()}
    assert {"x_chosen", "x_rejected", "lr"} <= inputs and "labels" not in inputs
    assert [o.name for o in sess.get_outputs()][-4:] == ["update_bound", "loss", "score_chosen", "score_rejected"]
    # the keyword says so too, for a run whose config does not
    plain = scorer_run(loss="cross_entropy")
    assert read_bundle(export_bundle(plain, tmp_path / "c", loss="bradley-terry")).manifest["loss"] == "bradley-terry"
    assert read_bundle(export_bundle(plain, tmp_path / "d")).manifest["loss"].startswith("cross_entropy")


def test_only_a_one_output_mlp_scorer_exports_bradley_terry(tmp_path):
    torch.manual_seed(0)
    model = MLP(MLPConfig(DIM, [8], 3, "relu", "dfa"))
    run = Run(model, make_optimizer(model, LR, 0.9), TrainConfig(loss="bradley-terry"), Standardizer(0.0, 1.0), {})
    with pytest.raises(EdgefaError, match="needs an MLP scorer with one output"):
        export_bundle(run, tmp_path / "b")
    with pytest.raises(EdgefaError, match="not 'hinge'"):
        export_bundle(scorer_run(loss="hinge"), tmp_path / "c")


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("trainable", ["all", "last:2"])
def test_device_pairs_steps_match_the_host(tmp_path, activation, momentum, trainable):
    """The Finetuner's batches (batch_indices) against torch: two forward passes of the DFA MLP,
    mean softplus(-(s_w - s_l)), SGD; the inputs scaled by the run's standardizer on both sides."""
    run = scorer_run(activation=activation, momentum=momentum)
    path = export_bundle(run, tmp_path / "b", trainable=trainable)
    if trainable != "all":
        for key, p in run.model.named_parameters():
            p.requires_grad_(_param_name(key).rsplit(".", 1)[0] in ("fc1", "head"))
    pairs = synthetic_pairs(100, DIM, sigma=0.3, seed=2)
    steps, batch, seed = 9, 16, 4
    tuner = Finetuner(read_bundle(path), pairs, FinetuneConfig(steps=steps, batch_size=batch, seed=seed,
                                                                 checkpoint_every=0, threads=1))
    C, R = run.standardizer.apply(pairs.chosen), run.standardizer.apply(pairs.rejected)
    for step in range(steps):
        idx = batch_indices(len(pairs), batch, seed, step)
        s_w = run.model(torch.from_numpy(C[idx]))[:, 0]
        s_l = run.model(torch.from_numpy(R[idx]))[:, 0]
        loss = bradley_terry_loss(s_w, s_l)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        result = tuner.train_step(step)
        assert result.accepted and abs(result.loss - loss.item()) <= TOL
        np.testing.assert_allclose(result.score_chosen, s_w.detach().numpy(), atol=TOL)
        np.testing.assert_allclose(result.score_rejected, s_l.detach().numpy(), atol=TOL)
    host, device = host_state(run), tuner.engine.state()
    assert set(device) <= set(host)
    worst = max(float(np.abs(host[k] - device[k]).max()) for k in device)
    print(f"preference {activation} momentum {momentum} {trainable}: max abs diff {worst:.3g}")
    assert worst <= TOL, worst
    initial = read_bundle(path).weights
    assert max(float(np.abs(host[k] - initial[k]).max()) for k in initial) > 100 * TOL


def test_engine_refuses_the_wrong_kind_of_step(tmp_path):
    engine = OrtEngine(read_bundle(export_bundle(scorer_run(), tmp_path / "b")), threads=1)
    with pytest.raises(EdgefaError, match="trains on pairs"):
        engine.step(np.zeros((2, DIM), np.float32), np.zeros(2, np.int64), LR)


def test_cli_finetune_reports_preference_accuracy_and_bad_pair_files_are_one_line(tmp_path):
    path = export_bundle(scorer_run(), tmp_path / "b")
    train, test = tmp_path / "train.npz", tmp_path / "test.npz"
    save_pairs(train, synthetic_pairs(400, DIM, sigma=0.0, seed=1))
    save_pairs(test, synthetic_pairs(200, DIM, sigma=0.0, seed=9))
    report = tmp_path / "r.json"
    tuned = run_edgefa("device", "finetune", path, "--data", train, "--eval", test, "--steps", "150",
                       "--lr", "0.02", "--report", report, without_torch=True)
    assert tuned.returncode == 0, tuned.stdout + tuned.stderr
    assert "preference accuracy" in tuned.stdout
    r = json.loads(report.read_text())
    assert r["metric"] == "preference accuracy" and r["refused_steps"] == [] and r["final_step"] == 150
    assert r["accuracy_after"] > r["accuracy_before"] + 0.1, r
    evaluated = run_edgefa("device", "evaluate", path, "--data", test, without_torch=True)
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    assert f"preference accuracy {100 * r['accuracy_after']:.1f}% on 200 pairs" in evaluated.stdout.replace("\n", " ")

    bad = {}
    with open(tmp_path / "missing.npz", "wb") as f:
        np.savez(f, chosen=np.zeros((4, DIM), np.float32))
    bad["missing"] = (tmp_path / "missing.npz", "missing 'rejected'")
    with open(tmp_path / "shape.npz", "wb") as f:
        np.savez(f, chosen=np.zeros((4, DIM), np.float32), rejected=np.zeros((3, DIM), np.float32))
    bad["shape"] = (tmp_path / "shape.npz", "must both be [N, D]")
    with open(tmp_path / "width.npz", "wb") as f:
        np.savez(f, chosen=np.zeros((4, 5), np.float32), rejected=np.zeros((4, 5), np.float32))
    bad["width"] = (tmp_path / "width.npz", "the bundle expects 16")
    with open(tmp_path / "ints.npz", "wb") as f:
        np.savez(f, chosen=np.zeros((4, DIM), np.int64), rejected=np.zeros((4, DIM), np.int64))
    bad["ints"] = (tmp_path / "ints.npz", "need float arrays")
    from conftest import run_all

    procs = run_all(*[("device", "finetune", path, "--data", f, "--steps", "2") for f, _ in bad.values()])
    for (f, problem), proc in zip(bad.values(), procs):
        assert_one_error_line(proc, str(f), problem)
    with np.load(path / "state" / "checkpoint.npz") as z:
        assert int(z["step"]) == 150            # nothing trained from a refused file


def test_load_pairs_refuses_nan_and_labelled_data(tmp_path):
    with open(tmp_path / "nan.npz", "wb") as f:
        np.savez(f, chosen=np.full((2, 3), np.nan, np.float32), rejected=np.zeros((2, 3), np.float32))
    with pytest.raises(DataError, match="non-finite"):
        load_pairs(tmp_path / "nan.npz")
    with open(tmp_path / "xy.npz", "wb") as f:
        np.savez(f, X=np.zeros((2, 3), np.float32), y=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="missing 'chosen', 'rejected'"):
        load_pairs(tmp_path / "xy.npz")
