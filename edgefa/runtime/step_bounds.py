"""Proving a DFA step finite without reading its output again (shared by every engine backend).

Checking every new weight for NaN/Inf is a full pass over memory (about 3.5 ms for 8 x 1024^2
weights here, an eighth of a step; on a GPU it is also a copy back to the host). The train-step
graph instead returns, per layer, G_l >= |every element of the step's gradient| (Cauchy-Schwarz
on the outer product, from the small [batch, width] tensors). We keep per-layer upper bounds on
|W| and |v| and advance them with the optimizer's own recurrence:

    v' = mu v + g   ->  V' = mu V + G          W' = W - lr v'  ->  M' = M + lr V'

All inputs finite (G finite implies the batch and deltas were) and every bound below 1e37 means no
operation can overflow float32, so the new state is finite. The bounds are reset to the exact
max |W|, max |v| whenever the state is read or loaded (checkpoints), so they stay tight.
"""

from __future__ import annotations

import numpy as np

from ..bundle import layer_params, momentum_name
from ..errors import EdgefaError

OVERFLOW_LIMIT = 1e37  # float32 max is 3.4e38: a 34x margin for rounding inside the Gemms


class StepBounds:
    """Per-layer bounds `w` >= max |W|, |b| and `v` >= max |momentum|, in the graph's layer order."""

    def __init__(self, layers: list[str], momentum: float):
        self.layers, self.momentum = list(layers), float(momentum)
        self.w = self.v = np.zeros(len(self.layers))

    def reset(self, side: dict[str, np.ndarray]) -> None:
        """The exact maxima of one side's host arrays (one pass; done at load and checkpoint only)."""
        def max_abs(names):
            return max(max(float(side[n].max()), -float(side[n].min())) if side[n].size else 0.0 for n in names)

        self.w = np.array([max_abs(layer_params(l)) for l in self.layers])
        self.v = (np.array([max_abs([momentum_name(p) for p in layer_params(l)]) for l in self.layers])
                  if self.momentum else np.zeros(len(self.layers)))
        if not (np.isfinite(self.w).all() and np.isfinite(self.v).all()):
            raise EdgefaError("the weights or momentum to start from hold NaN or Inf")

    def advance(self, loss: float, update_bound: np.ndarray, lr: float) -> bool:
        """Whether the step that gave `loss` and `update_bound` is proven finite; if so the
        bounds move on to the new state, else they stay with the old one."""
        update_bound = np.asarray(update_bound, dtype=np.float64)
        if self.momentum:
            v = self.momentum * self.v + update_bound
            w = self.w + lr * v
        else:  # the graph folded lr into the update already
            v, w = self.v, self.w + update_bound
        accepted = bool(np.isfinite(loss) and np.isfinite(update_bound).all()
                        and max(w.max(initial=0.0), v.max(initial=0.0)) < OVERFLOW_LIMIT)
        if accepted:
            self.w, self.v = w, v
        return accepted
