"""SGD applied in place from a step's gradient factors (the CPU runtime's update; numpy only).

The step-factors graph (bundle.STEP_FACTORS_GRAPH) runs the DFA step up to its gradients and
returns them small: a linear weight's gradient as its two factors delta [rows, out] and input
[rows, in], every other trainable tensor's (biases, LayerNorm gamma and beta, conv kernels) as
itself. The engine first proves the step finite from the graph's update bounds (step_bounds), and
only then calls `apply_sgd`, which writes the one copy of the weights and momentum in place:

    momentum:  G = delta^T input (into one shared scratch);  v *= mu;  v += G;  W -= lr v
    plain:     W -= G                  (the graph folded lr into delta, as train_step.onnx does)

So the state is held once (no ping-pong sides), a refused step touches nothing, and the only
weight-sized temporary is the scratch, the size of the largest linear weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..bundle import DELTA, INPUT, grad_name, momentum_name


@dataclass(frozen=True)
class GradOutputs:
    """Which outputs of a step-factors graph hold each trainable tensor's gradient."""
    direct: dict[str, str]                 # param -> its gradient's output name
    factored: dict[str, tuple[str, str]]   # param -> (delta output, input output)

    @classmethod
    def of(cls, params: list[str], outputs: set[str]) -> "GradOutputs | None":
        """The gradient outputs for `params`, or None where the graph lacks any of them."""
        direct, factored = {}, {}
        for p in params:
            if grad_name(p) in outputs:
                direct[p] = grad_name(p)
            elif {grad_name(p, DELTA), grad_name(p, INPUT)} <= outputs:
                factored[p] = (grad_name(p, DELTA), grad_name(p, INPUT))
            else:
                return None
        return cls(direct, factored)

    @property
    def names(self) -> list[str]:
        return [*self.direct.values(), *(n for pair in self.factored.values() for n in pair)]


def scratch_for(shapes: list[tuple[int, ...]]) -> np.ndarray:
    """One flat float32 buffer that every factored weight's gradient fits in."""
    return np.empty(max((int(np.prod(s)) for s in shapes), default=0), np.float32)


def apply_sgd(state: dict[str, np.ndarray], grads: GradOutputs, values: dict[str, np.ndarray],
              lr: float, momentum: float, scratch: np.ndarray) -> None:
    """torch.optim.SGD (dampening 0) on `state` in place, from the graph's outputs `values`
    (numpy arrays the caller owns: direct gradients are reused as temporaries)."""
    lr32, mu32 = np.float32(lr), np.float32(momentum)

    def step(p: str, g: np.ndarray) -> None:    # g: this tensor's gradient, free to overwrite
        w = state[p]
        if momentum:
            v = state[momentum_name(p)]
            v *= mu32
            v += g
            np.multiply(v, lr32, out=g)
        w -= g

    for p, name in grads.direct.items():
        step(p, values[name])
    for p, (delta_name, input_name) in grads.factored.items():   # one at a time: they share the scratch
        g = scratch[:state[p].size].reshape(state[p].shape)
        np.matmul(values[delta_name].T, values[input_name], out=g)
        step(p, g)
