"""The frozen trunk: any forward graph below the part the device trains, as one ONNX graph.

A trunk maps the bundle's input x [batch, in_features] (flat, as every bundle takes it) to flat
features [batch, features]. It comes from torch's own ONNX exporter (`from_module`: the frozen
layers of a host model, or a user's torch module) or from the user's ONNX file cut at a named
tensor (`from_onnx`); no graph is written by hand for layers that never train. Either way:

    - its float weights leave the graph as inputs named "trunk.<name>" (`Trunk.params`): they go
      into weights.npz once and the device binds them like every frozen weight, so the trunk,
      infer.onnx and train_step.onnx share one copy on disk and in memory;
    - every other name in it is prefixed "trunk/", so it composes with the hand-built graphs of
      the trainable part (`compose`) without a clash;
    - it is checked on onnxruntime at two batch sizes before it goes anywhere.
"""

from __future__ import annotations

import difflib
import io
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..bundle import TRUNK_PREFIX
from ..errors import EdgefaError
from .graph_cost import per_sample_cost
from .graph_builder import BATCH, IR_VERSION, OPSET

FEATURES = "features"
TRUNK_INPUT = "x"
CHECK_TOLERANCE = 1e-4


@dataclass
class Trunk:
    graph: onnx.ModelProto                      # x [batch, in_features] + params -> features [batch, F]
    params: dict[str, np.ndarray]               # "trunk.<name>" -> float32, the graph's weight inputs
    in_features: int
    features: int
    source: str                                 # one line: where it came from
    cut: str                                    # the tensor it ends at, in the source's names
    frozen_layers: list[str] = field(default_factory=list)

    def manifest_section(self) -> dict:
        """manifest["model"]["trunk"] (bundle.trunk_of); its cost per sample for `edgefa budget`."""
        flops, activations = per_sample_cost(self.graph) or (None, None)
        return {"graph": "trunk.onnx", "source": self.source, "cut": self.cut,
                "flops_per_sample": flops, "activations_per_sample": activations,
                "in_features": self.in_features, "features": self.features,
                "frozen_layers": self.frozen_layers, "ops": sorted({n.op_type for n in self.graph.graph.node}),
                "params": {n: list(a.shape) for n, a in self.params.items()}}


# --- from torch --------------------------------------------------------------------------------

