"""The forward pass and one whole DFA training step as plain ONNX graphs (standard ops only).

A DFA step is an ordinary forward graph, which is the point of edgefa:

    forward   a_l = h_{l-1} W_l^T + b_l,  h_l = f(a_l),  logits = h_L W_head^T + b_head
    loss      mean cross-entropy;   e = (softmax(logits) - onehot(labels)) / batch
    local     delta_l = (e B_l) * f'(a_l)          (no W^T, no sequential backward)
    bound     ||delta_l||_F * sqrt(||h_{l-1}||_F^2 + batch) per layer: caps every update element
    momentum  v <- mu v + delta_l^T h_{l-1}         (one Gemm: delta^T h with C = v, beta = mu)
    update    W <- W - lr v                         (torch.optim.SGD semantics, dampening 0)

Without momentum the learning rate scales the small [batch, width] deltas, so the update is
W - delta^T h: one Gemm and one Sub, with no weight-sized multiply.

The residual MLP (kind "resmlp") does block-level DFA: the readout (terminal LayerNorm + head)
gets its true gradient, the embedding e B_embed, and each block, its input a constant, e B_block
at its output, backpropagated locally through fc2, the activation, fc1 and its LayerNorm's gamma
and beta. A run's residual-stream penalty lambda (manifest optimizer.residual_penalty) adds
lambda sum_i mean_n ||r_i||^2 to the loss and its gradient 2 lambda r_i / batch to block i's error
at its output (r_i = fc2(...), the block's residual branch; under DFA the penalty acts inside each
block only). Only the trainable layers (bundle.trainable_layers) get updates; a Bradley-Terry step
(preference_step_graph) runs both items of every pair through one forward of 2 x batch rows.

A cnn (kind "cnn") is its conv stages, each DFA-trained on e B at its output and its own local
gradient through pool, activation and conv (conv_graphs.py), then an MLP's Linear layers.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from . import conv_graphs
from .graph_builder import (OPSET, BATCH, Forward, Graph, activation_derivative,  # noqa: F401 (OPSET: re-exported)
                            apply_activation)
from ..bundle import (DELTA, INPUT, LOSS_BRADLEY_TERRY, LOSS_CROSS_ENTROPY, feedback_input_name, feedback_shapes,
                      grad_name, model_kind, momentum_name, next_name, param_shapes, trainable_layers,
                      trainable_params)


def _layer_norm(g: Graph, x: str, layer: str, eps: float, fused: bool) -> tuple[str, str | None]:
    """LayerNorm over the last axis (biased variance, like torch). `fused`: one
    LayerNormalization op (inference); otherwise written out, returning x-hat for the update."""
    gamma, beta = f"{layer}.weight", f"{layer}.bias"
    if fused:
        return g.op("LayerNormalization", x, gamma, beta, axis=-1, epsilon=float(eps)), None
    centred = g.op("Sub", x, g.op("ReduceMean", x, axes=[-1], keepdims=1))
    var = g.op("ReduceMean", g.op("Mul", centred, centred), axes=[-1], keepdims=1)
    xhat = g.op("Div", centred, g.op("Sqrt", g.op("Add", var, g.const(f"eps_{eps!r}", float(eps)))))
    return g.op("Add", g.op("Mul", xhat, gamma), beta), xhat


def _linear(g: Graph, h: str, layer: str) -> str:
    return g.op("Gemm", h, f"{layer}.weight", f"{layer}.bias", transB=1)


def _forward(g: Graph, model: dict, x: str, train: bool = False) -> Forward:
    if model_kind(model) == "resmlp":
        return _forward_resmlp(g, model, x, train)
    fwd, h = Forward(""), x
    if model_kind(model) == "cnn":     # its conv stages (conv_graphs.py), then the Linear layers below
        h = conv_graphs.forward_convs(g, model, x, fwd)
    layers = model["layers"]
    for layer in layers:
        name = layer["name"]
        fwd.inputs[name] = h
        a = _linear(g, h, name)
        if layer is layers[-1]:
            fwd.logits = g.op("Identity", a, out="logits")
            return fwd
        h, cdf = apply_activation(g, model["activation"], a)
        fwd.hidden[name] = h
        if cdf:                        # gelu's derivative needs a and Phi(a) (a cnn's fc)
            fwd.gelu[name] = (a, cdf)
    raise AssertionError("unreachable: the head is the last layer")


def _forward_resmlp(g: Graph, model: dict, x: str, train: bool) -> Forward:
    """h0 = embed(x); h_{i+1} = h_i + fc2(act(fc1(LN_i(h_i)))); logits = head(LN(h_L))."""
    fwd, eps = Forward(""), model["ln_eps"]
    fwd.inputs["embed"] = x
    h = _linear(g, x, "embed")
    for i in range(model["depth"]):
        norm, fc1, fc2 = f"blocks.{i}.norm", f"blocks.{i}.fc1", f"blocks.{i}.fc2"
        n, fwd.inputs[norm] = _layer_norm(g, h, norm, eps, fused=not train)
        fwd.inputs[fc1] = n
        u = _linear(g, n, fc1)
        z, cdf = apply_activation(g, model["activation"], u)
        fwd.inputs[fc2] = z
        fwd.hidden[i] = (u, z, cdf)
        fwd.residual[i] = _linear(g, z, fc2)
        h = g.op("Add", h, fwd.residual[i])
    n, fwd.inputs["norm"] = _layer_norm(g, h, "norm", eps, fused=not train)
    fwd.inputs["head"] = n
    fwd.logits = g.op("Identity", _linear(g, n, "head"), out="logits")
    return fwd


def _declare_params(g: Graph, model: dict) -> None:
    for name, shape in param_shapes(model).items():
        g.input(name, shape)


def infer_graph(model: dict) -> onnx.ModelProto:
    g = Graph()
    g.input("x", [BATCH, model["in_features"]])
    _declare_params(g, model)
    _forward(g, model, "x")
    g.output("logits", [BATCH, model["n_classes"]])
    return g.model("edgefa_infer", "edgefa forward pass: x, weights -> logits")


def refittable_infer_graph(model: dict, weights: dict[str, np.ndarray],
                           infer: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """infer_graph (or `infer`, the whole graph of a bundle with a trunk) with every parameter an
    initializer (holding `weights`) instead of an input:
    the graph TensorRT builds a refittable inference engine from. Constant weights let TensorRT
    fold and fuse them (and store them in FP16); refitting swaps in the trained values by these
    initializer names, so new weights never mean a new engine."""
    m = infer_graph(model) if infer is None else onnx.ModelProto.FromString(infer.SerializeToString())
    params = param_shapes(model)
    kept = [i for i in m.graph.input if i.name not in params]
    del m.graph.input[:]
    m.graph.input.extend(kept)
    m.graph.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(weights[n], dtype=np.float32), n)
                               for n in params)
    m.doc_string = "edgefa forward pass with the weights as initializers (refittable in TensorRT): x -> logits"
    return m


def _local_errors(g: Graph, model: dict, fwd: Forward, e: str, trained: list[str],
                  penalty_scale: str | None = None) -> dict[str, str]:
    """Per trainable layer, dLoss/d(its output) under DFA: the readout's true gradient, e @ B at
    every other stage's output, and inside a residual block the block's own local backward.
    `penalty_scale` (resmlp with a residual-stream penalty): 2 lambda / batch (times lr where e
    carries it), so that each block's error at its output also gets d(lambda mean_n ||r||^2)/dr."""
    activation, deltas, want = model["activation"], {}, set(trained)
    if model_kind(model) != "resmlp":
        for name in trained:
            if name == model["layers"][-1]["name"]:
                deltas[name] = e
            elif name in fwd.convs:    # a cnn conv stage: e B back through its pool and activation
                deltas[name] = conv_graphs.local_error(g, model, fwd.convs[name], e)
            else:
                projected = g.op("MatMul", e, feedback_input_name(name))
                deltas[name] = g.op("Mul", projected,
                                    activation_derivative(g, activation, fwd.hidden[name], *fwd.gelu.get(name, ())))
        return deltas
    if "head" in want:                                   # the readout: its true gradient
        deltas["head"] = e
        deltas["norm"] = g.op("MatMul", e, "head.weight")
    if "embed" in want:
        deltas["embed"] = g.op("MatMul", e, feedback_input_name("embed"))
    for i in range(model["depth"]):
        norm, fc1, fc2 = f"blocks.{i}.norm", f"blocks.{i}.fc1", f"blocks.{i}.fc2"
        if fc2 not in want:
            continue
        u, z, cdf = fwd.hidden[i]
        deltas[fc2] = g.op("MatMul", e, feedback_input_name(f"block{i}"))     # dLoss/d(block output)
        if penalty_scale:                      # + the penalty's own gradient, local to the block
            deltas[fc2] = g.op("Add", deltas[fc2], g.op("Mul", fwd.residual[i], penalty_scale))
        du = g.op("Mul", g.op("MatMul", deltas[fc2], f"{fc2}.weight"), activation_derivative(g, activation, z, u, cdf))
        deltas[fc1] = du
        deltas[norm] = g.op("MatMul", du, f"{fc1}.weight")                    # dLoss/d(LN output)
    return deltas


