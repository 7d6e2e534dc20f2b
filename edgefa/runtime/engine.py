"""Run a bundle's graphs in onnxruntime with the weights in ping-pong buffers.

Every trainable tensor (weights, biases, momentum) has two preallocated buffers, A and B. Step k
reads side k%2 and writes the other through IOBinding, so a step allocates and copies nothing
weight-sized; accepting a step is flipping which side is current, and refusing one (NaN/Inf) is
simply not flipping. Feedback matrices are bound once and never change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from ..errors import EdgefaError
from ..bundle import Bundle, feedback_input_name, momentum_name, next_name, param_shapes

# Chosen automatically in this order when the installed onnxruntime offers them. TensorRT is
# taken only when asked for (`--provider TensorrtExecutionProvider`): it builds an engine per shape.
AUTO_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(requested: str | None = None) -> tuple[str, ...]:
    """The execution providers to use: `requested` (then CPU as fallback), or the best available."""
    available = ort.get_available_providers()
    if requested:
        if requested not in available:
            raise EdgefaError(f"execution provider {requested!r} is not available here "
                              f"(this onnxruntime offers: {', '.join(available)})")
        return tuple(dict.fromkeys([requested, "CPUExecutionProvider"]))
    return tuple(p for p in AUTO_PROVIDERS if p in available)


@dataclass
class StepResult:
    loss: float
    accepted: bool
    logits: np.ndarray


def _session(path, providers, threads: int | None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=list(providers))


class OrtEngine:
    def __init__(self, bundle: Bundle, providers: tuple[str, ...] | None = None,
                 threads: int | None = None):
        providers = providers or choose_providers()
        self.bundle = bundle
        self.momentum = float(bundle.manifest["optimizer"]["momentum"])
        self.train_session = _session(bundle.graph_path("train_step"), providers, threads)
        self.infer_session = _session(bundle.graph_path("infer"), providers, threads)
        self.params = list(param_shapes(bundle.model))
        self.state_names = self.params + ([momentum_name(p) for p in self.params] if self.momentum else [])

        initial = dict(bundle.weights)
        initial.update({momentum_name(p): np.zeros_like(bundle.weights[p]) for p in self.params})
        self.sides = [{n: np.array(initial[n], dtype=np.float32, order="C") for n in self.state_names},
                      {n: np.empty_like(initial[n], dtype=np.float32) for n in self.state_names}]
        self.feedback = {n: np.ascontiguousarray(a) for n, a in bundle.feedback.items()}
        self.current = 0
        self._train_bindings = [self._bind_train(k) for k in (0, 1)]
        self._infer_bindings = [self._bind_infer(k) for k in (0, 1)]

    # -- bindings: made once, reused every step --------------------------------------------------
    def _bind_train(self, k: int):
        b = self.train_session.io_binding()
        src, dst = self.sides[k], self.sides[1 - k]
        for n in self.state_names:
            b.bind_ortvalue_input(n, ort.OrtValue.ortvalue_from_numpy(src[n]))
            b.bind_ortvalue_output(next_name(n), ort.OrtValue.ortvalue_from_numpy(dst[n]))
        for layer, arr in self.feedback.items():
            b.bind_ortvalue_input(feedback_input_name(layer), ort.OrtValue.ortvalue_from_numpy(arr))
        return b

    def _bind_infer(self, k: int):
        b = self.infer_session.io_binding()
        for n in self.params:
            b.bind_ortvalue_input(n, ort.OrtValue.ortvalue_from_numpy(self.sides[k][n]))
        return b

    # -- training and inference ------------------------------------------------------------------
    def step(self, x: np.ndarray, labels: np.ndarray, lr: float) -> StepResult:
        """One DFA step. The new state is accepted only if the loss and every new tensor are finite."""
        b = self._train_bindings[self.current]
        b.bind_cpu_input("x", np.ascontiguousarray(x, dtype=np.float32))
        b.bind_cpu_input("labels", np.ascontiguousarray(labels, dtype=np.int64))
        b.bind_cpu_input("lr", np.array(lr, dtype=np.float32))
        # Outputs whose shape follows the batch are bound afresh each run: a binding reuses the
        # previous run's buffer, which fails when the batch size changes.
        b.bind_output("loss")
        b.bind_output("logits")
        self.train_session.run_with_iobinding(b)
        loss_value, logits_value = b.get_outputs()[-2:]
        loss = float(loss_value.numpy())
        accepted = np.isfinite(loss) and self._all_finite(self.sides[1 - self.current])
        if accepted:
            self.current = 1 - self.current
        return StepResult(loss, bool(accepted), logits_value.numpy())

    @staticmethod
    def _all_finite(tensors: dict[str, np.ndarray]) -> bool:
        # A sum is one vectorised pass and any NaN or Inf poisons it: no weight-sized bool array.
        return all(np.isfinite(np.sum(a)) for a in tensors.values())

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
        """Copies of the current weights (and momentum), keyed by bundle name."""
        return {n: a.copy() for n, a in self.sides[self.current].items()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for n in self.state_names:
            np.copyto(self.sides[self.current][n], state[n])

    @property
    def providers(self) -> list[str]:
        return self.train_session.get_providers()
