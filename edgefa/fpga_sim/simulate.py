"""Fine-tune a bundle in fixed point and, beside it, in float32 through the real runtime.

Both runs start from the bundle's weights and see the same batches in the same order (the
runtime's seeded `batch_indices`) with the same learning rate. The float32 run is `train_step.onnx`
in onnxruntime, the step a device runs; the fixed-point run is `datapath.FixedPointDFA`. A
Bradley-Terry bundle trains on pairs (the data the device's own fine-tuning reads) and is judged by
preference accuracy, the share of pairs ranked right.

What comes back (all figures per run, none averaged across classes unless named):
  * accuracy (or preference accuracy) of both on the evaluation data, before and after;
  * per-layer SQNR, two kinds:
      - datapath SQNR of each layer's output on the evaluation data: the fixed-point forward pass
        against a float64 forward pass with the *same* (dequantized) weights, so it measures the
        arithmetic alone;
      - weight SQNR after the run: fixed-point weights against the float32 run's, so it measures
        how far the two trainings drifted apart (a frozen layer's: its quantization alone);
    SQNR = 10 log10(sum ref^2 / sum (fixed - ref)^2) over every element of the layer (None where
    the two are identical);
  * values written and values that overflowed (wrapped or saturated) per tensor class;
  * weight updates that were non-zero and rounded to zero.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from ..bundle import Bundle
from ..shared.datasets import Dataset
from ..shared.batches import batch_indices
from ..runtime.engine import OrtEngine
from ..errors import DataError
from ..runtime.finetune import preference_accuracy, standardize, standardize_pairs, wanted_data
from ..shared.preference_pairs import PreferencePairs
from .config import FxpConfig
from .datapath import FixedPointDFA
from .scope import is_pairs, require_in_scope

SQNR_SAMPLES = 256


@dataclass
class SimulateConfig:
    steps: int
    batch_size: int = 32
    lr: float | None = None
    seed: int = 0                   # batch order (the runtime's)
    float_reference: bool = True    # also run the float32 runtime beside the fixed-point one


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float | None:
    """10 log10(signal / noise) over all elements; None when the two are identical."""
    ref, diff = np.asarray(reference, np.float64), np.asarray(test, np.float64) - np.asarray(reference, np.float64)
    noise = float(np.sum(diff * diff))
    if noise == 0.0:
        return None
    return float(10 * np.log10(max(float(np.sum(ref * ref)), 1e-300) / noise))


def float_forward(weights: dict[str, np.ndarray], layers: list[str], activation: str, x: np.ndarray) -> list[np.ndarray]:
    """Every layer's output in float64 (hidden layers after the activation, then the logits)."""
    outs, h = [], np.asarray(x, np.float64)
    for i, name in enumerate(layers):
        a = h @ weights[f"{name}.weight"].T.astype(np.float64) + weights[f"{name}.bias"]
        h = a if i == len(layers) - 1 else (np.maximum(a, 0) if activation == "relu" else np.tanh(a))
        outs.append(h)
    return outs


def datapath_sqnr(fixed: FixedPointDFA, x: np.ndarray) -> dict[str, float | None]:
    """Per layer: fixed-point outputs against float64 outputs with the same dequantized weights."""
    act = fixed.f["activations"]
    saved, fixed.counters = fixed.counters, type(fixed.counters)()
    try:
        trace = fixed.forward(fixed.quantize_input(x))
    finally:
        fixed.counters = saved
    fixed_outs = [act.to_float(h) for h in trace.hidden] + [act.to_float(trace.logits)]
    ref = float_forward(fixed.weights_float(), fixed.layers, fixed.activation, x)
    return {name: sqnr_db(r, f) for name, r, f in zip(fixed.layers, ref, fixed_outs)}


def _accuracy(logits: np.ndarray, y: np.ndarray) -> float | None:
    return float((logits.argmax(axis=1) == y).mean()) if len(y) else None


def _fixed_accuracy(fixed: FixedPointDFA, a: np.ndarray, b: np.ndarray) -> float | None:
    """Accuracy of samples `a` with labels `b`; a scorer's: the share of pairs (a_i, b_i) ranked
    right, a tie counting as wrong (runtime.finetune.preference_accuracy)."""
    if fixed.pairs:
        return float((fixed.predict(a)[:, 0] > fixed.predict(b)[:, 0]).mean()) if len(a) else None
    return _accuracy(fixed.predict(a), b)


def _float_accuracy(engine: OrtEngine, pairs: bool, a: np.ndarray, b: np.ndarray) -> float | None:
    if pairs:
        return preference_accuracy(engine, a, b) if len(a) else None
    return _accuracy(engine.predict_logits(a), b)