def _is_norm(model: dict, layer: str) -> bool:
    return model_kind(model) == "resmlp" and (layer == "norm" or layer.endswith(".norm"))


def _updates(g: Graph, model: dict, fwd: Forward, deltas: dict[str, str], trained: list[str],
             momentum: float, rows: str, factors: bool = False) -> None:
    """SGD (with momentum) on every trainable layer, and the per-layer update bounds.

    A linear layer's gradient is delta^T h_in (one Gemm); a LayerNorm's gamma gets
    sum_batch(delta * x-hat) and its beta sum_batch(delta). Both are bounded elementwise by
    ||delta||_F * sqrt(||input||_F^2 + rows) (Cauchy-Schwarz), `rows` the number of samples.

    `factors` (the step-factors graph): no update at all; the gradients go out instead, a linear
    weight's as its two small factors delta [rows, out] and h_in [rows, in] (bundle.grad_name), so
    the runtime can apply the update in place once the bounds prove the step finite."""
    axis0 = g.const("axis0", [0], TensorProto.INT64, (1,))
    bounds = []
    for name in trained:
        d, h_in = deltas[name], fwd.inputs[name]
        if name in fwd.convs:          # a cnn conv layer: its gradient, update and bound
            bounds.append(conv_graphs.update(g, fwd.convs[name], d, momentum, rows, factors))
            continue
        w, b = f"{name}.weight", f"{name}.bias"
        norm = _is_norm(model, name)
        if factors:
            shape = param_shapes(model)[w]
            if norm:
                g.op("ReduceSum", g.op("Mul", d, h_in), axis0, keepdims=0, out=grad_name(w))
                g.output(grad_name(w), shape)
            else:
                g.op("Identity", d, out=grad_name(w, DELTA))
                g.op("Identity", h_in, out=grad_name(w, INPUT))
                g.output(grad_name(w, DELTA), [None, shape[0]])
                g.output(grad_name(w, INPUT), [None, shape[1]])
            g.op("ReduceSum", d, axis0, keepdims=0, out=grad_name(b))
            g.output(grad_name(b), [shape[0]])
        elif momentum:
            if norm:
                vw = g.op("Add", g.op("ReduceSum", g.op("Mul", d, h_in), axis0, keepdims=0),
                          g.op("Mul", momentum_name(w), g.const("mu", float(momentum))),
                          out=next_name(momentum_name(w)))
            else:
                vw = g.op("Gemm", d, h_in, momentum_name(w), transA=1, alpha=1.0, beta=float(momentum),
                          out=next_name(momentum_name(w)))
            g.op("Sub", w, g.op("Mul", vw, "lr"), out=next_name(w))
            vb = g.op("Add", g.op("ReduceSum", d, axis0, keepdims=0),
                      g.op("Mul", momentum_name(b), g.const("mu", float(momentum))),
                      out=next_name(momentum_name(b)))
            g.op("Sub", b, g.op("Mul", vb, "lr"), out=next_name(b))
        else:
            # Sub(W, delta^T h) measured 9% faster per step than one Gemm with C = W in ORT's CPU EP.
            grad = (g.op("ReduceSum", g.op("Mul", d, h_in), axis0, keepdims=0) if norm
                    else g.op("Gemm", d, h_in, transA=1))
            g.op("Sub", w, grad, out=next_name(w))
            g.op("Sub", b, g.op("ReduceSum", d, axis0, keepdims=0), out=next_name(b))
        # |every element of delta^T h and of sum_batch(delta)| <= ||delta||_F * sqrt(||h||_F^2 + batch)
        # (Cauchy-Schwarz). The runtime turns these into overflow bounds on the new weights, so it
        # can prove them finite without reading them again (see runtime/engine.py).
        squares = g.op("Mul", g.op("ReduceSumSquare", d, keepdims=0),
                       g.op("Add", g.op("ReduceSumSquare", h_in, keepdims=0), rows))
        bounds.append(g.op("Unsqueeze", g.op("Sqrt", squares), axis0))
    g.op("Concat", *bounds, axis=0, out="update_bound")


