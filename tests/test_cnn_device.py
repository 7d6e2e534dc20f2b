"""cnn parts on the device: the hand-built train_step graph (conv stages by DFA, exporters/
conv_graphs.py) in a real onnxruntime session against the host's DFA step (models/cnn.py under
rule "dfa", mean cross-entropy, torch.optim.SGD), and infer.onnx against the torch forward.

The parity grid covers 1-D and 2-D, relu / tanh / gelu, momentum 0 and 0.9, batches 1, 7 and 64
over several steps, odd spatial sizes (1-D 40 -> 20 -> 10 -> 5 -> 2; 2-D 9x7 -> 4x3 -> 2x1, then a
stage too small to pool), a part cut above conv0 and a `last:K` part. Strides and paddings the
host CNN never uses are checked against a functional torch DFA step written here.
"""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.nn import functional as F

from edgefa.bundle import (check_manifest, conv_spatial, describe_model, feedback_input_name, feedback_shapes,
                           layer_names, momentum_name, next_name, param_shapes, trainable_layers, trainable_params,
                           trainable_units)
from edgefa.errors import BundleError, EdgefaError
from edgefa.exporters.cnn_export import cnn_feedback, cnn_topology, cnn_weights
from edgefa.exporters.onnx_graphs import infer_graph, serialize_checked, train_step_graph
from edgefa.models import CNN, NetConfig

TOL = 1e-5
LR = 0.1
CLASSES = 5
ONE_D, TWO_D = [2, 40], [2, 9, 7]       # odd sizes: 40 -> 20 -> 10 -> 5 -> 2; 9x7 -> 4x3 -> 2x1 -> 2x1
DEPTH = {2: 4, 3: 3}


def make_cnn(in_shape, activation="relu", rule="dfa", seed=0, width=3) -> CNN:
    torch.manual_seed(seed)
    return CNN(NetConfig("cnn", in_shape, CLASSES, rule, feedback_seed=seed + 11, width=width,
                         depth=DEPTH[len(in_shape)], activation=activation))


