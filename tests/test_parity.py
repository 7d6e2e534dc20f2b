"""One DFA step on the host (torch autograd + torch.optim.SGD) and one on the device (the exported
train_step.onnx in onnxruntime) agree: same weights, batch, feedback and hyperparameters give the
same new weights and momentum within 1e-5. The same for infer.onnx against the torch forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from edgefa.bundle import momentum_name, read_bundle
from edgefa.shared.datasets import Standardizer
from edgefa.exporters.export import _param_name, export_bundle
from edgefa.models import MLP, MLPConfig
from edgefa.runtime.engine import OrtEngine
from edgefa.training.trainer import Run, TrainConfig, make_optimizer

TOL = 1e-5
LR = 0.05


def make_run(widths: list[int], activation: str, momentum: float, seed: int = 0) -> Run:
    in_features, *hidden, classes = widths
    torch.manual_seed(seed)
    model = MLP(MLPConfig(in_features, hidden, classes, activation, "dfa", feedback_seed=seed + 7))
    config = TrainConfig(method="dfa", hidden=hidden, activation=activation, lr=LR, momentum=momentum)
    return Run(model, make_optimizer(model, LR, momentum), config, Standardizer(0.0, 1.0),
               {"final_test_accuracy": None})


def host_state(run: Run) -> dict[str, np.ndarray]:
    """Weights and momentum buffers by bundle name, as the device names them."""
    out = {}
    for key, p in run.model.named_parameters():
        name = _param_name(key)
        out[name] = p.detach().numpy().copy()
        buf = run.optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            out[momentum_name(name)] = buf.numpy().copy()
    return out


SHAPES = [[64, 32, 10], [20, 48, 24, 5], [100, 128, 64, 32, 3]]


@pytest.mark.parametrize("widths", SHAPES, ids=lambda w: "x".join(map(str, w)))
@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_train_step_matches_host(tmp_path, widths, activation, momentum):
    run = make_run(widths, activation, momentum)
    engine = OrtEngine(read_bundle(export_bundle(run, tmp_path / "b")), threads=1)
    rng = np.random.default_rng(0)
    for batch in (1, 7, 64, 7):  # several steps, so momentum carries over; the batch size varies
        x = rng.normal(size=(batch, widths[0])).astype(np.float32)
        y = rng.integers(0, widths[-1], size=batch)
        loss = F.cross_entropy(run.model(torch.from_numpy(x)), torch.from_numpy(y))
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        result = engine.step(x, y, LR)
        assert result.accepted
        assert abs(result.loss - loss.item()) <= TOL
    host, device = host_state(run), engine.state()
    assert set(device) == set(host) if momentum else set(device) == {k for k in host if "momentum" not in k}
    worst = max(float(np.abs(host[k] - device[k]).max()) for k in device)
    assert worst <= TOL, f"max abs difference {worst:.3g}"
    moved = max(float(np.abs(host[k] - run_initial).max()) for k, run_initial in
                read_bundle(tmp_path / "b").weights.items())
    assert moved > 100 * TOL  # the step really changed the weights; parity is not vacuous


@pytest.mark.parametrize("widths", SHAPES, ids=lambda w: "x".join(map(str, w)))
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_infer_matches_torch_forward(tmp_path, widths, activation):
    run = make_run(widths, activation, 0.9, seed=3)
    engine = OrtEngine(read_bundle(export_bundle(run, tmp_path / "b")), threads=1)
    x = np.random.default_rng(0).normal(size=(33, widths[0])).astype(np.float32)
    with torch.no_grad():
        expected = run.model(torch.from_numpy(x)).numpy()
    got = engine.predict_logits(x, batch_size=16)  # two graph runs of different batch sizes
    assert got.shape == expected.shape
    assert float(np.abs(got - expected).max()) <= TOL