def _batch_size(g: Graph, x: str) -> str:
    return g.op("Cast", g.op("Gather", g.op("Shape", x), g.const("zero", 0, TensorProto.INT64), axis=0),
                to=TensorProto.FLOAT)


def _declare_state(g: Graph, model: dict, momentum: float, factors: bool = False) -> None:
    _declare_params(g, model)
    if momentum and not factors:       # the step-factors graph never reads the momentum
        for name, shape in trainable_params(model).items():
            g.input(momentum_name(name), shape)
    for layer, shape in feedback_shapes(model).items():
        g.input(feedback_input_name(layer), shape)


def _declare_next(g: Graph, model: dict, momentum: float, factors: bool = False) -> None:
    for name, shape in ({} if factors else trainable_params(model)).items():
        g.output(next_name(name), shape)
        if momentum:
            g.output(next_name(momentum_name(name)), shape)
    g.output("update_bound", [len(trainable_layers(model))])


def train_step_graph(model: dict, momentum: float, loss: str = LOSS_CROSS_ENTROPY,
                     penalty: float = 0.0, factors: bool = False) -> onnx.ModelProto:
    """One DFA step of `model` (only its trainable layers, see bundle.trainable_layers).
    `factors`: the step-factors graph instead (see _updates): the same step up to its gradients,
    which it returns in place of the next weights and momentum.
    `penalty`: lambda of a resmlp's residual-stream penalty (models/feedback_net.py): the loss adds
    lambda * sum_blocks mean_n ||r_i||^2 (r_i = fc2(...), each block's residual branch), and each
    trained block's error at its output adds that term's own gradient 2 lambda r_i / batch."""
    if penalty and model_kind(model) != "resmlp":
        raise ValueError("a residual-stream penalty needs residual blocks (a resmlp model)")
    if loss == LOSS_BRADLEY_TERRY:
        return preference_step_graph(model, momentum, factors)
    g = Graph()
    classes = model["n_classes"]
    g.input("x", [BATCH, model["in_features"]])
    g.input("labels", [BATCH], TensorProto.INT64)
    g.input("lr", [])
    _declare_state(g, model, momentum, factors)

    fwd = _forward(g, model, "x", train=True)

    # loss and output error e = (softmax - onehot) / batch
    logp = g.op("LogSoftmax", fwd.logits, axis=1)
    onehot = g.op("OneHot", "labels", g.const("depth", classes, TensorProto.INT64),
                  g.const("onehot_values", [0.0, 1.0], dims=(2,)), axis=-1)
    nll = g.op("Neg", g.op("ReduceSum", g.op("Mul", onehot, logp), g.const("axis1", [1], TensorProto.INT64, (1,)),
                           keepdims=0))
    cross_entropy = g.op("ReduceMean", nll, out=None if penalty else "loss", keepdims=0)
    batch = _batch_size(g, "x")
    e = g.op("Div", g.op("Sub", g.op("Exp", logp), onehot), batch)
    if not momentum:
        e = g.op("Mul", e, "lr")  # lr folded into the small deltas (see module doc)
    penalty_scale = None
    if penalty:   # the loss the host reports: cross-entropy + lambda * sum_i mean_n ||r_i||^2
        squares = [g.op("ReduceMean", g.op("ReduceSumSquare", r, axes=[-1], keepdims=0), keepdims=0)
                   for r in fwd.residual.values()]
        g.op("Add", cross_entropy, g.op("Mul", g.op("Sum", *squares), g.const("penalty", float(penalty))),
             out="loss")
        penalty_scale = g.op("Div", g.const("two_penalty", 2.0 * float(penalty)), batch)
        if not momentum:
            penalty_scale = g.op("Mul", penalty_scale, "lr")

    trained = trainable_layers(model)
    _updates(g, model, fwd, _local_errors(g, model, fwd, e, trained, penalty_scale), trained, momentum, batch,
             factors)
    _declare_next(g, model, momentum, factors)
    g.output("loss", [])
    g.output("logits", [BATCH, classes])
    if factors:
        return g.model("edgefa_dfa_step_factors",
                       f"edgefa DFA step up to its gradients, SGD momentum {momentum}: weights, batch, lr -> gradients")
    return g.model("edgefa_dfa_train_step",
                   f"edgefa DFA training step, SGD momentum {momentum}: weights, batch, lr -> next weights")