def _prepare(bundle: Bundle, data, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(samples, labels), or a scorer's (chosen, rejected), checked and scaled as the device does."""
    if is_pairs(bundle.manifest):
        if not isinstance(data, PreferencePairs):
            raise DataError(f"{what}: this bundle trains on {wanted_data(True)}")
        return standardize_pairs(bundle, data)
    if isinstance(data, PreferencePairs):
        raise DataError(f"{what}: this bundle trains on {wanted_data(False)}")
    return standardize(bundle, data, what), data.y


def float_reference_engine(bundle: Bundle) -> OrtEngine:
    """The float32 run's engine. It trains the arrays it is given in place (a device holds its
    weights once), so it gets copies: the bundle is read again by later runs (a sweep). One
    intra-op thread: a pool would spin between steps and starve the fixed-point arithmetic of the
    second core. A caller may build it before any work, so that a graph that does not load
    (a BundleError naming it) is the first and only thing said."""
    return OrtEngine(replace(bundle, weights={n: a.copy() for n, a in bundle.weights.items()}), threads=1)


@dataclass
class SimulationInputs:
    """What `fpga simulate` and `fpga sweep` run on, every part checked (load_inputs)."""
    bundle: Bundle
    train: Dataset | PreferencePairs           # pairs for a bradley-terry bundle
    eval: Dataset | PreferencePairs | None
    fxp: FxpConfig
    engine: OrtEngine             # the float32 reference


def load_inputs(bundle_path, data_spec: str, eval_spec: str | None, config_path=None,
                lr: float | None = None) -> SimulationInputs:
    """Read and check, in the order that refuses each mistake before the work it would spoil: the
    fixed-point config, the bundle (one the datapath models), the learning rate in the config's
    format, the data, then the bundle's graphs for the float32 reference. One line (EdgefaError)."""
    from ..bundle import read_bundle
    from ..runtime.finetune import load_finetune_data
    from .config import load_config

    fxp = load_config(config_path)       # a bad config is refused before anything is read or run
    bundle = read_bundle(bundle_path)
    require_in_scope(bundle.manifest, bundle_path)     # a bundle the datapath does not model: before the data
    fxp.learning_rate(bundle.manifest["optimizer"]["lr"] if lr is None else lr)   # one it cannot hold, too
    train = load_finetune_data(bundle, data_spec)     # pairs for a bradley-terry bundle, as the device reads them
    evaluation = load_finetune_data(bundle, eval_spec) if eval_spec else None
    engine = float_reference_engine(bundle)           # graphs that do not load: one line, before any output
    return SimulationInputs(bundle, train, evaluation, fxp, engine)


def simulate(bundle: Bundle, train: Dataset | PreferencePairs, config: SimulateConfig, fxp: FxpConfig,
             eval_data: Dataset | PreferencePairs | None = None,
             on_step: Callable[[int, float, float | None], None] | None = None,
             engine: OrtEngine | None = None) -> dict:
    """`engine`: the float reference's, from float_reference_engine (built here when not given)."""
    require_in_scope(bundle.manifest, str(bundle.path))        # before the data is looked at
    pairs = is_pairs(bundle.manifest)
    # a, b: samples and labels, or a scorer's chosen and rejected items
    a, b = _prepare(bundle, train, train.name)
    a_eval, b_eval = _prepare(bundle, eval_data, eval_data.name) if eval_data else (a, b)
    fixed = FixedPointDFA(bundle, fxp, config.lr)
    if not config.float_reference:
        engine = None
    elif engine is None:
        engine = float_reference_engine(bundle)
    fixed_step = fixed.step_pairs if pairs else fixed.step
    float_step = None if engine is None else engine.step_pairs if pairs else engine.step

    acc_before = {"fixed": _fixed_accuracy(fixed, a_eval, b_eval),
                  "float32": _float_accuracy(engine, pairs, a_eval, b_eval) if engine else None}
    losses_fixed, losses_float = [], []
    for step in range(config.steps):
        idx = batch_indices(len(a), config.batch_size, config.seed, step)
        losses_fixed.append(fixed_step(a[idx], b[idx]))
        if engine:
            losses_float.append(float_step(a[idx], b[idx], fixed.lr).loss)
        if on_step:
            on_step(step + 1, losses_fixed[-1], losses_float[-1] if engine else None)

    acc_after = {"fixed": _fixed_accuracy(fixed, a_eval, b_eval),
                 "float32": _float_accuracy(engine, pairs, a_eval, b_eval) if engine else None}
    weight_sqnr = None
    if engine:
        final = {**bundle.weights, **engine.state()}       # a frozen layer keeps the bundle's weights
        fixed_w = fixed.weights_float()
        weight_sqnr = {name: sqnr_db(np.concatenate([final[f"{name}.weight"].ravel(), final[f"{name}.bias"]]),
                                     np.concatenate([fixed_w[f"{name}.weight"].ravel(), fixed_w[f"{name}.bias"]]))
                       for name in fixed.layers}
    c = fixed.counters
    return {
        "bundle": str(bundle.path),
        "steps": config.steps, "batch_size": config.batch_size, "seed": config.seed,
        "lr": fixed.lr, "lr_fixed_point": fixed.effective_lr,
        "lr_mode": fxp.lr_mode if fxp.lr_mode == "multiplier" else f"shift {fixed.lr_shift}",
        "config": fxp.describe(),
        "metric": "preference accuracy" if pairs else "accuracy",
        "trained_layers": list(fixed.trained),
        "eval_samples": int(len(a_eval)), "eval_data": "eval" if eval_data else "train",
        "accuracy_before": acc_before, "accuracy_after": acc_after,
        "loss_first": {"fixed": losses_fixed[0] if losses_fixed else None,
                       "float32": losses_float[0] if losses_float else None},
        "loss_last": {"fixed": losses_fixed[-1] if losses_fixed else None,
                      "float32": losses_float[-1] if losses_float else None},
        "datapath_sqnr_db": datapath_sqnr(fixed, a_eval[:SQNR_SAMPLES]),     # a scorer: its chosen items
        "weight_sqnr_db": weight_sqnr,
        "overflow": c.summary(),
        "updates": c.updates,
        "updates_rounded_to_zero": c.updates_rounded_to_zero,
    }