def session(model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(serialize_checked(model), options, providers=["CPUExecutionProvider"])


class DeviceSteps:
    """The train_step graph of a cnn part in onnxruntime, its state fed back by name each step."""

    def __init__(self, topo: dict, weights: dict, feedback: dict, momentum: float):
        self.topo, self.momentum = topo, momentum
        self.sess = session(train_step_graph(topo, momentum))
        self.state = dict(weights)
        if momentum:
            self.state.update({momentum_name(n): np.zeros(s, np.float32) for n, s in trainable_params(topo).items()})
        self.feedback = {feedback_input_name(k): v for k, v in feedback.items()}
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def step(self, x: np.ndarray, y: np.ndarray, lr: float) -> dict:
        out = dict(zip(self.outputs, self.sess.run(None, {"x": x, "labels": y, "lr": np.array(lr, np.float32),
                                                          **self.state, **self.feedback})))
        for name in list(self.state):
            if next_name(name) in out:
                self.state[name] = out[next_name(name)]
        return out


def host_step(model, optimizer, x: np.ndarray, y: np.ndarray) -> float:
    """One host DFA step of the whole model (stages the part leaves frozen have requires_grad off;
    the host's DFA detaches every stage's input itself)."""
    loss = F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def frozen_features(model, x: np.ndarray, first_stage: int) -> np.ndarray:
    """What a trunk of the first `first_stage` conv stages hands the part: their output, flattened."""
    if first_stage == 0:
        return x
    with torch.no_grad():
        h = model.prepare(torch.from_numpy(x))
        for stage in model.convs[:first_stage]:
            h = stage(h)
    return h.flatten(1).numpy()


def host_state(model, optimizer, first_stage: int) -> dict[str, np.ndarray]:
    """The part's weights and momentum buffers under the bundle's names."""
    state = cnn_weights(model, first_stage)
    by_tensor = {}
    for i in range(first_stage, len(model.convs)):
        by_tensor.update({f"conv{i}.weight": model.convs[i][0].weight, f"conv{i}.bias": model.convs[i][0].bias})
    by_tensor.update({"fc.weight": model.fc[1].weight, "fc.bias": model.fc[1].bias,
                      "head.weight": model.head.weight, "head.bias": model.head.bias})
    for name, p in by_tensor.items():
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            state[momentum_name(name)] = buf.numpy().copy()
    return state


def check_bounds(before: dict, device: DeviceSteps, bound: np.ndarray) -> None:
    """update_bound[l] caps every element of layer l's step gradient (lr folded in at momentum 0)."""
    for layer, cap in zip(trainable_layers(device.topo), bound):
        for param in (f"{layer}.weight", f"{layer}.bias"):
            if device.momentum:
                grad = device.state[momentum_name(param)] - device.momentum * before[momentum_name(param)]
            else:
                grad = before[param] - device.state[param]
            assert float(np.abs(grad).max()) <= cap * (1 + 1e-5) + 1e-7, (param, float(np.abs(grad).max()), cap)


CASES = [  # in_shape, activation, momentum, first_stage, trainable
    (ONE_D, "relu", 0.0, 0, "all"), (ONE_D, "relu", 0.9, 0, "all"),
    (ONE_D, "tanh", 0.0, 0, "all"), (ONE_D, "tanh", 0.9, 0, "all"),
    (TWO_D, "relu", 0.0, 0, "all"), (TWO_D, "relu", 0.9, 0, "all"),
    (TWO_D, "tanh", 0.0, 0, "all"), (TWO_D, "tanh", 0.9, 0, "all"),
    (TWO_D, "gelu", 0.9, 0, "all"),
    (TWO_D, "relu", 0.9, 1, "all"), (ONE_D, "tanh", 0.0, 1, "all"),
    (ONE_D, "relu", 0.9, 0, "last:3"),
]


@pytest.mark.parametrize("in_shape, activation, momentum, first_stage, trainable", CASES,
                         ids=["-".join(map(str, [len(c[0]) - 1, "d", *c[1:]])) for c in CASES])
def test_train_step_matches_the_host_dfa_step(in_shape, activation, momentum, first_stage, trainable,
                                              record_property):
    model = make_cnn(in_shape, activation)
    topo = cnn_topology(model, first_stage)
    topo["trainable"] = trainable
    trained = trainable_layers(topo)
    for i, stage in enumerate(model.convs):     # the host trains what the part trains
        stage.requires_grad_(f"conv{i}" in trained)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=momentum)
    feedback = {k: v for k, v in cnn_feedback(model, first_stage).items() if k in feedback_shapes(topo)}
    device = DeviceSteps(topo, cnn_weights(model, first_stage), feedback, momentum)
    initial = dict(device.state)
    rng = np.random.default_rng(1)
    for batch in (1, 7, 64, 7):          # several steps, so momentum carries over; the batch size varies
        x = rng.normal(size=(batch, math.prod(in_shape))).astype(np.float32)
        y = rng.integers(0, CLASSES, size=batch)
        before = dict(device.state)
        out = device.step(frozen_features(model, x, first_stage), y, LR)
        loss = host_step(model, optimizer, x, y)
        assert abs(float(out["loss"]) - loss) <= TOL
        check_bounds(before, device, out["update_bound"])
    host = host_state(model, optimizer, first_stage)
    assert set(host) == set(device.state)
    worst = max(float(np.abs(host[k] - device.state[k]).max()) for k in host)
    print(f"cnn {in_shape} {activation} momentum {momentum} first_stage {first_stage} {trainable}: "
          f"max abs diff {worst:.3g}")
    record_property("max_abs_diff", worst)
    assert worst <= TOL, f"max abs difference {worst:.3g}"
    for name in trainable_params(topo):         # every trained tensor really moved
        assert float(np.abs(host[name] - initial[name]).max()) > 100 * TOL, name


@pytest.mark.parametrize("in_shape", [ONE_D, TWO_D], ids=["1d", "2d"])
def test_pool_routes_ties_to_the_first_maximum_as_torch_does(in_shape):
    """With conv0's weights zero every window of its output (and most of conv1's) is a tie; torch
    sends the gradient to the first maximum in row-major window order. Routing it anywhere else
    (the last maximum, all of them) changes which inputs meet the error, so the weights differ."""
    model = make_cnn(in_shape, "relu", seed=2)
    with torch.no_grad():
        model.convs[0][0].weight.zero_()
        model.convs[0][0].bias.fill_(0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.0)
    device = DeviceSteps(cnn_topology(model), cnn_weights(model), cnn_feedback(model), 0.0)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(7, math.prod(in_shape))).astype(np.float32)
    y = rng.integers(0, CLASSES, size=7)
    with torch.no_grad():                        # the case is real: conv0's windows all tie
        z = model.convs[0][1](model.convs[0][0](model.prepare(torch.from_numpy(x))))
    assert torch.all(z == 0.5)
    device.step(x, y, 1.0)
    host_step(model, optimizer, x, y)
    host = cnn_weights(model)
    assert float(np.abs(host["conv0.weight"]).max()) > 1e-3          # the tied stage did learn
    worst = max(float(np.abs(host[k] - device.state[k]).max()) for k in host)
    assert worst <= TOL, f"max abs difference {worst:.3g}"


