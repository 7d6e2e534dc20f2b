"""One DFA fine-tuning step of a bundle's MLP in bit-exact fixed point.

The same step as `train_step.onnx` (see exporters/onnx_graphs.py), operation by operation:

    forward   a_l = h_{l-1} W_l^T + b_l   matmul into the accumulator, bias added there, then
                                          requantized to the activation format
              h_l = f(a_l)                ReLU exactly; tanh by table (lut or pwl)
    error     e = (softmax(z) - onehot) / batch        ops.SoftmaxError, into the error format
    local     delta_l = (e B_l) * f'(a_l)              e B_l into the accumulator, requantized to
                                                       errors; relu' is a mask, tanh' = 1 - h^2
    gradient  g_l = delta_l^T h_{l-1}, sum_batch delta  into the accumulator, then gradients
    momentum  v <- mu v + g                             mu held in the scalar format, one rounding
                                                       into the optimizer-state format
    update    W <- W - lr v                             lr a multiplier (scalar format) or a
                                                       power-of-two shift; the new weight is
                                                       rounded once, by the weights' rounding

The rounding of the update is where round-to-nearest stalls (an update below half a weight LSB is
lost every time) and stochastic rounding does not (it is kept with probability |update| / LSB):
Gupta et al., "Deep learning with limited numerical precision", ICML 2015.

With `trainable: last:K` only the last K layers get an error, a gradient and an update; the
frozen layers below are the forward matmuls alone. A Bradley-Terry bundle (`step_pairs`) runs the
chosen and the rejected items through one forward of 2 x batch rows, as train_step.onnx does, and
takes its error from the same softmax unit: the two-class softmax error of (s_w, s_l) with the
chosen item as the label is (-sigmoid(-(s_w - s_l)), sigmoid(-(s_w - s_l))) / batch (scope.py).

Counters per tensor class: values written and values that overflowed their format (wrapped or
saturated); and weight updates that were non-zero before rounding and zero after.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..bundle import Bundle, trainable_layers, trainable_params
from ..errors import EdgefaError
from .config import TENSOR_CLASSES, FxpConfig
from .fixed import FixedFormat, Quantized, quantize, requantize, shift_round
from .ops import FunctionTable, SoftmaxError, add, matmul_requantize
from .scope import is_pairs, require_in_scope

ONE = FixedFormat(2, 2)            # the integer 1 (raw 1, no fraction bits): sums over the batch


@dataclass
class Counters:
    written: Counter = field(default_factory=Counter)
    overflowed: Counter = field(default_factory=Counter)
    updates: int = 0                      # weight and bias elements updated with a non-zero step
    updates_rounded_to_zero: int = 0      # ... of which the rounded new value equals the old one

    def note(self, tensor_class: str, q: Quantized) -> np.ndarray:
        self.count(tensor_class, q.raw.size, q.overflows)
        return q.raw

    def count(self, tensor_class: str, values: int, overflowed: int) -> None:
        self.written[tensor_class] += values
        self.overflowed[tensor_class] += overflowed

    def summary(self) -> dict:
        return {c: {"values": int(self.written[c]), "overflowed": int(self.overflowed[c]),
                    "rate": (self.overflowed[c] / self.written[c]) if self.written[c] else 0.0}
                for c in TENSOR_CLASSES}


@dataclass
class ForwardTrace:
    layer_inputs: list[np.ndarray]        # h_{l-1} for every layer (raw, activation format)
    hidden: list[np.ndarray]              # h_l for the hidden layers
    logits: np.ndarray


class FixedPointDFA:
    """A bundle's MLP held in fixed point, trained by the DFA step above."""

    def __init__(self, bundle: Bundle, config: FxpConfig, lr: float | None = None):
        require_in_scope(bundle.manifest, str(bundle.path))
        model = bundle.model
        self.config, self.model, self.where = config, model, str(bundle.path)
        self.layers = [layer["name"] for layer in model["layers"]]
        self.trained = trainable_layers(model)     # every layer, or the last K
        self.pairs = is_pairs(bundle.manifest)
        self.activation = model["activation"]
        self.f = {c: config.fmt(c) for c in TENSOR_CLASSES}
        self.rng = np.random.default_rng(config.seed)
        self.counters = Counters()
        self.momentum = float(bundle.manifest["optimizer"]["momentum"])
        self.lr = float(bundle.manifest["optimizer"]["lr"] if lr is None else lr)

        self.params = {n: self._q("weights", a) for n, a in bundle.weights.items()}
        self.velocity = {n: np.zeros_like(self.params[n]) for n in trainable_params(model)}
        self.feedback = {n: self._q("feedback", a) for n, a in bundle.feedback.items()}
        scalar = config.scalar_format
        self.mu = quantize(self.momentum, scalar).raw if self.momentum else None
        self.lr_raw, self.lr_fmt, self.lr_shift = config.learning_rate(self.lr)   # never clamped silently
        self.effective_lr = float(self.lr_fmt.to_float(self.lr_raw))
        self.table = None if self.activation == "relu" else FunctionTable(
            "tanh", config.table_method, config.table_size, config.table_input_range,
            self.f["activations"], self.f["activations"])
        self.softmax_error = SoftmaxError(self.f["activations"], self.f["errors"], config.exp_table_size,
                                          config.softmax_frac_bits)

    def _q(self, tensor_class: str, values) -> np.ndarray:
        return self.counters.note(tensor_class, quantize(values, self.f[tensor_class], self.rng))

    def _requant(self, tensor_class: str, raw, src_frac: int) -> np.ndarray:
        return self.counters.note(tensor_class, requantize(raw, src_frac, self.f[tensor_class], self.rng))

    def _matmul(self, a, a_fmt, b, b_fmt, out_class: str, init=None) -> np.ndarray:
        """a @ b through the accumulator into `out_class`'s format (the MAC array's job)."""
        q, acc_over = matmul_requantize(a, a_fmt, b, b_fmt, self.f["accumulators"], self.f[out_class],
                                        self.rng, init)
        self.counters.count("accumulators", q.raw.size, acc_over)
        return self.counters.note(out_class, q)

    # --- forward --------------------------------------------------------------------------------
    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        return self._q("activations", x)

    def forward(self, x_raw: np.ndarray) -> ForwardTrace:
        act, w_fmt, acc = self.f["activations"], self.f["weights"], self.f["accumulators"]
        h, inputs, hidden = x_raw, [], []
        for i, name in enumerate(self.layers):
            inputs.append(h)
            bias = shift_round(self.params[f"{name}.bias"], w_fmt.frac_bits - acc.frac_bits, acc.rounding, self.rng)
            a = self._matmul(h, act, self.params[f"{name}.weight"].T, w_fmt, "activations", init=bias)
            if i == len(self.layers) - 1:
                return ForwardTrace(inputs, hidden, a)
            h = np.maximum(a, 0) if self.table is None else self.table(a)
            hidden.append(h)
        raise AssertionError("a model has at least one layer")

    def predict(self, X: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Logits as real values (float64), without touching the counters."""
        saved = self.counters
        self.counters = Counters()
        try:
            out = [self.f["activations"].to_float(self.forward(self.quantize_input(X[i:i + batch_size])).logits)
                   for i in range(0, len(X), batch_size)]
        finally:
            self.counters = saved
        return np.concatenate(out) if out else np.zeros((0, self.model["n_classes"]))

    # --- the step -------------------------------------------------------------------------------
    def _local_error(self, e: np.ndarray, name: str, h: np.ndarray) -> np.ndarray:
        err, fb, act = self.f["errors"], self.f["feedback"], self.f["activations"]
        projected = self._matmul(e, err, self.feedback[name], fb, "errors")
        if self.table is None:
            return np.where(h > 0, projected, 0)                    # relu' = (h > 0): a mask, exact
        one = np.int64(1) << np.int64(2 * act.frac_bits)
        deriv = self._requant("activations", one - h * h, 2 * act.frac_bits)   # 1 - h^2
        return self._requant("errors", projected * deriv, err.frac_bits + act.frac_bits)

    def _update(self, name: str, grad: np.ndarray) -> None:
        """v <- mu v + g; W <- W - lr v, each rounded once into its format."""
        g_fmt, state, w_fmt = self.f["gradients"], self.f["optimizer_state"], self.f["weights"]
        if self.momentum:
            mu_v = self.mu * self.velocity[name]
            mu_v_fmt = FixedFormat(min(64, state.width + self.config.scalar_format.width),
                                   state.int_bits + self.config.scalar_format.int_bits)
            v = self.counters.note("optimizer_state", add(mu_v, mu_v_fmt, grad, g_fmt, state, self.rng))
            self.velocity[name], v_fmt = v, state
        else:
            v, v_fmt = grad, g_fmt
        step = self.lr_raw * v                                       # lr v, exact
        step_fmt = FixedFormat(min(64, v_fmt.width + self.lr_fmt.width), v_fmt.int_bits + self.lr_fmt.int_bits)
        old = self.params[name]
        new = self.counters.note("weights", add(old, w_fmt, -step, step_fmt, w_fmt, self.rng))
        moving = step != 0
        self.counters.updates += int(np.count_nonzero(moving))
        self.counters.updates_rounded_to_zero += int(np.count_nonzero(moving & (new == old)))
        self.params[name] = new

    def step(self, x: np.ndarray, labels: np.ndarray) -> float:
        """One DFA step on a standardized float batch; returns the loss of the fixed-point logits."""
        if self.pairs:
            raise EdgefaError(f"{self.where}: a bradley-terry bundle trains on pairs (step_pairs), not labels")
        act = self.f["activations"]
        trace = self.forward(self.quantize_input(x))
        self._learn(trace, self.counters.note("errors", self.softmax_error(trace.logits, labels, self.rng)))
        z = act.to_float(trace.logits)
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(labels)), labels].mean())

    def step_pairs(self, chosen: np.ndarray, rejected: np.ndarray) -> float:
        """One DFA step of a Bradley-Terry scorer on standardized pairs (row i of `chosen` preferred
        to row i of `rejected`); returns the mean softplus(-(s_w - s_l)) of the fixed-point scores."""
        if not self.pairs:
            raise EdgefaError(f"{self.where}: this bundle trains on labels (step), not on pairs")
        n = len(chosen)
        trace = self.forward(self.quantize_input(np.concatenate([chosen, rejected])))   # chosen rows first
        scores = trace.logits[:, 0]
        pair_error = self.softmax_error(np.stack([scores[:n], scores[n:]], axis=1), np.zeros(n, np.int64), self.rng)
        e = Quantized(np.concatenate([pair_error.raw[:, 0], pair_error.raw[:, 1]])[:, None], pair_error.fmt,
                      pair_error.overflows)                                     # [2n, 1], as the rows
        self._learn(trace, self.counters.note("errors", e))
        margin = self.f["activations"].to_float(scores[:n] - scores[n:])
        return float(np.logaddexp(0.0, -margin).mean())

    def _learn(self, trace: ForwardTrace, e: np.ndarray) -> None:
        """The local errors, gradients and updates of the trained layers; frozen ones get none."""
        act, err, trained = self.f["activations"], self.f["errors"], set(self.trained)
        deltas = {self.layers[-1]: e}
        for name, h in zip(self.layers[:-1], trace.hidden):
            if name in trained:
                deltas[name] = self._local_error(e, name, h)
        for name, h_in in zip(self.layers, trace.layer_inputs):
            if name not in trained:
                continue
            d = deltas[name]
            gw = self._matmul(d.T, err, h_in, act, "gradients")
            gb = self._matmul(np.ones((1, len(d)), np.int64), ONE, d, err, "gradients")[0]
            self._update(f"{name}.weight", gw)
            self._update(f"{name}.bias", gb)

    # --- read-out -------------------------------------------------------------------------------
    def weights_float(self) -> dict[str, np.ndarray]:
        return {n: self.f["weights"].to_float(r) for n, r in self.params.items()}

    def velocity_float(self) -> dict[str, np.ndarray]:
        fmt = self.f["optimizer_state"] if self.momentum else self.f["gradients"]
        return {n: fmt.to_float(r) for n, r in self.velocity.items()}
