"""On-device DFA fine-tuning: the loop around the engine (batches, refusals, checkpoints, timing)."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..bundle import Bundle
from ..data.datasets import Dataset
from ..errors import DataError, EdgefaError
from ..profiling.memory import peak_rss_bytes
from .batches import batch_indices
from .engine import OrtEngine, choose_providers
from .state import DeviceState, load_state, save_state


@dataclass
class FinetuneConfig:
    steps: int                      # the total step count to reach (a resumed run does the rest)
    batch_size: int = 32
    lr: float | None = None         # None: the bundle's optimizer.lr
    checkpoint_every: int = 50
    max_refusals: int = 3           # stop after this many refused (NaN/Inf) steps
    seed: int = 0
    threads: int | None = None
    provider: str | None = None     # None: the best available (CUDA, then CPU)


class TooManyRefusals(EdgefaError):
    pass


def standardize(bundle: Bundle, ds: Dataset, what: str) -> np.ndarray:
    """Check a data set against the bundle and scale it as the host did (global mean and std)."""
    model = bundle.model
    if ds.X.ndim != 2 or ds.X.shape[1] != model["in_features"]:
        raise DataError(f"{what}: samples have {ds.X.shape[1:]} features, the bundle expects {model['in_features']}")
    if len(ds.y) and (ds.y.min() < 0 or ds.y.max() >= model["n_classes"]):
        raise DataError(f"{what}: labels must lie in 0..{model['n_classes'] - 1}")
    s = bundle.manifest["input"]["standardize"]
    return ((ds.X.astype(np.float64) - s["mean"]) / s["std"]).astype(np.float32)


def accuracy(engine: OrtEngine, X: np.ndarray, y: np.ndarray) -> float:
    return float((engine.predict_logits(X).argmax(axis=1) == y).mean()) if len(y) else float("nan")


def finetune(bundle: Bundle, train: Dataset, config: FinetuneConfig, eval_data: Dataset | None = None,
             on_step: Callable[[int, float], None] | None = None) -> dict:
    engine = OrtEngine(bundle, choose_providers(config.provider), config.threads)
    lr = bundle.manifest["optimizer"]["lr"] if config.lr is None else config.lr
    X, y = standardize(bundle, train, "training data"), train.y
    Xe, ye = (standardize(bundle, eval_data, "evaluation data"), eval_data.y) if eval_data else (None, None)

    saved = load_state(bundle, engine.state_names)
    start, refused = (saved.step, list(saved.refused_steps)) if saved else (0, [])
    if saved:
        engine.load_state(saved.tensors)
    acc_before = accuracy(engine, Xe, ye) if Xe is not None else None

    def checkpoint(step: int) -> None:
        save_state(bundle, DeviceState(step, engine.state(), refused))

    step_times, losses = [], []
    for step in range(start, config.steps):
        idx = batch_indices(len(y), config.batch_size, config.seed, step)
        t0 = time.perf_counter()
        result = engine.step(X[idx], y[idx], lr)
        step_times.append(time.perf_counter() - t0)
        losses.append(result.loss)
        if not result.accepted:
            refused.append(step)
            warnings.warn(f"step {step} refused: non-finite loss or weights; kept the previous weights "
                          f"({len(refused)} refused, limit {config.max_refusals})", stacklevel=2)
            if len(refused) >= config.max_refusals:
                checkpoint(step + 1)
                raise TooManyRefusals(f"stopped at step {step}: {len(refused)} steps refused for NaN/Inf "
                                      f"(steps {refused}); the last good weights are saved")
        done = step + 1
        if config.checkpoint_every and done % config.checkpoint_every == 0:
            checkpoint(done)
        if on_step:
            on_step(done, result.loss)
    final_step = max(start, config.steps)
    checkpoint(final_step)

    ms = np.array(step_times) * 1e3
    return {
        "bundle": str(bundle.path),
        "providers": engine.providers,
        "resumed_from_step": start,
        "final_step": final_step,
        "steps_run": len(step_times),
        "batch_size": config.batch_size,
        "lr": lr,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "refused_steps": refused,
        "step_time_ms_median": float(np.median(ms)) if len(ms) else None,
        "step_time_ms_p95": float(np.percentile(ms, 95)) if len(ms) else None,
        "accuracy_before": acc_before,
        "accuracy_after": accuracy(engine, Xe, ye) if Xe is not None else None,
        "peak_rss_bytes": peak_rss_bytes(),
        "bundle_bytes": bundle.size_bytes(),
    }


def evaluate(bundle: Bundle, data: Dataset, threads: int | None = None) -> dict:
    """Accuracy of the bundle's current weights (its saved device state when present)."""
    engine = OrtEngine(bundle, threads=threads)
    saved = load_state(bundle, engine.state_names)
    if saved:
        engine.load_state(saved.tensors)
    X = standardize(bundle, data, "evaluation data")
    return {"accuracy": accuracy(engine, X, data.y), "samples": len(data.y),
            "step": saved.step if saved else 0}
