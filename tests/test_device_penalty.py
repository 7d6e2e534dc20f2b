"""A resmlp run's residual-stream penalty reaches the device: the bundle records lambda
(manifest["optimizer"]["residual_penalty"]) and its train_step adds 2 lambda r_i / batch to each
block's error at its output (r_i the block's residual branch) and lambda * sum_i mean_n ||r_i||^2
to the loss it reports. Checked against the host's DFA step with the same penalty (torch autograd
through trainer.task_loss, torch.optim.SGD). A bundle written before the field still trains."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from test_device_resmlp import CLASSES, D, LR, TOL, host_state, make_run
from test_trainable import freeze_all_but
from edgefa.bundle import read_bundle, sha256_file, trainable_layers, trainable_params
from edgefa.exporters.export import export_bundle
from edgefa.runtime.engine import OrtEngine
from edgefa.training.trainer import Run, task_loss

PENALTY = 0.3


def penalised_run(activation: str, momentum: float, penalty: float = PENALTY, seed: int = 0) -> Run:
    run = make_run(activation, momentum, seed=seed)
    run.config = dataclasses.replace(run.config, model="resmlp", penalty=penalty)
    return run


def host_step(run: Run, x: np.ndarray, y: np.ndarray) -> float:
    """The host trainer's step: cross-entropy + lambda * model.penalty (trainer.task_loss)."""
    loss = task_loss(run.model, run.model(torch.from_numpy(x)), torch.from_numpy(y), run.config.penalty)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    return loss.item()


def train_both(run: Run, engine: OrtEngine, batches=(1, 7, 64, 7, 32)) -> list[tuple[float, float]]:
    rng, losses = np.random.default_rng(0), []
    for batch in batches:    # several steps, so momentum carries over; the batch size varies
        x = rng.normal(size=(batch, D)).astype(np.float32)
        y = rng.integers(0, CLASSES, size=batch)
        host = host_step(run, x, y)
        result = engine.step(x, y, LR)
        assert result.accepted
        losses.append((host, result.loss))
    return losses


def worst_difference(run: Run, engine: OrtEngine) -> float:
    host, device = host_state(run), engine.state()
    assert set(device) <= set(host)
    return max(float(np.abs(host[k] - device[k]).max()) for k in device)


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_penalised_step_matches_the_host(tmp_path, activation, momentum, record_property):
    run = penalised_run(activation, momentum)
    path = export_bundle(run, tmp_path / "b")
    assert read_bundle(path).manifest["optimizer"]["residual_penalty"] == PENALTY
    engine = OrtEngine(read_bundle(path), threads=1)
    for host_loss, device_loss in train_both(run, engine):
        assert abs(device_loss - host_loss) <= TOL          # the penalised loss, as the host reports it
    worst = worst_difference(run, engine)
    record_property("max_abs_diff", worst)
    assert worst <= TOL, f"max abs difference {worst:.3g}"

    # the penalty really acts: the same steps without it end elsewhere, and report a smaller loss
    plain = penalised_run(activation, momentum, penalty=0.0)
    plain_engine = OrtEngine(read_bundle(export_bundle(plain, tmp_path / "plain")), threads=1)
    plain_losses = train_both(plain, plain_engine)
    moved = max(float(np.abs(engine.state()[k] - plain_engine.state()[k]).max()) for k in plain_engine.state())
    assert moved > 100 * TOL, moved
    assert plain_losses[0][1] < train_both(penalised_run(activation, momentum), OrtEngine(
        read_bundle(path), threads=1), batches=(1,))[0][1]


@pytest.mark.parametrize("spec", ["last:1", "last:2"])
def test_penalty_with_frozen_blocks_matches_the_host(tmp_path, spec):
    """last:1 trains the readout only: the penalty then changes the reported loss, not the step.
    last:2 also trains the top block, which gets its penalty gradient."""
    run = penalised_run("gelu", 0.9)
    bundle = read_bundle(export_bundle(run, tmp_path / "b", trainable=spec))
    freeze_all_but(run, trainable_layers(bundle.model))
    engine = OrtEngine(bundle, threads=1)
    for host_loss, device_loss in train_both(run, engine):
        assert abs(device_loss - host_loss) <= TOL
    assert set(engine.state()) == set(trainable_params(bundle.model)) | {f"{p}.momentum"
                                                                         for p in trainable_params(bundle.model)}
    assert worst_difference(run, engine) <= TOL


def test_a_bundle_without_the_field_still_loads_and_trains(tmp_path):
    """Bundles written before the field: no residual_penalty in the manifest (its graph has no
    penalty term); they verify and train as before."""
    path = export_bundle(penalised_run("relu", 0.9, penalty=0.0), tmp_path / "b")
    manifest_path = path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["optimizer"].pop("residual_penalty") == 0.0
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    bundle = read_bundle(path)            # the manifest is not hashed: only the files it lists
    assert sha256_file(path / "train_step.onnx") == manifest["files"]["train_step.onnx"]["sha256"]
    run = penalised_run("relu", 0.9, penalty=0.0)
    engine = OrtEngine(bundle, threads=1)
    for host_loss, device_loss in train_both(run, engine):
        assert abs(device_loss - host_loss) <= TOL
    assert worst_difference(run, engine) <= TOL


def test_only_residual_models_take_a_penalty():
    from edgefa.exporters.onnx_graphs import train_step_graph

    mlp = {"kind": "mlp", "in_features": 4, "n_classes": 2, "activation": "relu",
           "layers": [{"name": "fc0", "in": 4, "out": 3}, {"name": "head", "in": 3, "out": 2}]}
    with pytest.raises(ValueError, match="residual blocks"):
        train_step_graph(mlp, 0.9, penalty=0.1)