def from_module(module, example_input, source: str, cut: str, frozen_layers: list[str] | None = None) -> Trunk:
    """A torch module (eval mode, no gradients) as a trunk. `example_input`: a few samples shaped as
    the module takes them ([n, ...]); the trunk takes them flat and flattens what the module returns.
    Exported by torch.onnx's TorchScript exporter (dynamo=False): it writes opset 17 directly, and
    takes about 0.1 s against about 5 s for the dynamo exporter, which matters for tests and the CLI."""
    import torch

    class _Flat(torch.nn.Module):
        def __init__(self, inner, in_shape):
            super().__init__()
            self.inner, self.in_shape = inner, list(in_shape)

        def forward(self, x):
            return torch.flatten(self.inner(x.reshape(-1, *self.in_shape)), 1)

    example = torch.as_tensor(np.asarray(example_input), dtype=torch.float32)
    if example.ndim < 2 or len(example) < 2:
        raise EdgefaError("trunk: the example input needs at least two samples, shaped [n, ...]")
    was_training = module.training
    wrapped = _Flat(module.eval(), example.shape[1:])
    flat = example.reshape(len(example), -1)
    buffer = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")          # the TorchScript exporter's deprecation notice
            expected = wrapped(flat).numpy()
            torch.onnx.export(wrapped, (flat,), buffer, dynamo=False, opset_version=OPSET,
                              input_names=[TRUNK_INPUT], output_names=[FEATURES], do_constant_folding=True,
                              dynamic_axes={TRUNK_INPUT: {0: BATCH}, FEATURES: {0: BATCH}})
    except Exception as exc:  # torch's exporter raises many types; say which module failed
        raise EdgefaError(f"trunk: torch.onnx could not export {source} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    finally:
        module.train(was_training)
    graph = onnx.load_from_string(buffer.getvalue())
    return _finish(graph, source, cut, frozen_layers or [], flat.numpy(), expected)


# --- from the user's ONNX file -----------------------------------------------------------------

def from_onnx(path: str | Path, cut: str) -> Trunk:
    """The user's ONNX model from its one input up to `cut` (a tensor name, or a node name: its
    first output), reshaped to take flat samples and flattened at the cut."""
    path = Path(path)
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError and friends: not an ONNX file
        raise EdgefaError(f"{path}: not an ONNX model ({type(exc).__name__})") from None
    model = _to_opset(model, str(path))
    g = model.graph
    weights = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in weights]
    if len(inputs) != 1 or inputs[0].type.tensor_type.elem_type != TensorProto.FLOAT:
        raise EdgefaError(f"{path}: a trunk needs a model with one float input; this one takes "
                          f"{', '.join(i.name for i in inputs) or 'none'}")
    source_input = inputs[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in source_input.type.tensor_type.shape.dim]
    if len(dims) < 2 or any(d is None or d < 1 for d in dims[1:]):
        raise EdgefaError(f"{path}: input {source_input.name!r} needs a static shape after the batch, got {dims}")
    cut_tensor = _cut_tensor(g, cut, path)
    try:
        part = onnx.utils.Extractor(model).extract_model([source_input.name], [cut_tensor])
    except Exception as exc:
        raise EdgefaError(f"{path}: cannot cut the model at {cut!r} ({str(exc).splitlines()[0]})") from None
    sample_shape = dims[1:]
    # flat x -> the model's input shape (under a name of ours: theirs may be "x"); the cut -> flat features
    pg = part.graph
    for node in pg.node:
        node.input[:] = ["trunk/input" if name == source_input.name else name for name in node.input]
    pre = [helper.make_node("Reshape", [TRUNK_INPUT, "trunk/input_shape"], ["trunk/input"], name="trunk/unflatten")]
    post = [helper.make_node("Flatten", [cut_tensor], [FEATURES], axis=1, name="trunk/flatten")]
    nodes = pre + list(pg.node) + post
    shape = numpy_helper.from_array(np.array([-1, *sample_shape], np.int64), "trunk/input_shape")
    in_features = math.prod(sample_shape)
    graph = helper.make_graph(nodes, "edgefa_trunk",
                              [helper.make_tensor_value_info(TRUNK_INPUT, TensorProto.FLOAT, [BATCH, in_features])],
                              [helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, [BATCH, None])],
                              [*pg.initializer, shape])
    trunk = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="edgefa")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, in_features)).astype(np.float32)
    return _finish(trunk, f"{path.name} up to {cut}", cut, [], x, None)


def _cut_tensor(g: onnx.GraphProto, cut: str, path: Path) -> str:
    produced = {o for n in g.node for o in n.output}
    if cut in produced:
        return cut
    by_node = {n.name: n for n in g.node if n.name}
    if cut in by_node:
        return by_node[cut].output[0]
    names = list(dict.fromkeys([*by_node, *produced]))
    # what the name is part of, then what it is a typo of (difflib: "/7/Flaten" -> "/7/Flatten")
    near = [n for n in names if cut.lower() in n.lower()]
    near = list(dict.fromkeys(near + difflib.get_close_matches(cut, names, n=5, cutoff=0.6)))[:5]
    raise EdgefaError(f"{path}: no tensor or node named {cut!r}"
                      + (f" (close: {', '.join(near)})" if near else
                         f" (its outputs: {', '.join(o.name for o in g.output)})"))


