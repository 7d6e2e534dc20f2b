"""A cnn's conv stages inside the hand-built ONNX graphs: the forward pass and their DFA step.

onnx_graphs.py builds the graphs and calls in here for the layers named in model["convs"]; the
Linear layers after them (fc, head) are an MLP's. Conv stage i, on h_in [N, C, *in_spatial]:

    forward   a = Conv(h_in; W, b, stride, padding),  z = f(a),  out = MaxPool2(z)
              (pool only where the topology says pool 2; floor mode: an odd last row or column
              is never pooled, as in torch)
    local     g_out = e B_i reshaped to [N, O, *out_spatial]       (B_i: the stage output, C-major)
              g_z   = g_out routed through the pool to the FIRST maximum of each window in
                      row-major order, the one torch's max-pool picks on ties; zero elsewhere
              delta = g_z * f'(a)                                  [N, O, *conv_spatial]
    gradient  dW[o, c, k] = sum_{n, p} delta[n, o, p] h_in_padded[n, c, p * stride + k]
                          = delta^T [O, N P] @ patches [N P, k^dims C]    (im2col: Slices, one MatMul)
              db[o] = sum_{n, p} delta[n, o, p]
    bound     ||delta||_F * sqrt(||h_in||_F^2 + N * P), P = prod(conv_spatial)  (see `update`)

The pool routing uses standard ops only (no MaxPool `Indices` output, MaxUnpool or Scatter, which
TensorRT's parser lacks or restricts): the windows are laid out on a last axis, ArgMax (first
index on ties, select_last_index 0) picks the maximum, OneHot makes the mask.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from onnx import TensorProto

from ..bundle import conv_spatial, feedback_input_name, grad_name, momentum_name, next_name
from .graph_builder import Forward, Graph, activation_derivative, apply_activation


@dataclass
class ConvStage:
    """What a conv stage's step needs from the forward pass (graph tensor names)."""
    conv: dict            # its entry in model["convs"]
    h_in: str             # its input [N, C, *in_spatial]
    a: str                # the convolution's output, before the activation
    z: str                # f(a), what the pool reads
    cdf: str | None       # gelu only: Phi(a), which f' reuses


def _ints(g: Graph, values: list[int]) -> str:
    """An int64 constant named by its values, so equal ones are stored once and different ones
    never share a name."""
    name = "ints_" + "_".join(str(v).replace("-", "m") for v in values)
    return g.const(name, list(values), TensorProto.INT64, (len(values),))


def _dims(conv: dict) -> int:
    return len(conv["in_spatial"])


def forward_convs(g: Graph, model: dict, x: str, fwd: Forward) -> str:
    """The conv stages on x [N, in_features]; records each in fwd.convs and fwd.inputs and returns
    the last stage's output flattened C-major, [N, O * prod(out_spatial)] (torch's Flatten)."""
    h = g.op("Reshape", x, _ints(g, [-1, *model["in_shape"]]))
    for conv in model["convs"]:
        name, dims, pad = conv["name"], _dims(conv), conv["padding"]
        a = g.op("Conv", h, f"{name}.weight", f"{name}.bias", kernel_shape=[conv["kernel"]] * dims,
                 strides=[conv["stride"]] * dims, pads=[pad] * (2 * dims))
        z, cdf = apply_activation(g, model["activation"], a)
        fwd.inputs[name] = h
        fwd.convs[name] = ConvStage(conv, h, a, z, cdf)
        h = g.op("MaxPool", z, kernel_shape=[2] * dims, strides=[2] * dims) if conv["pool"] == 2 else z
    return g.op("Flatten", h, axis=1)


def _route_through_pool(g: Graph, stage: ConvStage, g_out: str) -> str:
    """dLoss/dz from dLoss/d(pool output): each window's gradient goes to its first maximum."""
    conv = stage.conv
    dims, channels, pooled = _dims(conv), conv["out_channels"], conv["out_spatial"]
    full, even = conv_spatial(conv), [2 * p for p in conv["out_spatial"]]
    axes = list(range(2, dims + 2))
    z = stage.z
    if even != full:   # floor mode: the odd last row / column is in no window
        z = g.op("Slice", z, _ints(g, [0] * dims), _ints(g, even), _ints(g, axes))
    # windows on a last axis of 2^dims, in row-major window order (dh, dw) like torch's scan
    split = [-1, channels, *[d for p in pooled for d in (p, 2)]]              # [N, O, P0, 2(, P1, 2)]
    interleave = [0, 1, 2, 4, 3, 5] if dims == 2 else None                     # its own inverse
    windows = g.op("Reshape", z, _ints(g, split))
    if interleave:
        windows = g.op("Reshape", g.op("Transpose", windows, perm=interleave),
                       _ints(g, [-1, channels, *pooled, 2 ** dims]))
    first_max = g.op("ArgMax", windows, axis=-1, keepdims=0, select_last_index=0)
    mask = g.op("OneHot", first_max, g.const(f"window_{2 ** dims}", 2 ** dims, TensorProto.INT64),
                g.const("onehot_values", [0.0, 1.0], dims=(2,)), axis=-1)
    routed = g.op("Mul", mask, g.op("Unsqueeze", g_out, _ints(g, [-1])))
    if interleave:
        routed = g.op("Transpose", g.op("Reshape", routed, _ints(g, [-1, channels, *pooled, 2, 2])),
                      perm=interleave)
    routed = g.op("Reshape", routed, _ints(g, [-1, channels, *even]))
    if even != full:   # the unpooled edge gets no gradient
        routed = g.op("Pad", routed, _ints(g, [0] * (dims + 2) + [0, 0] + [f - e for f, e in zip(full, even)]))
    return routed


