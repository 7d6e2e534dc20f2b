"""A frozen trunk under a trained head: vit and transformer runs export their head to the device on a
torch-exported trunk, and one device step equals torch's SGD step of the head with the trunk frozen.
The trunk's weights are stored once (weights.npz) and bound like every frozen weight."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch.nn import functional as F

from edgefa.bundle import HEAD_STEP_GRAPH, TRUNK_GRAPH, momentum_name, part_topology, read_bundle, trunk_of
from edgefa.errors import EdgefaError
from edgefa.exporters.export import export_bundle
from edgefa.exporters import trunk as trunks
from edgefa.models import CausalTransformer, NetConfig, ViTMini
from edgefa.runtime.engine import OrtEngine
from edgefa.shared.datasets import Standardizer
from edgefa.training.trainer import Run, TrainConfig, make_optimizer

TOL = 1e-5
LR = 0.05

MODELS = {
    "vit-2d": (ViTMini, [1, 8, 8], {}),
    "vit-1d": (ViTMini, [2, 12], {"patch": 3}),
    "transformer-tokens-padded": (CausalTransformer, [10], {"vocab": 17, "pad_id": 0}),
    "transformer-features": (CausalTransformer, [10], {}),
}


def make_run(name: str, momentum: float, rule: str = "dfa") -> tuple[Run, int]:
    cls, shape, extra = MODELS[name]
    torch.manual_seed(0)
    model = cls(NetConfig(cls.__name__ == "ViTMini" and "vit" or "transformer", shape, 5, rule=rule, width=16,
                          depth=2, heads=2, activation="gelu", **extra))
    config = TrainConfig(method=rule, model=model.kind, lr=LR, momentum=momentum)
    return Run(model, make_optimizer(model, LR, momentum), config, Standardizer(0.0, 1.0),
               {"final_test_accuracy": None}), int(np.prod(shape))


def samples(name: str, batch: int, size: int, rng) -> np.ndarray:
    extra = MODELS[name][2]
    if extra.get("vocab"):
        x = rng.integers(1, extra["vocab"], (batch, size)).astype(np.float32)
        x[: batch // 2, size // 2:] = extra["pad_id"]           # right padding on half the rows
        return x
    return rng.standard_normal((batch, size)).astype(np.float32)


def host_forward(run: Run, name: str, x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(x)
    return run.model(t.long() if MODELS[name][2].get("vocab") else t)


@pytest.mark.parametrize("name, momentum", [("vit-2d", 0.9), ("vit-1d", 0.0), ("transformer-tokens-padded", 0.9),
                                            ("transformer-features", 0.0)])
def test_head_step_on_a_trunk_matches_torch_sgd_with_the_trunk_frozen(tmp_path, name, momentum):
    run, size = make_run(name, momentum, rule="fa" if name == "vit-1d" else "dfa")   # fa: its layers export plainly
    bundle = read_bundle(export_bundle(run, tmp_path / "b", trainable="head"))
    assert trunk_of(bundle.model)["features"] == 16 and part_topology(bundle.model)["layers"][0]["name"] == "head"
    engine = OrtEngine(bundle, threads=1)
    frozen = {k: v.detach().clone() for k, v in run.model.state_dict().items() if not k.startswith("head.")}
    head_opt = torch.optim.SGD(run.model.head.parameters(), lr=LR, momentum=momentum)
    run.model.eval()
    rng = np.random.default_rng(1)
    for batch in (1, 7, 16):
        x, y = samples(name, batch, size, rng), rng.integers(0, 5, batch)
        with torch.no_grad():
            expected_logits = host_forward(run, name, x).numpy()
        np.testing.assert_allclose(engine.predict_logits(x), expected_logits, atol=1e-4)
        result = engine.step(x, y, LR)
        assert result.accepted
        head_opt.zero_grad(set_to_none=True)
        F.cross_entropy(host_forward(run, name, x), torch.from_numpy(y)).backward()
        head_opt.step()
        state = engine.state()
        for p_name, p in (("head.weight", run.model.head.weight), ("head.bias", run.model.head.bias)):
            np.testing.assert_allclose(state[p_name], p.detach().numpy(), atol=TOL)
            if momentum:
                buf = head_opt.state[p]["momentum_buffer"].numpy()
                np.testing.assert_allclose(state[momentum_name(p_name)], buf, atol=TOL)
    assert all(torch.equal(v, run.model.state_dict()[k]) for k, v in frozen.items())   # nothing below moved


def test_trunk_weights_are_stored_once_and_the_graphs_hold_none(tmp_path):
    run, _ = make_run("vit-2d", 0.9)
    out = export_bundle(run, tmp_path / "b", trainable="head")
    bundle = read_bundle(out)
    trunk_params = trunk_of(bundle.model)["params"]
    assert trunk_params and all(n in bundle.weights for n in trunk_params)
    for graph in ("infer.onnx", "train_step.onnx", TRUNK_GRAPH, HEAD_STEP_GRAPH):
        m = onnx.load(str(out / graph))
        big = [t.name for t in m.graph.initializer if np.prod(t.dims) > 8]   # constants (axes, one-hot values) stay
        assert not big, f"{graph} holds weights as initializers: {big[:3]}"
        inputs = {i.name for i in m.graph.input}
        if graph != HEAD_STEP_GRAPH:
            assert set(trunk_params) <= inputs
    assert bundle.manifest["graphs"]["trunk"] == TRUNK_GRAPH
    assert bundle.manifest["tensorrt"]["ready"] in (True, False)


@pytest.mark.parametrize("request_", ["all", "last:2"])
def test_a_vit_asks_for_more_than_its_head_in_one_line(tmp_path, request_):
    run, _ = make_run("vit-2d", 0.9)
    with pytest.raises(EdgefaError, match=r"trains a vit's head only \(--trainable head\)"):
        export_bundle(run, tmp_path / "b", trainable=request_)
    assert not (tmp_path / "b").exists()


def test_a_trunk_cut_from_an_onnx_file_converts_its_opset_and_keeps_the_answer(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3, padding=1), torch.nn.BatchNorm1d(4), torch.nn.Tanh(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 6, 3)).eval()
    x = torch.randn(5, 2, 6)
    path = tmp_path / "user.onnx"
    torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=13, input_names=["signal"],
                      output_names=["scores"], dynamic_axes={"signal": {0: "n"}})
    trunk = trunks.from_onnx(path, "/2/Tanh")                          # a node name: its first output
    assert trunk.graph.opset_import[0].version == trunks.OPSET and trunk.features == 24
    import onnxruntime as ort
    session = ort.InferenceSession(trunk.graph.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(["features"], {"x": x.reshape(5, -1).numpy(), **trunk.params})[0]
    with torch.no_grad():
        want = net[:3](x).flatten(1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(EdgefaError, match=r"no tensor or node named 'Tanh' \(close: /2/Tanh"):
        trunks.from_onnx(path, "Tanh")


def test_a_trunk_whose_batch_is_fixed_is_refused_in_one_line(tmp_path):
    class BatchOfOne(torch.nn.Module):          # reshapes to a batch of 1, as fixed-batch exports do
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(6, 4)

        def forward(self, x):
            return torch.relu(self.fc(x)).reshape(1, 4)

    path = tmp_path / "fixed.onnx"
    torch.onnx.export(BatchOfOne().eval(), (torch.randn(1, 6),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    with pytest.raises(EdgefaError, match="cannot run it at batch 3 and 1"):
        trunks.from_onnx(path, "y")