@pytest.mark.parametrize("in_shape, first_stage", [(ONE_D, 0), (TWO_D, 0), (TWO_D, 1)],
                         ids=["1d", "2d", "2d-from-conv1"])
def test_infer_graph_matches_the_host_forward(in_shape, first_stage):
    model = make_cnn(in_shape, "tanh", seed=4)
    topo = cnn_topology(model, first_stage)
    sess = session(infer_graph(topo))
    x = np.random.default_rng(5).normal(size=(33, math.prod(in_shape))).astype(np.float32)
    got = sess.run(["logits"], {"x": frozen_features(model, x, first_stage), **cnn_weights(model, first_stage)})[0]
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert got.shape == expected.shape
    assert float(np.abs(got - expected).max()) <= TOL


# --- strides and paddings the host CNN does not use: a functional torch DFA step ---------------

def reference_dfa_step(topo: dict, weights: dict, feedback: dict, x: np.ndarray, y: np.ndarray, lr: float):
    """Plain torch DFA (momentum 0): every conv stage's input detached, e B_i fed in at its output
    (after the pool), the rest autograd; returns the new weights."""
    act = {"relu": torch.relu, "tanh": torch.tanh}[topo["activation"]]
    w = {k: torch.tensor(v, requires_grad=True) for k, v in weights.items()}
    h, outputs = torch.from_numpy(x).reshape(-1, *topo["in_shape"]), []
    for conv in topo["convs"]:
        dims, name = len(conv["in_spatial"]), conv["name"]
        conv_fn, pool_fn = (F.conv1d, F.max_pool1d) if dims == 1 else (F.conv2d, F.max_pool2d)
        z = act(conv_fn(h.detach(), w[f"{name}.weight"], w[f"{name}.bias"], conv["stride"], conv["padding"]))
        h = pool_fn(z, 2) if conv["pool"] == 2 else z
        outputs.append((name, h))
    fc = act(F.linear(h.detach().flatten(1), w["fc.weight"], w["fc.bias"]))
    outputs.append(("fc", fc))
    logits = F.linear(fc.detach(), w["head.weight"], w["head.bias"])
    logits.retain_grad()
    F.cross_entropy(logits, torch.from_numpy(y)).backward()
    e = logits.grad
    for name, out in outputs:
        out.backward((e @ torch.from_numpy(feedback[name])).reshape(out.shape))
    return {k: (v - lr * v.grad).detach().numpy() for k, v in w.items()}


