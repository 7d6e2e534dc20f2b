"""On-device DFA fine-tuning: the loop around the engine (batches, refusals, checkpoints, timing).

A classifier bundle trains on labelled samples (`X`, `y`) and reports accuracy; a Bradley-Terry
bundle (a scorer, manifest `loss: "bradley-terry"`) trains on pairs (`chosen`, `rejected`: row i
of `chosen` preferred to row i of `rejected`) and reports preference accuracy, the share of pairs
scored s(chosen) > s(rejected). Batch k is pairs `batch_indices(n_pairs, batch, seed, k)`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pathlib import Path

from ..bundle import LOSS_BRADLEY_TERRY, Bundle
from ..data.datasets import Dataset, Standardizer
from ..data.preference import PreferencePairs
from ..errors import DataError, EdgefaError
from ..device_profiles.budget import step_cost
from ..profiling.memory import peak_rss_bytes, rss_bytes
from ..profiling.profiler import Profiler
from .batches import batch_indices
from .backends import open_engine
from .engine import DeviceEngine
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
    provider: str | None = None     # None: the bundle's TensorRT engines if current, else onnxruntime's best


class TooManyRefusals(EdgefaError):
    pass


def standardize(bundle: Bundle, ds: Dataset, what: str) -> np.ndarray:
    """Check a data set against the bundle and scale it as the host did (global mean and std)."""
    model = bundle.model
    if ds.X.ndim != 2 or ds.X.shape[1] != model["in_features"]:
        raise DataError(f"{what}: samples have {ds.X.shape[1:]} features, the bundle expects {model['in_features']}")
    if len(ds.y) and (ds.y.min() < 0 or ds.y.max() >= model["n_classes"]):
        raise DataError(f"{what}: labels must lie in 0..{model['n_classes'] - 1}")
    return bundle_standardizer(bundle).apply(ds.X)


def is_preference(bundle: Bundle) -> bool:
    return bundle.manifest.get("loss") == LOSS_BRADLEY_TERRY


def load_pairs(path: str | Path) -> PreferencePairs:
    """Preference pairs from an .npz with float arrays `chosen` and `rejected` [N, D] (never
    unpickled); any problem is one DataError line naming the file."""
    path = Path(str(path).removeprefix("npz:"))
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("chosen", "rejected") if k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: unreadable preference pairs ({str(exc).splitlines()[0]})") from None
    missing = [k for k in ("chosen", "rejected") if k not in arrays]
    if missing:
        raise DataError(f"{path}: preference pairs need float arrays 'chosen' and 'rejected' [N, D]; "
                        f"missing {', '.join(repr(k) for k in missing)}")
    c, r = arrays["chosen"], arrays["rejected"]
    for name, a in arrays.items():
        if a.dtype.kind != "f":
            raise DataError(f"{path}: '{name}' is {a.dtype}, preference pairs need float arrays")
    if c.ndim != 2 or c.shape != r.shape or not len(c):
        raise DataError(f"{path}: 'chosen' {c.shape} and 'rejected' {r.shape} must both be [N, D] with N >= 1")
    for name, a in arrays.items():
        if not np.isfinite(a).all():
            raise DataError(f"{path}: '{name}' holds non-finite values (NaN/Inf)")
    return PreferencePairs(c.astype(np.float32), r.astype(np.float32), str(path))


def standardize_pairs(bundle: Bundle, pairs: PreferencePairs) -> tuple[np.ndarray, np.ndarray]:
    if pairs.chosen.shape[1] != bundle.model["in_features"]:
        raise DataError(f"{pairs.name}: items have {pairs.chosen.shape[1]} features, "
                        f"the bundle expects {bundle.model['in_features']}")
    std = bundle_standardizer(bundle)
    return std.apply(pairs.chosen), std.apply(pairs.rejected)


def preference_accuracy(engine: DeviceEngine, chosen: np.ndarray, rejected: np.ndarray) -> float:
    """The share of pairs the scorer ranks right (a tie counts as wrong)."""
    if not len(chosen):
        return float("nan")
    return float((engine.predict_logits(chosen)[:, 0] > engine.predict_logits(rejected)[:, 0]).mean())


def bundle_standardizer(bundle: Bundle) -> Standardizer:
    s = bundle.manifest["input"]["standardize"]
    return Standardizer(s["mean"], s["std"])


def accuracy(engine: DeviceEngine, X: np.ndarray, y: np.ndarray) -> float:
    return float((engine.predict_logits(X).argmax(axis=1) == y).mean()) if len(y) else float("nan")


class Finetuner:
    """A fine-tuning run, in two parts so that every input problem surfaces before any work starts:
    construction checks the data, builds the engine and resumes from `state/`; `run()` trains.
    Every phase runs in a window of `profiler` (load, train_step, forward, checkpoint)."""

    def __init__(self, bundle: Bundle, train: Dataset, config: FinetuneConfig,
                 eval_data: Dataset | None = None, profiler: Profiler | None = None):
        self.bundle, self.config = bundle, config
        self.profiler = profiler or Profiler()
        self.lr = bundle.manifest["optimizer"]["lr"] if config.lr is None else config.lr
        if not (np.isfinite(self.lr) and self.lr >= 0):
            raise EdgefaError(f"learning rate must be finite and >= 0, got {self.lr}")
        self.pairs = is_preference(bundle)
        want = PreferencePairs if self.pairs else Dataset
        for data in (train, eval_data):
            if data is not None and not isinstance(data, want):
                raise DataError(f"{data.name}: this bundle trains on "
                                + ("preference pairs (an npz with 'chosen' and 'rejected')" if self.pairs
                                   else "labelled samples (X, y)"))
        if self.pairs:
            self.X, self.R = standardize_pairs(bundle, train)
            self.eval = standardize_pairs(bundle, eval_data) if eval_data else None
        else:
            self.X, self.y = standardize(bundle, train, train.name), train.y
            self.eval = (standardize(bundle, eval_data, eval_data.name), eval_data.y) if eval_data else None
        rss_before = rss_bytes()
        with self.profiler.window("load"):
            self.engine = open_engine(bundle, config.provider, config.threads)
            saved = load_state(bundle, self.engine.state_names)
            if saved:
                self.engine.load_state(saved.tensors)
        if rss_before is not None:
            self.profiler.extra["runtime_growth_bytes"] = rss_bytes() - rss_before
        self.start, self.refused = (saved.step, list(saved.refused_steps)) if saved else (0, [])
        self.cost = step_cost(bundle.model, config.batch_size, self.engine.momentum, self.engine.preference)

    def checkpoint(self, step: int) -> None:
        with self.profiler.window("checkpoint"):
            save_state(self.bundle, DeviceState(step, self.engine.state(), self.refused))

    def eval_accuracy(self) -> float | None:
        if not self.eval:
            return None
        with self.profiler.window("forward"):
            return (preference_accuracy if self.pairs else accuracy)(self.engine, *self.eval)

    def train_step(self, step: int):
        """Apply step `step` (batch `step` of the seeded order) to the engine; nothing else."""
        # (the batch's selection is not a window of its own: a few microseconds, like a window)
        idx = batch_indices(len(self.X), self.config.batch_size, self.config.seed, step)
        if self.pairs:
            chosen, rejected = self.X[idx], self.R[idx]
            with self.profiler.window("train_step", self.cost.flops, self.cost.bytes_moved):
                return self.engine.step_pairs(chosen, rejected, self.lr)
        x, y = self.X[idx], self.y[idx]
        with self.profiler.window("train_step", self.cost.flops, self.cost.bytes_moved):
            return self.engine.step(x, y, self.lr)

    def run(self, on_step: Callable[[int, float], None] | None = None) -> dict:
        cfg, engine, prof = self.config, self.engine, self.profiler
        acc_before = self.eval_accuracy()
        losses, refused_now = [], 0
        for step in range(self.start, cfg.steps):
            result = self.train_step(step)
            losses.append(result.loss)
            if not result.accepted:
                self.refused.append(step)
                refused_now += 1
                warnings.warn(f"step {step} refused: non-finite loss or weights; kept the previous weights "
                              f"({refused_now} refused in this run, limit {cfg.max_refusals})", stacklevel=2)
                if refused_now >= cfg.max_refusals:
                    self.checkpoint(step + 1)
                    raise TooManyRefusals(f"stopped at step {step}: {refused_now} steps refused for NaN/Inf "
                                          f"(steps {self.refused[-refused_now:]}); the last good weights are saved")
            done = step + 1
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                self.checkpoint(done)
            if on_step:
                on_step(done, result.loss)
        final_step = max(self.start, cfg.steps)
        self.checkpoint(final_step)

        ms = prof.seconds("train_step", skip_warmup=False)[-len(losses):] * 1e3 if losses else np.zeros(0)
        return {
            "bundle": str(self.bundle.path),
            "providers": engine.providers,
            "resumed_from_step": self.start,
            "final_step": final_step,
            "steps_run": len(losses),
            "batch_size": cfg.batch_size,
            "lr": self.lr,
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "refused_steps": self.refused,
            "step_time_ms_median": float(np.median(ms)) if len(ms) else None,
            "step_time_ms_p95": float(np.percentile(ms, 95)) if len(ms) else None,
            "loss": self.bundle.manifest.get("loss"),
            "metric": "preference accuracy" if self.pairs else "accuracy",
            "accuracy_before": acc_before,
            "accuracy_after": self.eval_accuracy(),
            "peak_rss_bytes": peak_rss_bytes(),
            "bundle_bytes": self.bundle.size_bytes(),
        }


def evaluate(bundle: Bundle, data: Dataset, threads: int | None = None) -> dict:
    """Accuracy of the bundle's current weights (its saved device state when present); for a
    Bradley-Terry bundle, preference accuracy on pairs."""
    if isinstance(data, PreferencePairs) != is_preference(bundle):
        raise DataError(f"{data.name}: this bundle is evaluated on "
                        + ("preference pairs (an npz with 'chosen' and 'rejected')" if is_preference(bundle)
                           else "labelled samples (X, y)"))
    engine = open_engine(bundle, threads=threads)
    saved = load_state(bundle, engine.state_names)
    if saved:
        engine.load_state(saved.tensors)
    if isinstance(data, PreferencePairs):
        return {"accuracy": preference_accuracy(engine, *standardize_pairs(bundle, data)), "samples": len(data),
                "step": saved.step if saved else 0}
    X = standardize(bundle, data, data.name)
    return {"accuracy": accuracy(engine, X, data.y), "samples": len(data.y),
            "step": saved.step if saved else 0}
