"""What one sample costs a forward ONNX graph: FLOPs and activation floats, counted at export.

The device has no `onnx` package to read a graph with, so a frozen trunk's cost per sample is
counted here on the host and written into the manifest (model.trunk.flops_per_sample,
activations_per_sample), where `edgefa budget` reads it (device_profiles/budget.py).

    Conv            2 x output elements x (input channels / group) x kernel elements
    Gemm, MatMul    2 x output elements x the reduced dimension
    anything else   1 per output element (activations, pooling, normalization, reshapes)

Shapes come from onnx's shape inference on the graph with its batch set to 1. The activation
count is every float a node writes (an upper bound: onnxruntime reuses buffers).
"""

from __future__ import annotations

import math

import onnx
from onnx import shape_inference

MATRIX_OPS = ("Gemm", "MatMul")


def per_sample_cost(model: onnx.ModelProto) -> tuple[int, int] | None:
    """(FLOPs, activation floats) of one sample through `model`, or None where shape inference
    cannot give every shape (a graph of the user's with dynamic inner dimensions)."""
    one = onnx.ModelProto()
    one.CopyFrom(model)
    for value in one.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = 1
    try:
        inferred = shape_inference.infer_shapes(one, data_prop=True)
    except Exception:           # a graph onnx cannot infer: its cost stays unknown, never a failed export
        return None
    g = inferred.graph
    shapes = {v.name: _dims(v) for v in [*g.input, *g.value_info, *g.output]}
    shapes.update({t.name: list(t.dims) for t in g.initializer})
    flops = activations = 0
    for node in g.node:
        out = shapes.get(node.output[0]) if node.output else None
        if out is None or any(d is None for d in out):
            return None
        elements = math.prod(out)
        activations += elements
        if node.op_type == "Conv":
            weight = shapes.get(node.input[1])
            if weight is None or any(d is None for d in weight):
                return None
            flops += 2 * elements * math.prod(weight[1:])      # weight [O, C/group, k...]
        elif node.op_type in MATRIX_OPS:
            a = shapes.get(node.input[0])
            if a is None or a[-1] is None:
                return None
            transposed = node.op_type == "Gemm" and any(at.name == "transA" and at.i for at in node.attribute)
            flops += 2 * elements * (a[0] if transposed else a[-1])
        else:
            flops += elements
    return flops, activations


def _dims(value: onnx.ValueInfoProto) -> list[int | None] | None:
    t = value.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
