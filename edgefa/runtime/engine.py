"""Run a bundle's graphs in onnxruntime with the weights in ping-pong buffers.

Every trainable tensor (weights, biases, momentum) has two preallocated buffers, A and B. Step k
reads side k%2 and writes the other through IOBinding, so a step allocates and copies nothing
weight-sized; accepting a step is flipping which side is current, and refusing one (NaN/Inf) is
simply not flipping. Feedback matrices are bound once and never change.

Proving a step finite without reading its output again. Checking every new weight for NaN/Inf
is a full pass over memory (about 3.5 ms for 8 x 1024^2 weights here, an eighth of a step). The
graph instead returns, per layer, G_l >= |every element of the step's gradient| (Cauchy-Schwarz
on the outer product, from the small [batch, width] tensors). The engine keeps per-layer upper
bounds on |W| and |v| and advances them with the optimizer's own recurrence:

    v' = mu v + g   ->  V' = mu V + G          W' = W - lr v'  ->  M' = M + lr V'

All inputs finite (G finite implies the batch and deltas were) and every bound below 1e37 means no
operation can overflow float32, so the new state is finite. The bounds are reset to the exact
max |W|, max |v| whenever the state is read or loaded (checkpoints), so they stay tight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from ..errors import EdgefaError
from .tensorrt_build import DEFAULT_PROFILE
from ..bundle import (LOSS_BRADLEY_TERRY, Bundle, feedback_input_name, layer_params, momentum_name, next_name,
                      param_shapes, trainable_layers, trainable_params)

# Chosen automatically in this order, the first one the installed onnxruntime offers; the ones
# after it stay in the list as fallbacks for nodes it cannot take. TensorRT builds an engine per
# graph on first use: it gets the bundle's batch profile and a persistent engine cache
# (BUNDLE/state/trt_cache), so that happens once per device, not once per run.
AUTO_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
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
    cache = bundle.state_dir / "trt_cache"
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


OVERFLOW_LIMIT = 1e37  # float32 max is 3.4e38: a 34x margin for rounding inside the Gemms


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


def _session(bundle: Bundle, graph: str, providers, threads: int | None) -> ort.InferenceSession:
    path = bundle.graph_path(graph)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    chosen: list = list(providers)
    if TENSORRT in chosen:          # its profile needs the input shapes: read them from a CPU session
        probe = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        inputs = {i.name: list(i.shape) for i in probe.get_inputs()}
        (bundle.state_dir / "trt_cache").mkdir(parents=True, exist_ok=True)
        chosen[chosen.index(TENSORRT)] = (TENSORRT, tensorrt_options(bundle, graph, inputs))
    return ort.InferenceSession(str(path), opts, providers=chosen)


class OrtEngine:
    def __init__(self, bundle: Bundle, providers: tuple[str, ...] | None = None,
                 threads: int | None = None):
        providers = providers or choose_providers()
        self.bundle = bundle
        self.momentum = float(bundle.manifest["optimizer"]["momentum"])
        # On a GPU provider the weights, momentum and feedback live in GPU memory (OrtValues on
        # "cuda"): a step moves only the batch in and the loss, bounds and logits out, and the
        # weights come back to the host only when read (a checkpoint, a pull, `state()`).
        self.on_gpu = on_gpu(tuple(providers))
        self.train_session = _session(bundle, "train_step", providers, threads)
        self.infer_session = _session(bundle, "infer", providers, threads)
        self.preference = bundle.manifest.get("loss") == LOSS_BRADLEY_TERRY
        # Only the trainable tensors (all of them unless the bundle says `trainable: last:K`) get
        # momentum and ping-pong buffers; frozen ones are bound once, from the bundle's arrays.
        self.params = list(trainable_params(bundle.model))
        self.frozen = {n: np.ascontiguousarray(bundle.weights[n]) for n in param_shapes(bundle.model)
                       if n not in self.params}
        self.state_names = self.params + ([momentum_name(p) for p in self.params] if self.momentum else [])

        # Side A starts as the bundle's own arrays (no copy: the weights are held once, not twice);
        # read_bundle already checked they are float32. The engine owns them from here on.
        side_a = {p: np.ascontiguousarray(bundle.weights[p]) for p in self.params}
        if self.momentum:
            side_a.update({momentum_name(p): np.zeros_like(side_a[p]) for p in self.params})
        self.sides = [side_a, {n: np.empty_like(a) for n, a in side_a.items()}]
        self.feedback = {n: np.ascontiguousarray(a) for n, a in bundle.feedback.items()}
        if self.on_gpu:             # copied to the GPU once; the host copies are let go
            self.sides = [{n: self._value(a) for n, a in side.items()} for side in self.sides]
            self.feedback = {n: self._value(a) for n, a in self.feedback.items()}
            self.frozen = {n: self._value(a) for n, a in self.frozen.items()}
        self.current = 0
        self.layers = trainable_layers(bundle.model)   # the order of the graph's update_bound
        self._refresh_bounds()
        self._train_bindings = [self._bind_train(k) for k in (0, 1)]
        self._infer_bindings = [self._bind_infer(k) for k in (0, 1)]

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

    def _bind_train(self, k: int):
        b = self.train_session.io_binding()
        src, dst = self.sides[k], self.sides[1 - k]
        for n in self.state_names:
            b.bind_ortvalue_input(n, self._value(src[n]))
            b.bind_ortvalue_output(next_name(n), self._value(dst[n]))
        for layer, arr in self.feedback.items():
            b.bind_ortvalue_input(feedback_input_name(layer), self._value(arr))
        for n, arr in self.frozen.items():
            b.bind_ortvalue_input(n, self._value(arr))
        return b

    def _bind_infer(self, k: int):
        b = self.infer_session.io_binding()
        for n in self.params:
            b.bind_ortvalue_input(n, self._value(self.sides[k][n]))
        for n, arr in self.frozen.items():
            b.bind_ortvalue_input(n, self._value(arr))
        return b

    # -- training and inference ------------------------------------------------------------------
    def step(self, x: np.ndarray, labels: np.ndarray, lr: float) -> StepResult:
        """One DFA step. The new state is accepted only if the loss and every new tensor are finite."""
        if self.preference:
            raise EdgefaError(f"{self.bundle.path}: a bradley-terry bundle trains on pairs (step_pairs), not labels")
        b = self._train_bindings[self.current]
        b.bind_cpu_input("x", np.ascontiguousarray(x, dtype=np.float32))
        b.bind_cpu_input("labels", np.ascontiguousarray(labels, dtype=np.int64))
        loss, accepted, (logits,) = self._run_step(b, lr, ("logits",))
        return StepResult(loss, accepted, logits)

    def step_pairs(self, chosen: np.ndarray, rejected: np.ndarray, lr: float) -> PairStepResult:
        """One DFA step of a Bradley-Terry bundle on a batch of pairs (row i of `chosen` preferred
        to row i of `rejected`); accepted under the same proof of finiteness as `step`."""
        if not self.preference:
            raise EdgefaError(f"{self.bundle.path}: this bundle trains on labels (step), not on pairs")
        b = self._train_bindings[self.current]
        b.bind_cpu_input("x_chosen", np.ascontiguousarray(chosen, dtype=np.float32))
        b.bind_cpu_input("x_rejected", np.ascontiguousarray(rejected, dtype=np.float32))
        loss, accepted, (s_w, s_l) = self._run_step(b, lr, ("score_chosen", "score_rejected"))
        return PairStepResult(loss, accepted, s_w, s_l)

    def _run_step(self, b, lr: float, per_sample: tuple[str, ...]):
        b.bind_cpu_input("lr", np.array(lr, dtype=np.float32))
        # Outputs whose shape follows the batch are bound afresh each run: a binding reuses the
        # previous run's buffer, which fails when the batch size changes.
        names = ("update_bound", "loss", *per_sample)
        for name in names:  # get_outputs() keeps this binding order
            b.bind_output(name)
        self.train_session.run_with_iobinding(b)
        bound_value, loss_value, *rest = b.get_outputs()[-len(names):]
        loss, update_bound = float(loss_value.numpy()), bound_value.numpy().astype(np.float64)
        if self.momentum:
            v_bound = self.momentum * self.v_bound + update_bound
            w_bound = self.w_bound + lr * v_bound
        else:  # the graph folded lr into the update already
            v_bound, w_bound = self.v_bound, self.w_bound + update_bound
        accepted = (np.isfinite(loss) and np.isfinite(update_bound).all()
                    and max(w_bound.max(initial=0.0), v_bound.max(initial=0.0)) < OVERFLOW_LIMIT)
        if accepted:
            self.current = 1 - self.current
            self.w_bound, self.v_bound = w_bound, v_bound
        return loss, bool(accepted), [r.numpy() for r in rest]

    def _refresh_bounds(self) -> None:
        """Exact per-layer max |W|, |b| and max |v| of the current side (one pass; not per step)."""
        side = self._host(self.current)

        def max_abs(names):
            return max(max(float(side[n].max()), -float(side[n].min())) if side[n].size else 0.0 for n in names)

        self.w_bound = np.array([max_abs(layer_params(l)) for l in self.layers])
        self.v_bound = (np.array([max_abs([momentum_name(p) for p in layer_params(l)]) for l in self.layers])
                        if self.momentum else np.zeros(len(self.layers)))
        if not (np.isfinite(self.w_bound).all() and np.isfinite(self.v_bound).all()):
            raise EdgefaError("the weights or momentum to start from hold NaN or Inf")

    def predict_logits(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        b = self._infer_bindings[self.current]
        out = []
        for i in range(0, len(x), batch_size):
            b.bind_cpu_input("x", np.ascontiguousarray(x[i:i + batch_size], dtype=np.float32))
            b.bind_output("logits")
            self.infer_session.run_with_iobinding(b)
            out.append(b.get_outputs()[0].numpy())
        return np.concatenate(out) if out else np.zeros((0, self.bundle.model["n_classes"]), np.float32)

    # -- state in and out ------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """Copies of the current trainable weights (and momentum), keyed by bundle name; frozen
        weights never change, so they stay in the bundle and out of checkpoints."""
        self._refresh_bounds()  # we are reading everything anyway: tighten the bounds for free
        return {n: a.copy() for n, a in self._host(self.current).items()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for n in self.state_names:
            target = self.sides[self.current][n]
            if isinstance(target, ort.OrtValue):
                target.update_inplace(np.ascontiguousarray(state[n], dtype=np.float32))
            else:
                np.copyto(target, state[n])
        self._refresh_bounds()

    @property
    def providers(self) -> list[str]:
        return self.train_session.get_providers()