def local_error(g: Graph, model: dict, stage: ConvStage, e: str) -> str:
    """delta = dLoss/da of one conv stage under DFA: e B at its output, back through its pool and
    activation (its own local gradient). [N, O, *conv_spatial]."""
    conv = stage.conv
    projected = g.op("MatMul", e, feedback_input_name(conv["name"]))
    g_out = g.op("Reshape", projected, _ints(g, [-1, conv["out_channels"], *conv["out_spatial"]]))
    g_z = _route_through_pool(g, stage, g_out) if conv["pool"] == 2 else g_out
    return g.op("Mul", g_z, activation_derivative(g, model["activation"], stage.z, stage.a, stage.cdf))


def _weight_grad(g: Graph, stage: ConvStage, delta: str) -> str:
    """dW [O, C, k(, k)] as one matrix product over batch and positions (im2col):

        patches [N * P, K * C]  row (n, p): the input window the conv read at output position p,
                                channels-last, tap-major (K = k^dims taps in W's row-major order)
        dW = delta^T patches    delta^T [O, N * P]  ->  [O, K * C]  ->  [O, C, k(, k)]

    A Conv of the input with the error (batch and channels swapped) computes the same with fewer
    nodes and ran no faster in onnxruntime here, but its channel count is the batch: TensorRT
    needs a convolution's channels fixed at build time, and the batch is dynamic."""
    conv = stage.conv
    dims, k, stride, pad = _dims(conv), conv["kernel"], conv["stride"], conv["padding"]
    positions, channels, out = conv_spatial(conv), conv["in_channels"], conv["out_channels"]
    x = stage.h_in
    if pad:
        x = g.op("Pad", x, _ints(g, [0, 0, *[pad] * dims] * 2))
    x = g.op("Transpose", x, perm=[0, *range(2, dims + 2), 1])                  # [N, *padded, C]
    taps = []
    for offset in itertools.product(range(k), repeat=dims):                   # (kh, kw) row-major
        ends = [o + stride * (p - 1) + 1 for o, p in zip(offset, positions)]
        taps.append(g.op("Slice", x, _ints(g, list(offset)), _ints(g, ends), _ints(g, list(range(1, dims + 1))),
                         _ints(g, [stride] * dims)))                           # [N, *positions, C]
    patches = g.op("Reshape", g.op("Concat", *taps, axis=-1), _ints(g, [-1, k ** dims * channels]))
    delta_t = g.op("Reshape", g.op("Transpose", delta, perm=[1, 0, *range(2, dims + 2)]), _ints(g, [out, -1]))
    grad = g.op("Reshape", g.op("MatMul", delta_t, patches), _ints(g, [out, k ** dims, channels]))
    return g.op("Reshape", g.op("Transpose", grad, perm=[0, 2, 1]), _ints(g, [out, channels, *[k] * dims]))


def update(g: Graph, stage: ConvStage, delta: str, momentum: float, rows: str, factors: bool = False) -> str:
    """SGD (torch semantics, as onnx_graphs._updates) on one conv layer; returns its update bound [1].
    `factors` (the step-factors graph): no update; the gradients go out as grad.<param> instead.

    Bound: every dW[o, c, k] = sum_{n, p} delta[n, o, p] x[n, c, p s + k - pad] pairs each delta
    element with a distinct input element (or a padding zero), so by Cauchy-Schwarz
    |dW| <= ||delta||_F ||h_in||_F; |db[o]| = |sum_{n, p} delta[n, o, p]| <= ||delta||_F sqrt(N P),
    P = prod(conv_spatial). Both are <= ||delta||_F * sqrt(||h_in||_F^2 + N P), `rows` being N."""
    conv = stage.conv
    name, dims = conv["name"], _dims(conv)
    grads = {f"{name}.weight": _weight_grad(g, stage, delta),
             f"{name}.bias": g.op("ReduceSum", delta, _ints(g, [0, *range(2, dims + 2)]), keepdims=0)}
    for param, grad in grads.items():
        if factors:
            g.op("Identity", grad, out=grad_name(param))
            g.output(grad_name(param), [conv["out_channels"], *([None] * (dims + 1))] if param.endswith(".weight")
                     else [conv["out_channels"]])
        elif momentum:
            v = g.op("Add", grad, g.op("Mul", momentum_name(param), g.const("mu", float(momentum))),
                     out=next_name(momentum_name(param)))
            g.op("Sub", param, g.op("Mul", v, "lr"), out=next_name(param))
        else:   # lr is already folded into e, so into delta
            g.op("Sub", param, grad, out=next_name(param))
    positions = g.const(f"positions_{name}", float(math.prod(conv_spatial(conv))))
    squares = g.op("Mul", g.op("ReduceSumSquare", delta, keepdims=0),
                   g.op("Add", g.op("ReduceSumSquare", stage.h_in, keepdims=0), g.op("Mul", rows, positions)))
    return g.op("Unsqueeze", g.op("Sqrt", squares), _ints(g, [0]))
