"""Residual MLP bundles: the device's block-level DFA step (onnxruntime) against the host's ResMLP
under rule "dfa" (torch autograd + torch.optim.SGD, mean cross-entropy), and infer.onnx against
the torch forward. Other model kinds are host-only: exporting one is one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from edgefa.bundle import feedback_shapes, layer_names, momentum_name, param_shapes, read_bundle
from edgefa.shared.datasets import Standardizer
from edgefa.errors import EdgefaError
from edgefa.exporters.export import export_bundle
from edgefa.models import NetConfig, ResMLP
from edgefa.runtime.engine import OrtEngine
from edgefa.training.trainer import Run, TrainConfig, make_optimizer

TOL = 1e-5
LR = 0.05
D, WIDTH, DEPTH, CLASSES = 12, 16, 2, 4


def make_run(activation: str, momentum: float, rule: str = "dfa", seed: int = 0, expansion: int = 2) -> Run:
    torch.manual_seed(seed)
    model = ResMLP(NetConfig("resmlp", [D], CLASSES, rule, feedback_seed=seed + 7, width=WIDTH, depth=DEPTH,
                             expansion=expansion, activation=activation))
    config = TrainConfig(method=rule, lr=LR, momentum=momentum)
    return Run(model, make_optimizer(model, LR, momentum), config, Standardizer(0.0, 1.0),
               {"final_test_accuracy": None})


def host_state(run: Run) -> dict[str, np.ndarray]:
    out = {}
    for name, p in run.model.named_parameters():
        out[name] = p.detach().numpy().copy()
        buf = run.optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            out[momentum_name(name)] = buf.numpy().copy()
    return out


def host_step(run: Run, x: np.ndarray, y: np.ndarray) -> float:
    loss = F.cross_entropy(run.model(torch.from_numpy(x)), torch.from_numpy(y))
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    return loss.item()


def test_topology_and_naming_contract(tmp_path):
    bundle = read_bundle(export_bundle(make_run("relu", 0.9), tmp_path / "b"))
    m = bundle.model
    assert {k: m[k] for k in ("kind", "in_features", "width", "depth", "expansion", "activation", "n_classes",
                              "ln_eps", "trainable")} == {
        "kind": "resmlp", "in_features": D, "width": WIDTH, "depth": DEPTH, "expansion": 2,
        "activation": "relu", "n_classes": CLASSES, "ln_eps": 1e-5, "trainable": "all"}
    assert layer_names(m) == ["embed", "blocks.0.norm", "blocks.0.fc1", "blocks.0.fc2",
                              "blocks.1.norm", "blocks.1.fc1", "blocks.1.fc2", "norm", "head"]
    assert set(bundle.weights) == set(param_shapes(m)) == {n for n, _ in make_run("relu", 0.9).model.named_parameters()}
    assert feedback_shapes(m) == {"embed": (CLASSES, WIDTH), "block0": (CLASSES, WIDTH), "block1": (CLASSES, WIDTH)}


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_train_step_matches_host(tmp_path, activation, momentum, record_property):
    run = make_run(activation, momentum)
    path = export_bundle(run, tmp_path / "b")
    engine = OrtEngine(read_bundle(path), threads=1)
    rng = np.random.default_rng(0)
    for batch in (1, 7, 64, 7, 32):     # several steps, so momentum carries over; the batch size varies
        x = rng.normal(size=(batch, D)).astype(np.float32)
        y = rng.integers(0, CLASSES, size=batch)
        loss = host_step(run, x, y)
        result = engine.step(x, y, LR)
        assert result.accepted
        assert abs(result.loss - loss) <= TOL
    host, device = host_state(run), engine.state()
    expected = set(host) if momentum else {k for k in host if "momentum" not in k}
    assert set(device) == expected
    worst = max(float(np.abs(host[k] - device[k]).max()) for k in device)
    print(f"resmlp {activation} momentum {momentum}: max abs diff {worst:.3g}")
    record_property("max_abs_diff", worst)
    assert worst <= TOL, f"max abs difference {worst:.3g}"
    initial = read_bundle(path).weights
    for name in initial:   # every parameter really moved (LayerNorm gammas and betas included)
        assert float(np.abs(host[name] - initial[name]).max()) > 100 * TOL, name


@pytest.mark.parametrize("rule", ["bp", "fa"])
def test_feedback_of_a_non_dfa_run_is_the_dfa_twin_s(tmp_path, rule):
    """A bp or fa run's bundle gets the feedback a dfa run of the same seed would have drawn, and
    drawing it leaves the global RNG where it was."""
    torch.manual_seed(5)
    before = torch.get_rng_state()
    bundle = read_bundle(export_bundle(make_run("relu", 0.9, rule=rule), tmp_path / "b"))
    twin = make_run("relu", 0.9, rule="dfa")
    for name in ("embed", "block0", "block1"):
        np.testing.assert_array_equal(bundle.feedback[name], getattr(twin.model, f"feedback_{name}").numpy())
    assert "drawn at export" in bundle.manifest["feedback"]["source"]
    torch.manual_seed(5)
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_infer_matches_torch_forward(tmp_path, activation):
    run = make_run(activation, 0.9, seed=3)
    engine = OrtEngine(read_bundle(export_bundle(run, tmp_path / "b")), threads=1)
    x = np.random.default_rng(0).normal(size=(33, D)).astype(np.float32)
    with torch.no_grad():
        expected = run.model(torch.from_numpy(x)).numpy()
    got = engine.predict_logits(x, batch_size=16)
    assert got.shape == expected.shape
    assert float(np.abs(got - expected).max()) <= TOL


@pytest.mark.parametrize("kind", ["vit", "transformer"])
def test_attention_kinds_asked_for_all_say_what_the_device_trains_in_one_line(tmp_path, kind):
    from edgefa.models import NETS

    shapes = {"vit": [1, 8, 8], "transformer": [8]}
    model = NETS[kind](NetConfig(kind, shapes[kind], 3, "dfa", width=8, depth=1, heads=2))
    run = Run(model, make_optimizer(model, LR, 0.9), TrainConfig(), Standardizer(0.0, 1.0), {})
    with pytest.raises(EdgefaError) as info:
        export_bundle(run, tmp_path / "b")
    assert str(info.value) == (f"export: --trainable all: the device trains a {kind}'s head only "
                               "(--trainable head); its attention blocks have no DFA graph")
    assert not (tmp_path / "b").exists()


def test_resmlp_bundle_verifies_and_finetunes_without_torch(tmp_path):
    import json

    from conftest import run_edgefa

    from edgefa.shared.datasets import save_npz
    from edgefa.shared.datasets import Dataset

    path = export_bundle(make_run("gelu", 0.9), tmp_path / "b")
    rng = np.random.default_rng(1)
    data = tmp_path / "d.npz"
    X = rng.normal(size=(200, D)).astype(np.float32)
    save_npz(data, Dataset(X, ((X[:, 0] > 0).astype(np.int64) + 2 * (X[:, 1] > 0)), CLASSES, "toy"))
    verified = run_edgefa("device", "verify", path, without_torch=True)
    assert verified.returncode == 0, verified.stderr
    assert "resmlp 12 -> 2 x [16 -> 32 -> 16] -> 4" in verified.stdout
    report = tmp_path / "r.json"
    tuned = run_edgefa("device", "finetune", path, "--data", data, "--steps", "30", "--eval", data,
                       "--report", report, without_torch=True)
    assert tuned.returncode == 0, tuned.stdout + tuned.stderr
    r = json.loads(report.read_text())
    assert r["final_step"] == 30 and r["refused_steps"] == []
    assert r["loss_last"] < r["loss_first"]


def test_cli_train_resmlp_export_and_finetune_on_the_device_and_cnn_export_is_one_line(tmp_path, digits_npz):
    import json

    from conftest import assert_one_error_line, cli_in_process, run_edgefa

    from edgefa.models import NETS
    from edgefa.training.trainer import save_run

    res, cnn = tmp_path / "res", tmp_path / "cnn"
    # the host side through the CLI's code in this process (one torch import); the device side below
    # in a second process where torch cannot be imported
    trained = cli_in_process("train", "--model", "resmlp", "--width", "16", "--depth", "2", "--activation", "gelu",
                             "--epochs", "1", "--device", "cpu", "--out", res)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    model = NETS["cnn"](NetConfig("cnn", [1, 8, 8], 10, "dfa", width=4, depth=1))
    save_run(Run(model, make_optimizer(model, LR, 0.9), TrainConfig(model="cnn"), Standardizer(0.0, 1.0), {}), cnn)
    exported, cnn_exported = (cli_in_process("export", res, "--out", tmp_path / "B"),
                              cli_in_process("export", cnn, "--trainable", "head", "--out", tmp_path / "C"))
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert cnn_exported.returncode == 0, cnn_exported.stdout + cnn_exported.stderr
    for bundle in ("B", "C"):       # the cnn's head trains on its torch-exported trunk, torch absent
        report = tmp_path / f"r{bundle}.json"
        tuned = run_edgefa("device", "finetune", tmp_path / bundle, "--data", digits_npz, "--steps", "20",
                           "--report", report, without_torch=True)
        assert tuned.returncode == 0, tuned.stdout + tuned.stderr
        r = json.loads(report.read_text())
        assert (r["final_step"], r["refused_steps"]) == (20, [])
    assert read_bundle(tmp_path / "B").model["activation"] == "gelu"