def preference_step_graph(model: dict, momentum: float, factors: bool = False) -> onnx.ModelProto:
    """One DFA step of a scorer (one output) on Bradley-Terry pairs: both items of every pair go
    through the same weights in one pass of 2 x batch rows (chosen first), so the update is
    delta_w^T h_w + delta_l^T h_l with e_w = -sigmoid(-(s_w - s_l)) / batch and e_l = -e_w."""
    if model["n_classes"] != 1:
        raise ValueError("a Bradley-Terry step needs a scorer with one output")
    g = Graph()
    g.input("x_chosen", [BATCH, model["in_features"]])
    g.input("x_rejected", [BATCH, model["in_features"]])
    g.input("lr", [])
    _declare_state(g, model, momentum, factors)

    x = g.op("Concat", "x_chosen", "x_rejected", axis=0)
    fwd = _forward(g, model, x, train=True)
    scores = g.op("Reshape", fwd.logits, g.const("flat", [-1], TensorProto.INT64, (1,)))
    s_w, s_l = g.op_multi("Split", [scores], ["score_chosen", "score_rejected"], axis=0)
    margin = g.op("Sub", s_w, s_l)
    g.op("ReduceMean", g.op("Softplus", g.op("Neg", margin)), out="loss", keepdims=0)
    batch = _batch_size(g, "x_chosen")
    e_l = g.op("Div", g.op("Sigmoid", g.op("Neg", margin)), batch)       # dLoss/ds_l;  dLoss/ds_w = -e_l
    e = g.op("Unsqueeze", g.op("Concat", g.op("Neg", e_l), e_l, axis=0), g.const("axis1", [1], TensorProto.INT64, (1,)))
    if not momentum:
        e = g.op("Mul", e, "lr")

    trained = trainable_layers(model)
    rows = g.op("Mul", batch, g.const("two", 2.0))
    _updates(g, model, fwd, _local_errors(g, model, fwd, e, trained), trained, momentum, rows, factors)
    _declare_next(g, model, momentum, factors)
    g.output("loss", [])
    g.output("score_chosen", [BATCH])
    g.output("score_rejected", [BATCH])
    if factors:
        return g.model("edgefa_dfa_preference_step_factors",
                       f"edgefa DFA Bradley-Terry step up to its gradients, SGD momentum {momentum}")
    return g.model("edgefa_dfa_preference_step",
                   f"edgefa DFA Bradley-Terry step, SGD momentum {momentum}: weights, pairs, lr -> next weights")


def serialize_checked(m: onnx.ModelProto) -> bytes:
    """Full ONNX check (types and shapes inferred) before the graph goes anywhere."""
    onnx.checker.check_model(m, full_check=True)
    return m.SerializeToString()