def _to_opset(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    """The model at the bundle's opset (OPSET), converted by onnx's version converter if needed."""
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    others = [o.domain for o in model.opset_import if o.domain not in ("", "ai.onnx")]
    if others:
        raise EdgefaError(f"{where}: uses operator domains {', '.join(others)}; a trunk uses standard ONNX ops only")
    if version == OPSET:
        return model
    try:
        return onnx.version_converter.convert_version(model, OPSET)
    except Exception as exc:
        raise EdgefaError(f"{where}: opset {version} cannot be converted to the bundle's opset {OPSET} "
                          f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


# --- making any trunk graph a bundle's trunk ---------------------------------------------------

def _finish(graph: onnx.ModelProto, source: str, cut: str, frozen_layers: list[str],
            x: np.ndarray, expected: np.ndarray | None) -> Trunk:
    graph = _to_opset(graph, source)
    params = _lift_weights(graph)
    _prefix_names(graph)
    graph.ir_version = IR_VERSION
    del graph.graph.output[:]
    graph.graph.output.append(helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, [BATCH, None]))
    try:
        onnx.checker.check_model(graph, full_check=True)
    except Exception as exc:
        raise EdgefaError(f"trunk from {source}: not a valid ONNX graph ({str(exc).splitlines()[0]})") from None
    features = _check_runs(graph, params, x, expected, source)
    graph.graph.output[0].type.tensor_type.shape.dim[1].dim_value = features
    return Trunk(graph, params, int(x.shape[1]), features, source, cut, frozen_layers)


def _lift_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every float32 initializer with at least one dimension becomes a graph input "trunk.<name>"
    (returned as arrays); scalars and integer constants (shapes, axes) stay in the graph."""
    g = model.graph
    kept, params = [], {}
    renames = {}
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT and len(t.dims) >= 1:
            name = TRUNK_PREFIX + t.name
            renames[t.name] = name
            params[name] = np.ascontiguousarray(numpy_helper.to_array(t), dtype=np.float32)
        else:
            kept.append(t)
    del g.initializer[:]
    g.initializer.extend(kept)
    old_inputs = [i for i in g.input if i.name not in renames]   # older exporters list initializers as inputs too
    del g.input[:]
    g.input.extend(old_inputs)
    g.input.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(a.shape)) for name, a in params.items())
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    return params


def _prefix_names(model: onnx.ModelProto) -> None:
    """Every name inside the trunk other than x, features and the lifted weights gets "trunk/", so
    the hand-built part's names ("gemm_3", "one", "x") can never clash with it."""
    g = model.graph
    fixed = {TRUNK_INPUT, FEATURES, *(i.name for i in g.input)}
    rename = {}
    for node in g.node:
        for name in node.output:
            if name and name not in fixed:
                rename[name] = name if name.startswith("trunk/") else f"trunk/{name}"
    for t in g.initializer:
        if t.name not in fixed:
            rename[t.name] = t.name if t.name.startswith("trunk/") else f"trunk/{t.name}"
            t.name = rename[t.name]
    for node in g.node:
        node.name = f"trunk/{node.name}" if node.name and not node.name.startswith("trunk/") else node.name
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
        for i, name in enumerate(node.output):
            node.output[i] = rename.get(name, name)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                raise EdgefaError(f"trunk: control flow ({node.op_type} {node.name}) is not supported in a trunk")
    del g.value_info[:]                     # stale names; shape inference fills it again


def _check_runs(model: onnx.ModelProto, params: dict[str, np.ndarray], x: np.ndarray,
                expected: np.ndarray | None, source: str) -> int:
    """Run the trunk on onnxruntime at batch len(x) and at batch 1 (a batch fixed by the exporter
    fails here, not on the device); compare with torch's own output where there is one."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        out = session.run([FEATURES], {TRUNK_INPUT: x, **params})[0]
        one = session.run([FEATURES], {TRUNK_INPUT: x[:1], **params})[0]
    except Exception as exc:
        raise EdgefaError(f"trunk from {source}: onnxruntime cannot run it at batch {len(x)} and 1 "
                          f"({str(exc).splitlines()[0][:200]}); export it with a dynamic batch") from None
    if out.ndim != 2 or out.shape[0] != len(x) or not np.allclose(one, out[:1], atol=CHECK_TOLERANCE, rtol=1e-4):
        raise EdgefaError(f"trunk from {source}: gives {list(out.shape)} for a batch of {len(x)}, or a different "
                          "answer at batch 1; a trunk must map each sample on its own (a batch fixed by the "
                          "exporter? export it with a dynamic batch)")
    if expected is not None and not np.allclose(out, expected, atol=CHECK_TOLERANCE, rtol=1e-4):
        worst = float(np.max(np.abs(out - expected)))
        raise EdgefaError(f"trunk from {source}: the exported graph differs from torch by {worst:.2e}")
    return int(out.shape[1])


# --- the trunk under the part ------------------------------------------------------------------

def compose(trunk: Trunk, part: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """One graph: the trunk, its features fed to the part's x. The part's inputs other than x
    (its weights, labels, lr) stay inputs; so do the trunk's weights."""
    merged = onnx.compose.merge_models(trunk.graph, part, io_map=[(FEATURES, TRUNK_INPUT)], name=name,
                                       doc_string=f"{part.doc_string}; under a frozen trunk ({trunk.source})")
    merged.ir_version = IR_VERSION
    return merged
