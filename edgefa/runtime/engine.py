"""Run a bundle's graphs in onnxruntime: the weights updated in place, or in ping-pong buffers.

In place (on the CPU, for a bundle that carries the step-factors graph, bundle.STEP_FACTORS_GRAPH):
the state is held once. The graph runs the step up to its gradients (small factors for the linear
weights); the step is proven finite from its update bounds, and only then does numpy apply SGD to
the weights and momentum in place (runtime/in_place.py). A refused step has touched nothing.

Ping-pong (on a GPU provider, and for bundles written before the step-factors graph existed):
every trainable tensor (weights, biases, momentum) has two preallocated buffers, A and B. Step k
reads side k%2 and writes the other through IOBinding, so a step allocates and copies nothing
weight-sized; accepting a step is flipping which side is current, and refusing one (NaN/Inf) is
simply not flipping. Feedback matrices are bound once and never change. Whether a step is finite
is proven from the graph's per-layer update bounds (step_bounds), not by reading the weights.

A bundle with a frozen trunk (bundle.trunk_of) has two more graphs: trunk.onnx (x -> features) and
head_step.onnx (the trainable part's step on features). `features(x)` runs the first and
`step_features(features, labels, lr)` the second, on the same ping-pong sides as `step`: a step on
cached features and a whole step are interchangeable, and the state stays one (runtime/feature_cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from ..bundle import (HEAD_FACTORS_GRAPH, HEAD_STEP_GRAPH, LOSS_BRADLEY_TERRY, STEP_FACTORS_GRAPH, TRUNK_GRAPH, Bundle,
                      feedback_input_name, momentum_name, next_name, param_shapes, trainable_layers,
                      trainable_params, trunk_of)
from ..device_profiles.profile import AUTO_PROVIDERS
from ..errors import BundleError, EdgefaError
from ..bundle import TRT_CACHE
from .in_place import GradOutputs, apply_sgd, scratch_for
from .step_bounds import StepBounds
from .tensorrt_build import DEFAULT_PROFILE

# Providers are chosen automatically in AUTO_PROVIDERS' order (a device fact the budget predicts
# from too), the first one the installed onnxruntime offers; the ones after it stay in the list as
# fallbacks for nodes it cannot take. TensorRT builds an engine per graph on first use: it gets the
# bundle's batch profile and a persistent engine cache (BUNDLE/state/trt_cache), so that happens
# once per device, not once per run.
TENSORRT = "TensorrtExecutionProvider"


def choose_providers(requested: str | None = None) -> tuple[str, ...]:
    """The execution providers to use: `requested` (then the available ones after it in the
    automatic order, CPU last), or the best available."""
    available = ort.get_available_providers()
    if requested:
        if requested not in available:
            raise EdgefaError(f"execution provider {requested!r} is not available here "
                              f"(this onnxruntime offers: {', '.join(available)})")
        after = AUTO_PROVIDERS[AUTO_PROVIDERS.index(requested) + 1:] if requested in AUTO_PROVIDERS else ()
        return tuple(dict.fromkeys([requested, *(p for p in after if p in available), "CPUExecutionProvider"]))
    return tuple(p for p in AUTO_PROVIDERS if p in available)


def tensorrt_options(bundle: Bundle, graph: str, inputs: dict[str, list]) -> dict[str, str]:
    """onnxruntime TensorRT provider options for one of the bundle's graphs: the engine and timing
    caches in BUNDLE/state/trt_cache, FP16 only for `infer` and only where the manifest allows it
    (the DFA update stays FP32), and the manifest's batch profile for every input whose dim 0 is
    the batch (`inputs`: name -> shape as onnxruntime reports it, the batch as a string)."""
    trt = bundle.manifest.get("tensorrt") or {}
    profile = trt.get("profile") or DEFAULT_PROFILE
    cache = bundle.state_dir / TRT_CACHE
    options = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache),
               "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache),
               "trt_fp16_enable": "True" if graph == "infer" and trt.get("fp16_infer") else "False"}
    batched = {name: shape for name, shape in inputs.items() if shape and not isinstance(shape[0], int)}
    if batched:
        for key, batch in (("min", profile["min"]), ("opt", profile["opt"]), ("max", profile["max"])):
            options[f"trt_profile_{key}_shapes"] = ",".join(
                f"{name}:" + "x".join(str(d) for d in [batch, *shape[1:]]) for name, shape in batched.items())
    return options


def on_gpu(providers: tuple[str, ...]) -> bool:
    """Whether the step runs on a GPU with these providers (the first one is the one used)."""
    return bool(providers) and providers[0] != "CPUExecutionProvider"


@dataclass
class StepResult:
    loss: float
    accepted: bool
    logits: np.ndarray


@dataclass
class PairStepResult:
    loss: float
    accepted: bool
    score_chosen: np.ndarray
    score_rejected: np.ndarray


# What onnxruntime raises when a graph file itself cannot be loaded: not protobuf, not a valid
# graph, an operator or opset this onnxruntime lacks, or gone. (Provider failures, e.g. EPFail or a
# CUDA error, are not the bundle's fault and stay as they are.)
_GRAPH_LOAD_ERRORS = tuple(getattr(ort_errors, name) for name in
                           ("InvalidProtobuf", "InvalidGraph", "NoSuchFile", "NotImplemented", "Fail"))


def load_session(path, *args, **kwargs) -> ort.InferenceSession:
    """ort.InferenceSession(path, ...), except that a graph file onnxruntime cannot load (hashes can
    match a truncated or garbled file that a manifest was rewritten for) is one BundleError line
    naming the file, for every caller."""
    try:
        return ort.InferenceSession(str(path), *args, **kwargs)
    except _GRAPH_LOAD_ERRORS as exc:
        text = str(exc).strip()
        reason = text.partition("failed:")[2].strip() or text   # drop "[ONNXRuntimeError] : 7 : ... from PATH failed:"
        raise BundleError(f"{path}: onnxruntime {ort.__version__} cannot load this graph "
                          f"({reason.splitlines()[0] if reason else type(exc).__name__})") from None


def _session(bundle: Bundle, graph: str, providers, threads: int | None,
             spinning: bool = True) -> ort.InferenceSession:
    """`spinning=False`: onnxruntime's intra-op threads sleep when a run ends instead of spinning,
    so that numpy's BLAS threads (the in-place update right after the run) get the cores: with both
    spinning on 2 cores, a demo-sized step took 22.6 ms instead of 0.5 ms."""
    path = bundle.graph_path(graph)
    opts = ort.SessionOptions()
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    chosen: list = list(providers)
    if TENSORRT in chosen:          # its profile needs the input shapes: read them from a CPU session
        probe = load_session(path, providers=["CPUExecutionProvider"])
        inputs = {i.name: list(i.shape) for i in probe.get_inputs()}
        (bundle.state_dir / TRT_CACHE).mkdir(parents=True, exist_ok=True)
        chosen[chosen.index(TENSORRT)] = (TENSORRT, tensorrt_options(bundle, graph, inputs))
    return load_session(path, opts, providers=chosen)


class DeviceEngine:
    """What every backend shares: the bundle's state layout (trainable tensors with momentum in
    two ping-pong sides, frozen ones bound once), the checks on what a step is fed, and the proof
    that a step is finite. A backend runs the graphs: `_run_step` and `_infer_batch`, and moves
    state in and out: `_host`, `_write_current`."""

    max_batch: int | None = None        # a backend with a fixed batch range says its largest

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.momentum = float(bundle.manifest["optimizer"]["momentum"])
        self.preference = bundle.manifest.get("loss") == LOSS_BRADLEY_TERRY
        # Only the trainable tensors (all of them unless the bundle says `trainable: last:K`) get
        # momentum and ping-pong buffers; frozen ones are bound once, from the bundle's arrays.
        self.params = list(trainable_params(bundle.model))
        self.frozen = {n: np.ascontiguousarray(bundle.weights[n]) for n in param_shapes(bundle.model)
                       if n not in self.params}
        self.state_names = self.params + ([momentum_name(p) for p in self.params] if self.momentum else [])
        self.feedback = {n: np.ascontiguousarray(a) for n, a in bundle.feedback.items()}
        self.layers = trainable_layers(bundle.model)   # the order of the graph's update_bound
        self.bounds = StepBounds(self.layers, self.momentum)
        self.current = 0

    def initial_side(self) -> dict[str, np.ndarray]:
        """The state to start from: the bundle's own arrays (no copy: read_bundle already checked
        they are float32, and the engine owns them from here on) and zero momentum."""
        side = {p: np.ascontiguousarray(self.bundle.weights[p]) for p in self.params}
        if self.momentum:
            side.update({momentum_name(p): np.zeros_like(side[p]) for p in self.params})
        return side

    # -- training and inference ------------------------------------------------------------------
    def step(self, x: np.ndarray, labels: np.ndarray, lr: float) -> StepResult:
        """One DFA step. The new state is accepted only if the loss and every new tensor are finite."""
        if self.preference:
            raise EdgefaError(f"{self.bundle.path}: a bradley-terry bundle trains on pairs (step_pairs), not labels")
        inputs = {"x": np.ascontiguousarray(x, dtype=np.float32),
                  "labels": np.ascontiguousarray(labels, dtype=np.int64)}
        loss, accepted, (logits,) = self._checked_step(inputs, lr, ("logits",))
        return StepResult(loss, accepted, logits)

    def step_pairs(self, chosen: np.ndarray, rejected: np.ndarray, lr: float) -> PairStepResult:
        """One DFA step of a Bradley-Terry bundle on a batch of pairs (row i of `chosen` preferred
        to row i of `rejected`); accepted under the same proof of finiteness as `step`."""
        if not self.preference:
            raise EdgefaError(f"{self.bundle.path}: this bundle trains on labels (step), not on pairs")
        inputs = {"x_chosen": np.ascontiguousarray(chosen, dtype=np.float32),
                  "x_rejected": np.ascontiguousarray(rejected, dtype=np.float32)}
        loss, accepted, (s_w, s_l) = self._checked_step(inputs, lr, ("score_chosen", "score_rejected"))
        return PairStepResult(loss, accepted, s_w, s_l)

    # -- a bundle with a frozen trunk: its features, and the part's step on them ------------------
    @property
    def caches_features(self) -> bool:
        """Whether this engine runs the trunk and the part's step apart (features, step_features)."""
        return False

    def _no_trunk_graphs(self) -> EdgefaError:
        why = "has no frozen trunk" if trunk_of(self.bundle.model) is None else \
            f"runs on {type(self).__name__}, which runs whole steps only"
        return EdgefaError(f"{self.bundle.path}: no trunk features to cache: the bundle {why}")

    def features(self, x: np.ndarray) -> np.ndarray:
        """The frozen trunk's features of samples x [batch, in_features] -> [batch, features]."""
        raise self._no_trunk_graphs()

    def step_features(self, features: np.ndarray, labels: np.ndarray, lr: float) -> StepResult:
        """One DFA step of the trainable part on trunk features (`features(x)` of the batch): the
        same state, the same proof of finiteness and the same new state as `step(x, labels, lr)`."""
        if not self.caches_features:
            raise self._no_trunk_graphs()
        inputs = {"x": np.ascontiguousarray(features, dtype=np.float32),
                  "labels": np.ascontiguousarray(labels, dtype=np.int64)}
        loss, accepted, (logits,) = self._checked_step(inputs, lr, ("logits",), self._run_head_step)
        return StepResult(loss, accepted, logits)

    def _checked_step(self, inputs: dict[str, np.ndarray], lr: float, per_sample: tuple[str, ...], run=None):
        """Run one step (`run`: the whole step, or the part's step on features) from the current
        side into the other; flip only if it is proven finite."""
        loss, update_bound, rest = (run or self._run_step)(inputs, lr, per_sample)
        accepted = self.bounds.advance(loss, update_bound, lr)
        if accepted:
            self._accept(lr)
        return loss, accepted, rest

    def _accept(self, lr: float) -> None:
        """Make the step just run (and proven finite) the current state: flip the ping-pong sides."""
        self.current = 1 - self.current

    def predict_logits(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        batch_size = min(batch_size, self.max_batch or batch_size)
        out = [self._infer_batch(np.ascontiguousarray(x[i:i + batch_size], dtype=np.float32))
               for i in range(0, len(x), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.bundle.model["n_classes"]), np.float32)

    # -- state in and out ------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """Copies of the current trainable weights (and momentum), keyed by bundle name; frozen
        weights never change, so they stay in the bundle and out of checkpoints."""
        side = self._host(self.current)
        self.bounds.reset(side)  # we are reading everything anyway: tighten the bounds for free
        return {n: a.copy() for n, a in side.items()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        arrays = {n: np.ascontiguousarray(state[n], dtype=np.float32) for n in self.state_names}
        self.bounds.reset(arrays)           # refuses NaN/Inf before anything is written
        self._write_current(arrays)


class OrtEngine(DeviceEngine):
    """`allow_in_place=False`: ping-pong on train_step.onnx even where the bundle could update in
    place (the same arithmetic as a TensorRT engine, which runs the whole step graph)."""

    def __init__(self, bundle: Bundle, providers: tuple[str, ...] | None = None,
                 threads: int | None = None, allow_in_place: bool = True):
        super().__init__(bundle)
        providers = providers or choose_providers()
        # On a GPU provider the weights, momentum and feedback live in GPU memory (OrtValues on
        # "cuda"): a step moves only the batch in and the loss, bounds and logits out, and the
        # weights come back to the host only when read (a checkpoint, a pull, `state()`).
        self.on_gpu = on_gpu(tuple(providers))
        # In place on the CPU when the bundle carries the step-factors graph(s); on a GPU the
        # state stays in GPU memory, in ping-pong sides, as for bundles written before them.
        graphs = bundle.manifest.get("graphs") or {}
        self.in_place = allow_in_place and not self.on_gpu and "step_factors" in graphs and (
            not self.caches_features or "head_factors" in graphs)
        step_graph = STEP_FACTORS_GRAPH if self.in_place else "train_step.onnx"
        self.train_session = _session(bundle, step_graph.removesuffix(".onnx"), providers, threads,
                                      spinning=not self.in_place)
        self.infer_session = _session(bundle, "infer", providers, threads)
        side_a = self.initial_side()
        self.sides = [side_a] if self.in_place else [side_a, {n: np.empty_like(a) for n, a in side_a.items()}]
        self._grads = self._grad_outputs(self.train_session) if self.in_place else None
        self._scratch = (scratch_for([side_a[p].shape for p in self._grads.factored]) if self.in_place
                         else None)
        self._pending: dict[str, np.ndarray] = {}     # the last step's gradient outputs, until accepted
        if self.on_gpu:             # copied to the GPU once; the host copies are let go
            self.sides = [{n: self._value(a) for n, a in side.items()} for side in self.sides]
            self.feedback = {n: self._value(a) for n, a in self.feedback.items()}
            self.frozen = {n: self._value(a) for n, a in self.frozen.items()}
        self.bounds.reset(self._host(self.current))
        self._train_bindings = [self._bind_train(k) for k in range(len(self.sides))]
        self._infer_bindings = [self._bind_infer(k) for k in range(len(self.sides))]
        self._providers, self._threads = providers, threads
        self.trunk_session = self.head_session = None   # opened on first use (features, step_features)

    @property
    def caches_features(self) -> bool:
        return trunk_of(self.bundle.model) is not None

    def _grad_outputs(self, session: ort.InferenceSession) -> GradOutputs:
        grads = GradOutputs.of(self.params, {o.name for o in session.get_outputs()})
        if grads is None:
            raise BundleError(f"{self.bundle.path}: the step-factors graph lacks the gradient of a trainable tensor")
        return grads

    def _open_trunk_graphs(self) -> None:
        """The trunk and head-step sessions, bound once: the trunk to its frozen weights, the head
        step to both ping-pong sides exactly as the whole step is (`_bind_train`)."""
        if self.trunk_session is not None:
            return
        if not self.caches_features:
            raise self._no_trunk_graphs()
        # (_session takes a graph's name without ".onnx")
        self.trunk_session = _session(self.bundle, TRUNK_GRAPH.removesuffix(".onnx"), self._providers, self._threads)
        head_graph = HEAD_FACTORS_GRAPH if self.in_place else HEAD_STEP_GRAPH
        self.head_session = _session(self.bundle, head_graph.removesuffix(".onnx"), self._providers, self._threads,
                                     spinning=not self.in_place)
        if self.in_place and self._grad_outputs(self.head_session) != self._grads:
            raise BundleError(f"{self.bundle.path}: {HEAD_FACTORS_GRAPH} and {STEP_FACTORS_GRAPH} return different gradients")
        self._trunk_binding = self.trunk_session.io_binding()
        for name in {i.name for i in self.trunk_session.get_inputs()} - {"x"}:
            self._trunk_binding.bind_ortvalue_input(name, self._value(self.frozen[name]))
        self._head_bindings = [self._bind_train(k, self.head_session) for k in range(len(self.sides))]

    def features(self, x: np.ndarray) -> np.ndarray:
        self._open_trunk_graphs()
        b = self._trunk_binding
        b.bind_cpu_input("x", np.ascontiguousarray(x, dtype=np.float32))
        b.bind_output("features")
        self.trunk_session.run_with_iobinding(b)
        return b.get_outputs()[0].numpy()

    # -- bindings: made once, reused every step --------------------------------------------------
    def _value(self, arr) -> ort.OrtValue:
        """An OrtValue over `arr`: a view of the numpy array on the CPU, a GPU copy on a GPU
        provider (made once, at start); an OrtValue already is one."""
        if isinstance(arr, ort.OrtValue):
            return arr
        return ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0) if self.on_gpu else ort.OrtValue.ortvalue_from_numpy(arr)

    def _host(self, k: int) -> dict[str, np.ndarray]:
        """Side k as numpy arrays: the buffers themselves on the CPU, copies from the GPU."""
        return {n: (a.numpy() if isinstance(a, ort.OrtValue) else a) for n, a in self.sides[k].items()}

    def _bind_train(self, k: int, session: ort.InferenceSession | None = None):
        """Bind side k as the input and the other side as the output of the step graph `session`
        (the whole train step unless given), with the feedback and the frozen weights it takes.
        In place there is one side and a step-factors graph: inputs only (no momentum)."""
        session = session or self.train_session
        b = session.io_binding()
        src, dst = self.sides[k], (None if self.in_place else self.sides[1 - k])
        takes = {i.name for i in session.get_inputs()}    # the head step takes no trunk weights
        for n in self.state_names:
            if n in takes:
                b.bind_ortvalue_input(n, self._value(src[n]))
            if dst is not None:
                b.bind_ortvalue_output(next_name(n), self._value(dst[n]))
        for layer, arr in self.feedback.items():
            b.bind_ortvalue_input(feedback_input_name(layer), self._value(arr))
        for n, arr in self.frozen.items():
            if n in takes:
                b.bind_ortvalue_input(n, self._value(arr))
        return b

    def _bind_infer(self, k: int):
        b = self.infer_session.io_binding()
        for n in self.params:
            b.bind_ortvalue_input(n, self._value(self.sides[k][n]))
        for n, arr in self.frozen.items():
            b.bind_ortvalue_input(n, self._value(arr))
        return b

    # -- running the graphs ----------------------------------------------------------------------
    def _run_step(self, inputs: dict[str, np.ndarray], lr: float, per_sample: tuple[str, ...],
                  session: ort.InferenceSession | None = None, bindings=None):
        session, b = session or self.train_session, (bindings or self._train_bindings)[self.current]
        for name, arr in inputs.items():
            b.bind_cpu_input(name, arr)
        b.bind_cpu_input("lr", np.array(lr, dtype=np.float32))
        # Outputs whose shape follows the batch are bound afresh each run: a binding reuses the
        # previous run's buffer, which fails when the batch size changes.
        grad_names = self._grads.names if self.in_place else []
        names = ("update_bound", "loss", *per_sample, *grad_names)
        for name in names:  # get_outputs() keeps this binding order
            b.bind_output(name)
        session.run_with_iobinding(b)
        bound_value, loss_value, *rest = (v.numpy() for v in b.get_outputs()[-len(names):])
        self._pending = dict(zip(grad_names, rest[len(per_sample):]))
        return float(loss_value), bound_value, rest[:len(per_sample)]

    def _accept(self, lr: float) -> None:
        if not self.in_place:
            return super()._accept(lr)
        apply_sgd(self.sides[0], self._grads, self._pending, lr, self.momentum, self._scratch)
        self._pending = {}

    def _run_head_step(self, inputs: dict[str, np.ndarray], lr: float, per_sample: tuple[str, ...]):
        self._open_trunk_graphs()
        return self._run_step(inputs, lr, per_sample, self.head_session, self._head_bindings)

    def _infer_batch(self, x: np.ndarray) -> np.ndarray:
        b = self._infer_bindings[self.current]
        b.bind_cpu_input("x", x)
        b.bind_output("logits")
        self.infer_session.run_with_iobinding(b)
        return b.get_outputs()[0].numpy()

    def _write_current(self, arrays: dict[str, np.ndarray]) -> None:
        for n, arr in arrays.items():
            target = self.sides[self.current][n]
            if isinstance(target, ort.OrtValue):
                target.update_inplace(arr)
            else:
                np.copyto(target, arr)

    @property
    def providers(self) -> list[str]:
        return self.train_session.get_providers()