def hand_topology(in_shape: list[int], kernel: int, stride: int, padding: int) -> dict:
    channels, spatial, convs = in_shape[0], in_shape[1:], []
    for i, out in enumerate((3, 4)):
        conv = {"name": f"conv{i}", "in_channels": channels, "out_channels": out, "kernel": kernel,
                "stride": stride, "padding": padding, "pool": 2, "in_spatial": spatial}
        conv["out_spatial"] = [s // 2 for s in conv_spatial(conv)]
        convs.append(conv)
        channels, spatial = out, conv["out_spatial"]
    flat = channels * math.prod(spatial)
    return {"kind": "cnn", "in_features": math.prod(in_shape), "n_classes": CLASSES, "activation": "relu",
            "in_shape": in_shape, "convs": convs,
            "layers": [{"name": "fc", "in": flat, "out": 6}, {"name": "head", "in": 6, "out": CLASSES}]}


@pytest.mark.parametrize("in_shape, kernel, stride, padding", [([2, 46], 5, 2, 2), ([2, 22, 21], 3, 2, 0)],
                         ids=["1d-k5-s2-p2", "2d-k3-s2-p0"])
def test_strided_unpadded_convs_match_a_functional_torch_dfa_step(in_shape, kernel, stride, padding):
    topo = hand_topology(in_shape, kernel, stride, padding)
    rng = np.random.default_rng(6)
    weights = {k: (rng.normal(size=s) * 0.4).astype(np.float32) for k, s in param_shapes(topo).items()}
    feedback = {k: rng.normal(size=s).astype(np.float32) for k, s in feedback_shapes(topo).items()}
    device = DeviceSteps(topo, weights, feedback, 0.0)
    x = rng.normal(size=(7, math.prod(in_shape))).astype(np.float32)
    y = rng.integers(0, CLASSES, size=7)
    out = device.step(x, y, LR)
    check_bounds(weights, device, out["update_bound"])
    expected = reference_dfa_step(topo, weights, feedback, x, y, LR)
    worst = max(float(np.abs(expected[k] - device.state[k]).max()) for k in expected)
    assert worst <= TOL, f"max abs difference {worst:.3g}"
    assert float(np.abs(expected["conv0.weight"] - weights["conv0.weight"]).max()) > 100 * TOL


# --- the naming contract and the manifest check ---------------------------------------------

def test_naming_contract_of_a_part_cut_above_conv0():
    model = make_cnn(TWO_D, width=3)
    topo = cnn_topology(model, first_stage=1)
    assert topo["in_shape"] == [3, 4, 3] and topo["in_features"] == 36
    assert [c["name"] for c in topo["convs"]] == ["conv1", "conv2"]
    assert [(c["pool"], c["out_spatial"]) for c in topo["convs"]] == [(2, [2, 1]), (1, [2, 1])]
    assert layer_names(topo) == ["conv1", "conv2", "fc", "head"]
    assert trainable_units(topo) == [["head"], ["fc"], ["conv2"], ["conv1"]]
    assert param_shapes(topo)["conv1.weight"] == (6, 3, 3, 3)
    assert set(cnn_weights(model, 1)) == set(param_shapes(topo))
    assert feedback_shapes(topo) == {"conv1": (CLASSES, 12), "conv2": (CLASSES, 24), "fc": (CLASSES, 24)}
    assert {k: v.shape for k, v in cnn_feedback(model, 1).items()} == feedback_shapes(topo)
    np.testing.assert_array_equal(cnn_feedback(model, 1)["conv1"], model.feedback_conv1.numpy())
    assert describe_model(topo) == "cnn 3x4x3 -> conv1 6x2x1 -> conv2 12x2x1 -> 24 -> 5  (relu)"
    with pytest.raises(EdgefaError, match="first_stage 3 is not a conv stage of this cnn"):
        cnn_topology(model, first_stage=3)


def test_feedback_of_a_non_dfa_run_is_the_dfa_twin_s():
    """A bp run's part gets the B a dfa run of the same seed trained with; drawing them leaves the
    global RNG where it was."""
    bp = make_cnn(ONE_D, rule="bp", seed=1)
    before = torch.get_rng_state()
    drawn = cnn_feedback(bp)
    assert torch.equal(before, torch.get_rng_state())
    dfa = make_cnn(ONE_D, rule="dfa", seed=1)
    for name, b in drawn.items():
        np.testing.assert_array_equal(b, getattr(dfa, f"feedback_{name}").numpy())


def _manifest(topo: dict) -> dict:
    return {"files": {}, "model": topo, "optimizer": {"lr": 0.1, "momentum": 0.9},
            "input": {"standardize": {"mean": 0.0, "std": 1.0}}, "feedback": {}}


def test_manifest_check_accepts_a_cnn_and_refuses_a_broken_chain_in_one_line():
    topo = cnn_topology(make_cnn(TWO_D))
    check_manifest(_manifest(topo), "m")
    broken = dict(topo, convs=[dict(topo["convs"][0], out_spatial=[5, 3]), *topo["convs"][1:]])
    with pytest.raises(BundleError, match=r"^m: cnn conv conv0: out_spatial \[5, 3\] is not its conv and pool"):
        check_manifest(_manifest(broken), "m")
    skipped = dict(topo, convs=[topo["convs"][0], topo["convs"][2]])
    with pytest.raises(BundleError, match="cnn conv conv2 does not take the previous stage's output"):
        check_manifest(_manifest(skipped), "m")
