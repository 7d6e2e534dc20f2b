"""The exported graphs are valid, standard ONNX with a dynamic batch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgefa.bundle import param_shapes, read_bundle
from edgefa.exporters.onnx_graphs import OPSET


@pytest.mark.parametrize("graph", ["infer", "train_step"])
def test_graph_passes_full_check_and_uses_standard_ops(tiny_bundle, graph):
    model = onnx.load(str(tiny_bundle / f"{graph}.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)]
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    schema_ops = {s.name for s in onnx.defs.get_all_schemas() if s.domain == ""}
    assert {node.op_type for node in model.graph.node} <= schema_ops
    assert not model.graph.initializer or all(i.name not in param_shapes(read_bundle(tiny_bundle).model)
                                              for i in model.graph.initializer)  # weights are inputs


def test_train_step_signature(tiny_bundle):
    bundle = read_bundle(tiny_bundle)
    sess = ort.InferenceSession(str(tiny_bundle / "train_step.onnx"), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    outputs = [o.name for o in sess.get_outputs()]
    params = list(param_shapes(bundle.model))
    assert {"x", "labels", "lr", *params, *(f"{p}.momentum" for p in params)} <= set(inputs)
    assert {f"feedback.{n}" for n in bundle.feedback} <= set(inputs)
    assert outputs[-2:] == ["loss", "logits"]
    assert {f"{p}.next" for p in params} | {f"{p}.momentum.next" for p in params} <= set(outputs)
    assert inputs["x"].shape[0] == "batch" and inputs["labels"].type == "tensor(int64)"


@pytest.mark.parametrize("batch", [1, 3, 50])
def test_graphs_run_at_any_batch_size(tiny_bundle, batch):
    bundle = read_bundle(tiny_bundle)
    sess = ort.InferenceSession(str(tiny_bundle / "train_step.onnx"), providers=["CPUExecutionProvider"])
    feeds = dict(bundle.weights)
    feeds.update({f"{k}.momentum": np.zeros_like(v) for k, v in bundle.weights.items()})
    feeds.update({f"feedback.{k}": v for k, v in bundle.feedback.items()})
    rng = np.random.default_rng(batch)
    feeds.update(x=rng.normal(size=(batch, bundle.model["in_features"])).astype(np.float32),
                 labels=rng.integers(0, 10, batch), lr=np.array(0.01, np.float32))
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    assert out["logits"].shape == (batch, bundle.model["n_classes"])
    assert np.isfinite(out["loss"]) and out["loss"].shape == ()
