"""The BP side of `edgefa profile compare` builds the bundle's own model (training/bp_profile.bp_twin):
the same kind, shapes, activation and LayerNorm epsilon, the bundle's weights, and only the tensors
the device trains (`last:K`) left trainable. Its forward pass is the bundle's infer graph's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_edgefa
from edgefa.bundle import TRUNK_GRAPH, param_shapes, read_bundle, trainable_params
from edgefa.errors import EdgefaError
from edgefa.exporters.export import export_bundle
from edgefa.models import CNN, MLP, MLPConfig, NetConfig, ResMLP
from edgefa.profile_runs.compare import BP
from edgefa.runtime.engine import OrtEngine
from edgefa.shared.datasets import Standardizer
from edgefa.training.bp_profile import BP_TWINS, bp_step_cost, bp_twin
from edgefa.training.trainer import Run, TrainConfig, make_optimizer

D, WIDTH, DEPTH, EXPANSION, CLASSES = 12, 16, 3, 2, 5


def resmlp_bundle(path, trainable: str, activation: str = "gelu"):
    torch.manual_seed(0)
    model = ResMLP(NetConfig("resmlp", [D], CLASSES, "dfa", feedback_seed=7, width=WIDTH, depth=DEPTH,
                             expansion=EXPANSION, activation=activation))
    run = Run(model, make_optimizer(model, 0.05, 0.9), TrainConfig(method="dfa", lr=0.05, momentum=0.9),
              Standardizer(0.0, 1.0), {"final_test_accuracy": None})
    return read_bundle(export_bundle(run, path, trainable=trainable))


def trainable_count(model: dict) -> int:
    return sum(int(np.prod(s)) for s in trainable_params(model).values())


@pytest.mark.parametrize("trainable", ["all", "last:2"])
def test_the_twin_of_a_resmlp_bundle_is_its_model_with_its_trainable_split(tmp_path, trainable):
    bundle = resmlp_bundle(tmp_path / "b", trainable)
    twin = bp_twin(bundle.model, bundle.weights)
    assert isinstance(twin, ResMLP) and twin.config.rule == "bp"
    named = dict(twin.named_parameters())
    assert {n: tuple(p.shape) for n, p in named.items()} == {n: tuple(s) for n, s in param_shapes(bundle.model).items()}
    assert {n for n, p in named.items() if p.requires_grad} == set(trainable_params(bundle.model))
    assert sum(p.numel() for p in twin.parameters() if p.requires_grad) == trainable_count(bundle.model)
    if trainable != "all":
        assert trainable_count(bundle.model) < sum(p.numel() for p in twin.parameters())

    x = np.random.default_rng(1).standard_normal((9, D)).astype(np.float32)
    with torch.no_grad():
        torch_logits = twin(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(torch_logits, OrtEngine(bundle, threads=1).predict_logits(x), atol=1e-5)

    # a BP step moves only the trainable tensors
    before = {n: p.detach().clone() for n, p in named.items()}
    opt = make_optimizer(twin, 0.1, 0.9)
    loss = torch.nn.functional.cross_entropy(twin(torch.from_numpy(x)), torch.arange(9) % CLASSES)
    loss.backward()
    opt.step()
    moved = {n for n, p in named.items() if not torch.equal(p.detach(), before[n])}
    assert moved == set(trainable_params(bundle.model))


def test_the_twin_of_an_mlp_bundle_is_its_model(tmp_path):
    torch.manual_seed(0)
    mlp = MLP(MLPConfig(D, [32, 16], CLASSES, "tanh", "dfa"))
    run = Run(mlp, make_optimizer(mlp, 0.05, 0.9), TrainConfig(method="dfa", hidden=[32, 16], activation="tanh"),
              Standardizer(0.0, 1.0), {"final_test_accuracy": None})
    bundle = read_bundle(export_bundle(run, tmp_path / "b"))
    twin = bp_twin(bundle.model, bundle.weights)
    x = np.random.default_rng(2).standard_normal((7, bundle.model["in_features"])).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(twin(torch.from_numpy(x)).numpy(), OrtEngine(bundle, threads=1).predict_logits(x),
                                   atol=1e-5)
    # the BP step's cost of a whole MLP: forward, two backward Gemms per layer, SGD with momentum
    weights = sum(layer["in"] * layer["out"] for layer in bundle.model["layers"])
    params = sum(int(np.prod(s)) for s in param_shapes(bundle.model).values())
    assert bp_step_cost(bundle.model, 32, 0.9)[0] == 6 * 32 * weights + 4 * params


def cnn_bundle(path, trainable: str):
    torch.manual_seed(0)
    model = CNN(NetConfig("cnn", [1, 8, 8], CLASSES, "dfa", feedback_seed=7, width=4, depth=2, activation="tanh"))
    run = Run(model, make_optimizer(model, 0.05, 0.9), TrainConfig(method="dfa", model="cnn", lr=0.05, momentum=0.9),
              Standardizer(0.0, 1.0), {"final_test_accuracy": None})
    return read_bundle(export_bundle(run, path, trainable=trainable))


@pytest.mark.parametrize("trainable", ["all", "last:3", "head"])
def test_the_twin_of_a_cnn_bundle_on_or_off_a_trunk_is_its_model_with_its_split(tmp_path, trainable):
    """cnn `all`: every stage in torch; `last:3` / `head`: the part in torch on the bundle's trunk
    (onnxruntime, no gradient). Same logits as infer.onnx, same trainable tensors, and one BP step
    moves exactly them."""
    bundle = cnn_bundle(tmp_path / "b", trainable)
    twin = bp_twin(bundle.model, bundle.weights, bundle.path / TRUNK_GRAPH)
    x = np.random.default_rng(0).standard_normal((9, 64)).astype(np.float32)
    with torch.no_grad():
        logits = twin(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, OrtEngine(bundle, threads=1).predict_logits(x), atol=1e-5)
    trained = [p for p in twin.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trained) == trainable_count(bundle.model)
    before = [p.detach().clone() for p in twin.parameters()]
    opt = torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=0.1)
    torch.nn.functional.cross_entropy(twin(torch.from_numpy(x)), torch.arange(9) % CLASSES).backward()
    opt.step()
    moved = [not torch.equal(b, p) for b, p in zip(before, twin.parameters())]
    assert moved == [p.requires_grad for p in twin.parameters()]


def test_an_unknown_kind_or_a_trunk_without_its_graph_is_one_line():
    with pytest.raises(EdgefaError) as exc:
        bp_twin({"kind": "transformer", "in_features": 4, "n_classes": 2, "activation": "relu"})
    message = str(exc.value)
    assert "\n" not in message and "'transformer'" in message and ", ".join(BP_TWINS) in message, message
    head_on_trunk = {"kind": "mlp", "in_features": 64, "n_classes": 10, "activation": "relu",
                     "layers": [{"name": "head", "in": 32, "out": 10}], "trunk": {"features": 32, "params": {}}}
    with pytest.raises(EdgefaError, match="on a frozen trunk needs its weights and trunk graph"):
        bp_twin(head_on_trunk)


def test_profile_compare_on_a_resmlp_bundle_trains_the_same_part_on_both_sides(tmp_path):
    bundle = resmlp_bundle(tmp_path / "b", "last:2")
    steps = 8
    proc = run_edgefa("profile", "compare", bundle.path, "--steps", steps, "--warmup", 2, "--profile", "generic-x86",
                      "--out", tmp_path / "out")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    c = json.loads((tmp_path / "out" / "compare.json").read_text())
    dfa, bp = c["runs"].values()
    assert bp == c["runs"][BP]
    assert bp["finetune"]["trainable_parameters"] == trainable_count(bundle.model)
    assert dfa["finetune"]["steps_run"] == bp["finetune"]["steps_run"] == steps
    # the same model, weights and first batch: the same first loss on both sides
    assert bp["finetune"]["loss_first"] == pytest.approx(dfa["finetune"]["loss_first"], abs=1e-5)
    assert c["model"]["layers"][0] == D and bp["model"]["kind"] == "resmlp"
