"""On-device DFA fine-tuning: the loop around the engine (batches, refusals, checkpoints, timing).

A classifier bundle trains on labelled samples (`X`, `y`) and reports accuracy; a Bradley-Terry
bundle (a scorer, manifest `loss: "bradley-terry"`) trains on pairs (`chosen`, `rejected`: row i
of `chosen` preferred to row i of `rejected`) and reports preference accuracy, the share of pairs
scored s(chosen) > s(rejected). Batch k is pairs `batch_indices(n_pairs, batch, seed, k)`.

A bundle with a frozen trunk caches each sample's trunk features the first time a batch needs them
(runtime/feature_cache.py; `FinetuneConfig.feature_cache`): every later step runs the part's step
alone, with the same result bit for bit. Window "train_step" then holds "trunk_features" (the
trunk on the batch's samples not cached yet) and "head_step" (the part's step on features).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from pathlib import Path

from ..bundle import LOSS_BRADLEY_TERRY, Bundle, momentum_name, read_bundle
from ..shared.datasets import Dataset, Standardizer, load_dataset
from ..shared.preference_pairs import PreferencePairs
from ..errors import DataError, EdgefaError
from ..device_profiles.budget import step_cost
from ..profiling.memory import peak_rss_bytes, rss_bytes
from ..profiling.profiler import Profiler
from ..shared.batches import batch_indices
from .backends import open_engine
from .divergence import (DEFAULT_MAX_REFUSALS, DIVERGED, TOO_MANY_REFUSALS, Diverged, DivergenceGuard,
                         DivergenceRule, TooManyRefusals, chance_loss, diverged_message, refusals_message)
from .engine import DeviceEngine
from .feature_cache import DEFAULT_BUDGET_BYTES, FeatureCache, data_fingerprint
from .state import DeviceState, load_state, lock_state, save_state


@dataclass
class FinetuneConfig:
    steps: int                      # the total step count to reach (a resumed run does the rest)
    batch_size: int = 32
    lr: float | None = None         # None: the bundle's optimizer.lr
    checkpoint_every: int = 50      # >= 1 (the CLI says so); 0 here: only the final checkpoint
    max_refusals: int = DEFAULT_MAX_REFUSALS    # stop after this many refused (NaN/Inf) steps
    seed: int = 0
    threads: int | None = None
    provider: str | None = None     # None: the bundle's TensorRT engines if current, else onnxruntime's best
    divergence: DivergenceRule = field(default_factory=DivergenceRule)
    feature_cache: bool = True      # a bundle with a frozen trunk: cache trunk features per sample
    cache_bytes: int = DEFAULT_BUDGET_BYTES     # the cache's memory budget; larger caches go to a file


def check_samples(X: np.ndarray, y: np.ndarray, in_features: int, n_classes: int, what: str) -> None:
    """Labelled samples fit a model: [N, in_features] finite values, labels in 0..n_classes-1.
    Checked where the data is (the device's own file, or the host before it sends a byte)."""
    X, y = np.asarray(X), np.asarray(y)
    if X.ndim != 2 or X.shape[1] != in_features:
        raise DataError(f"{what}: samples have {X.shape[1:]} features, the bundle expects {in_features}")
    if y.shape != (len(X),) or y.dtype.kind not in "iu":
        raise DataError(f"{what}: needs one integer label per sample ({len(X)}), got {y.dtype} {list(y.shape)}")
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise DataError(f"{what}: labels must lie in 0..{n_classes - 1}, found {y.min()}..{y.max()}")
    if not np.isfinite(X).all():
        raise DataError(f"{what}: samples hold {int(np.count_nonzero(~np.isfinite(X)))} non-finite values (NaN/Inf)")


def check_pairs(chosen: np.ndarray, rejected: np.ndarray, in_features: int | None, what: str) -> None:
    """Preference pairs fit a scorer: float arrays `chosen` and `rejected`, both [N, in_features]
    with N >= 1 (`in_features` None: any width), finite. Checked where the data is (a file read
    here, or the host before it sends a byte over the link)."""
    c, r = np.asarray(chosen), np.asarray(rejected)
    for name, a in (("chosen", c), ("rejected", r)):
        if a.dtype.kind != "f":
            raise DataError(f"{what}: '{name}' is {a.dtype}, preference pairs need float arrays")
    if c.ndim != 2 or c.shape != r.shape or not len(c):
        raise DataError(f"{what}: 'chosen' {c.shape} and 'rejected' {r.shape} must both be [N, D] with N >= 1")
    if in_features is not None and c.shape[1] != in_features:
        raise DataError(f"{what}: items have {c.shape[1]} features, the bundle expects {in_features}")
    for name, a in (("chosen", c), ("rejected", r)):
        if not np.isfinite(a).all():
            raise DataError(f"{what}: '{name}' holds non-finite values (NaN/Inf)")


def wanted_data(preference: bool) -> str:
    """What a bundle trains and is evaluated on, for the line that refuses the other kind."""
    return "preference pairs (an npz with 'chosen' and 'rejected')" if preference else "labelled samples (X, y)"


def standardize(bundle: Bundle, ds: Dataset, what: str) -> np.ndarray:
    """Check a data set against the bundle and scale it as the host did (global mean and std)."""
    check_samples(ds.X, ds.y, bundle.model["in_features"], bundle.model["n_classes"], what)
    return bundle_standardizer(bundle).apply(ds.X)


def mean_loss(engine: DeviceEngine, pairs: bool, a: np.ndarray, b: np.ndarray) -> float:
    """The training loss of the engine's current weights on one batch, as the train-step graph
    computes it (mean cross-entropy of samples `a` with labels `b`; Bradley-Terry: mean
    softplus(s_rejected - s_chosen) of pairs `a`, `b`), by a forward pass only: nothing changes."""
    with np.errstate(all="ignore"):     # diverged weights give Inf logits: the loss says so (NaN/Inf)
        if pairs:
            margin = engine.predict_logits(a)[:, 0].astype(np.float64) - engine.predict_logits(b)[:, 0]
            return float(np.logaddexp(0.0, -margin).mean())
        logits = engine.predict_logits(a).astype(np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_probs = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
        return float(-log_probs[np.arange(len(b)), b].mean())


def is_preference(bundle: Bundle) -> bool:
    return bundle.manifest.get("loss") == LOSS_BRADLEY_TERRY


def load_finetune_data(bundle: Bundle, spec: str) -> Dataset | PreferencePairs:
    """The data `spec` names, as `bundle` trains on it: pairs (an npz of chosen and rejected) for a
    bradley-terry scorer, else samples and labels (shared.datasets.load_dataset)."""
    if is_preference(bundle):
        return load_pairs(spec)
    return load_dataset(spec)


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
    check_pairs(c, r, None, str(path))
    return PreferencePairs(c.astype(np.float32), r.astype(np.float32), str(path))


def holds_pairs(spec: str) -> bool:
    """Whether a data spec names an .npz holding 'chosen' and 'rejected' (what load_pairs reads)."""
    path = Path(str(spec).removeprefix("npz:"))
    try:
        with np.load(path, allow_pickle=False) as z:
            return isinstance(z, np.lib.npyio.NpzFile) and {"chosen", "rejected"} <= set(z.files)
    except Exception:       # not a readable npz: load_dataset says what is wrong with it
        return False


def load_training_data(spec: str) -> Dataset | PreferencePairs:
    """The data `spec` names, read by what it holds: preference pairs (holds_pairs), else samples
    and labels. For a host that drives a device over the link: it reads the data before it asks the
    device anything, and the client then checks it against the device's bundle (its loss, widths)."""
    return load_pairs(spec) if holds_pairs(spec) else load_dataset(spec)


def standardize_pairs(bundle: Bundle, pairs: PreferencePairs) -> tuple[np.ndarray, np.ndarray]:
    check_pairs(pairs.chosen, pairs.rejected, bundle.model["in_features"], pairs.name)
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
                raise DataError(f"{data.name}: this bundle trains on {wanted_data(self.pairs)}")
        if self.pairs:
            self.X, self.R = standardize_pairs(bundle, train)
            self.eval = standardize_pairs(bundle, eval_data) if eval_data else None
        else:
            self.X, self.y = standardize(bundle, train, train.name), train.y
            self.eval = (standardize(bundle, eval_data, eval_data.name), eval_data.y) if eval_data else None
        rss_before = rss_bytes()
        with self.profiler.window("load"):
            self.engine = open_engine(bundle, config.provider, config.threads)
            # one trainer per bundle state: a second fine-tune (or a server) on it fails here, naming
            # the holder (after the engine: a run that cannot start leaves the bundle as it was)
            self.state_lock = lock_state(bundle)
            saved = load_state(bundle, self.engine.state_names)
            if saved:
                self.engine.load_state(saved.tensors)
        if rss_before is not None:
            self.profiler.extra["runtime_growth_bytes"] = rss_bytes() - rss_before
        self.start, self.refused = (saved.step, list(saved.refused_steps)) if saved else (0, [])
        self.saved_step = saved.step if saved else None     # the step of the newest checkpoint on disk
        self.cache = None
        if config.feature_cache and self.engine.caches_features and not self.pairs:
            self.cache = FeatureCache.open(self.engine, data_fingerprint(train.X), len(self.X), config.cache_bytes,
                                           self.profiler)
        self.cost = step_cost(bundle.model, config.batch_size, self.engine.momentum, self.engine.preference,
                              on_features=self.cache is not None)

    def checkpoint(self, step: int, guard: DivergenceGuard | None = None) -> None:
        """Save the engine's state as the checkpoint at `step`; with `guard`, first prove the state
        good: an update whose loss no step has measured yet (the last one applied) is judged by
        its loss on the last batch, and a runaway is rolled back (Diverged), never written."""
        with self.profiler.window("checkpoint"):
            if guard is not None and not self.state_judged:
                reason = guard.probe(mean_loss(self.engine, self.pairs, *self.last_batch))
                if reason:
                    self.stop_diverged(step, reason)
            save_state(self.bundle, DeviceState(step, self.engine.state(), self.refused))
        self.saved_step = step

    def roll_back(self) -> int:
        """Put the engine back to the last good checkpoint (every one written was judged good), or
        to the bundle's own weights when there is none; the step it holds."""
        saved = load_state(self.bundle, self.engine.state_names)
        if saved is None:
            # the engine trained the bundle's arrays in place: read the bundle's weights again
            weights = read_bundle(self.bundle.path).weights
            tensors = {p: weights[p] for p in self.engine.params}
            tensors.update({momentum_name(p): np.zeros_like(weights[p])
                            for p in self.engine.params if self.engine.momentum})
            saved = DeviceState(0, tensors, [])
        self.engine.load_state(saved.tensors)
        self.refused = list(saved.refused_steps)
        return saved.step

    def stop_diverged(self, step: int, reason: str):
        """Roll back and raise Diverged: `step` is the step whose starting state ran away."""
        back_to = self.roll_back()
        self.stopped = {"reason": DIVERGED, "at_step": step, "rolled_back_to_step": back_to,
                        "rolled_back_steps": step - back_to}
        message = diverged_message(step, reason, back_to, self.lr, self.largest_input())
        raise Diverged(message, self.summary(back_to, message))

    def largest_input(self) -> float:
        """The largest |x| the graphs are fed (the standardized training data), for a stop's advice:
        read only when a run stops, not on every run."""
        return max(float(np.abs(a).max(initial=0.0)) for a in ((self.X, self.R) if self.pairs else (self.X,)))

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
            self.last_batch = chosen, rejected = self.X[idx], self.R[idx]
            with self.profiler.window("train_step", self.cost.flops, self.cost.bytes_moved):
                return self.engine.step_pairs(chosen, rejected, self.lr)
        self.last_batch = x, y = self.X[idx], self.y[idx]
        with self.profiler.window("train_step", self.cost.flops, self.cost.bytes_moved):
            if self.cache is None:
                return self.engine.step(x, y, self.lr)
            features = self.cache.rows(idx, x)
            with self.profiler.window("head_step", self.cost.flops, self.cost.bytes_moved):
                return self.engine.step_features(features, y, self.lr)

    def run(self, on_step: Callable[[int, float], None] | None = None) -> dict:
        """`_run`, then the feature cache lets its file go (one still filling is removed)."""
        try:
            return self._run(on_step)
        finally:
            if self.cache is not None:
                self.cache.close()

    def _run(self, on_step: Callable[[int, float], None] | None = None) -> dict:
        """Train from `start` to `config.steps`. Every step's loss is judged (runtime/divergence.py):
        a divergence rolls back to the last good checkpoint and raises Diverged; `max_refusals`
        refused steps save the (unchanged) weights and raise TooManyRefusals. Both carry the
        summary (`.result`); a finished run returns it."""
        cfg = self.config
        guard = DivergenceGuard(chance_loss(self.bundle.model["n_classes"], self.pairs), cfg.divergence,
                                cfg.max_refusals)
        self.acc_before = self.eval_accuracy()
        self.losses, self.stopped, refused_now = [], None, 0
        # Whether the engine's state has had its loss measured: the starting state is what the
        # user has (not ours to judge); after an accepted update, not until the next step (or a probe).
        self.state_judged = True
        for step in range(self.start, cfg.steps):
            result = self.train_step(step)
            refused_now += not result.accepted
            verdict = guard.judge(result.loss, result.accepted, refused_now)
            if verdict == DIVERGED:          # the state this step started from ran away
                self.stop_diverged(step, guard.reason)
            self.losses.append(result.loss)
            self.state_judged = not result.accepted     # a refused step left the judged state as it was
            if not result.accepted:
                self.refused.append(step)
                warnings.warn(f"step {step} refused: non-finite loss or weights; kept the previous weights "
                              f"({refused_now} refused in this run, limit {cfg.max_refusals})", stacklevel=2)
                if verdict == TOO_MANY_REFUSALS:
                    self.checkpoint(step + 1)
                    self.stopped = {"reason": TOO_MANY_REFUSALS, "at_step": step}
                    message = refusals_message(step, self.refused[-refused_now:], step + 1, self.largest_input())
                    raise TooManyRefusals(message, self.summary(step + 1, message))
            done = step + 1
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                self.checkpoint(done, guard)
            if on_step:
                on_step(done, result.loss)
        final_step = max(self.start, cfg.steps)
        # not twice for one step: the kept previous checkpoint must be an older state, not a copy
        if self.saved_step != final_step:
            self.checkpoint(final_step, guard)
        return self.summary(final_step)

    def summary(self, final_step: int, stop_message: str | None = None) -> dict:
        """The run's report so far: `refused_steps` (all the state's, in step order) and
        `rolled_back_steps` (steps undone by a divergence) are always there; `stopped` is None for a
        finished run, else what stopped it."""
        losses, cfg = self.losses, self.config
        ms = self.profiler.seconds("train_step", skip_warmup=False)[-len(losses):] * 1e3 if losses else np.zeros(0)
        stopped = self.stopped and {**self.stopped, "message": stop_message}
        return {
            "bundle": str(self.bundle.path),
            "providers": self.engine.providers,
            "resumed_from_step": self.start,
            "final_step": final_step,
            "steps_run": len(losses),
            "batch_size": cfg.batch_size,
            "lr": self.lr,
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "refused_steps": self.refused,
            "rolled_back_steps": (stopped or {}).get("rolled_back_steps", 0),
            "stopped": stopped,
            "step_time_ms_median": float(np.median(ms)) if len(ms) else None,
            "step_time_ms_p95": float(np.percentile(ms, 95)) if len(ms) else None,
            "loss": self.bundle.manifest.get("loss"),
            "metric": "preference accuracy" if self.pairs else "accuracy",
            "accuracy_before": self.acc_before,
            "accuracy_after": self.eval_accuracy(),
            "peak_rss_bytes": peak_rss_bytes(),
            "bundle_bytes": self.bundle.size_bytes(),
            "feature_cache": self.cache.describe() if self.cache is not None else None,
        }


def evaluate(bundle: Bundle, data: Dataset, threads: int | None = None) -> dict:
    """Accuracy of the bundle's current weights (its saved device state when present); for a
    Bradley-Terry bundle, preference accuracy on pairs."""
    if isinstance(data, PreferencePairs) != is_preference(bundle):
        raise DataError(f"{data.name}: this bundle is evaluated on {wanted_data(is_preference(bundle))}")
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
