"""The diagnostic protocol: can a feedback-alignment result be trusted? (`edgefa diagnose RUN/`)

Test accuracy and the alignment cosine Gamma can both mislead on pre-LN residual networks: under
DFA the residual stream can grow by orders of magnitude, the terminal LayerNorm then drives the
true gradient at the hidden layers towards the numerical floor (Gamma becomes a cosine against
noise), and the trained blocks can end up worse than blocks left at random. Four diagnostics,
each against a threshold the user can set:

  (a) growth     max over l of ||h_{l+1}|| / ||h_l|| along the stage outputs, ||h_l|| the mean over
                 samples of the per-sample norm (dim 1 of the flattened stage output)
  (b) floor      ||g_L|| = mean over samples of ||d loss_n / d h_L|| (dim 1), the true BP gradient of
                 each sample's own cross-entropy at the deepest stage output; fires below the floor
  (c) drift      mean over pairs of disjoint batches of the cosine between their batch-mean BP
                 gradients at h_L; high means Gamma measures one global direction, not credit
  (d) baseline   the run's test accuracy minus that of the architecture-matched model trained with
                 its blocks frozen at random initialization; fires below the margin

The verdict is "trustworthy" when none fires, else "walk back" naming those that did. Beside them,
alignment measured honestly: Gamma per stage and per weight tensor (reported "degenerate", not as
a number, where the BP gradient it is measured against is below the floor of (b)); a null
calibration (Gamma with fresh random feedback matrices beside the training-time ones); and the
perturbation correlation rho between <g_l, eps v> and L(h_l + eps v) - L(h_l) over random unit
directions v, for the rule's signal, the true gradient (positive control, rho near 1) and a random
vector (negative control, rho near 0).

Every measurement runs on copies, in the measurement precision (float32 by default; bfloat16 and
float64 allowed; float16 refused), and every norm names its dim.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from itertools import combinations
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..bundle import write_atomically
from ..shared.datasets import Dataset, load_dataset, stratified_split
from ..errors import CheckpointError, DiagnosisError
from ..models import model_from_config
from . import DIAGNOSIS, measure_dtype_name
from ..training.alignment import bp_gradients, bp_twin, cosine, frobenius, measure_alignment, row_norms, rule_stage_signals, weight_layers

SCHEMA = "edgefa.diagnosis/1"
BASELINE_DIR = "frozen_baseline"

MEASURE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}

AGGREGATION = {
    "h_norm": "mean over the evaluation batch of the per-sample ||h_l|| (dim 1 of the flattened stage output)",
    "grad_norm": "mean over the evaluation batch of the per-sample ||d loss_n / d h_l|| (dim 1), true BP, "
                 "loss_n the sample's own cross-entropy",
    "growth": "max over consecutive stages of the ratio of their h_norm",
    "stability": "mean over all pairs of disjoint batches of cos(mean_n dL/dh_L over batch i, the same over "
                 "batch j), flattened per batch (dim 0)",
    "gamma": "signal_cosine of training/alignment.py (mean over samples of the per-sample cosine, dim 1) "
             "per stage; weight_grad_cosine per weight tensor; never averaged over layers. On the task loss "
             "(cross-entropy) alone: a residual-stream penalty's own local gradient, which the rule and BP share "
             "exactly, is left out of both sides",
    "null": "the same Gamma with fresh feedback matrices N(0, s^2), s the stored matrix's own std: "
            "mean, sample std (ddof 1) and max over the draws",
    "rho": "Pearson correlation over the probes of <g_l, eps v> and L(h_l + eps v) - L(h_l), v a random "
           "direction over the whole batch's stage output with ||v||_F = 1, eps = eps_rel * ||h_l||_F, "
           "L the batch-mean cross-entropy",
}


@dataclass
class Thresholds:
    growth_max: float = 50.0       # (a) fires above
    grad_floor: float = 1e-7       # (b) fires below
    stability_max: float = 0.30    # (c) fires above
    margin: float = 0.02           # (d) fires when accuracy - baseline accuracy is below (absolute: 0.02 = 2 points)


@dataclass
class Settings:
    thresholds: Thresholds = field(default_factory=Thresholds)
    eval_batch: int = 256          # the fixed evaluation batch: the first samples of the test split
    batches: int = 8               # (c): disjoint batches of the test split ...
    batch_size: int = 32           # ... of this many samples (fewer when the split is small)
    null_draws: int = 20
    probes: int = 128              # random directions per stage for rho (a null rho has std ~ 1/sqrt(probes))
    eps: float = 1e-3              # perturbation size relative to ||h_l||_F
    dtype: str = "float32"
    seed: int = 0                  # batches, null draws, directions

    def __post_init__(self):
        for name in ("eval_batch", "batches", "batch_size", "probes"):
            if getattr(self, name) < 1:
                raise DiagnosisError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batches < 2:
            raise DiagnosisError(f"direction stability needs at least 2 batches, got {self.batches}")
        if self.null_draws < 0:
            raise DiagnosisError(f"null_draws must be >= 0, got {self.null_draws}")
        if not self.eps > 0:
            raise DiagnosisError(f"eps must be > 0, got {self.eps}")
        measure_dtype(self.dtype)


def measure_dtype(name: str) -> torch.dtype:
    """The torch dtype of a measurement precision; float16 is refused (one clear reason)."""
    return MEASURE_DTYPES[measure_dtype_name(name)]


# --- the network as stages: run all of it, or only its tail from stage l -----------------------

def stage_view(net: nn.Module):
    """(prepare, [(stage name, function)], readout) of an MLP or a FeedbackNet; the names are the
    stage names of the alignment measurement."""
    if hasattr(net, "stages"):
        return net.prepare, list(net.stages()), net.readout
    return ((lambda x: x),
            [(f"hidden_layers.{i}", lambda h, lin=lin: net.act(lin(h))) for i, lin in enumerate(net.hidden_layers)],
            net.head)


def run_stages(net: nn.Module, X: Tensor) -> tuple[list[Tensor], Tensor]:
    """Every stage output and the logits."""
    prepare, stages, readout = stage_view(net)
    h, hs = prepare(X), []
    for _, f in stages:
        h = f(h)
        hs.append(h)
    return hs, readout(h)


def run_from(net: nn.Module, index: int, h: Tensor) -> Tensor:
    """The logits when stage `index` outputs `h`."""
    _, stages, readout = stage_view(net)
    for _, f in stages[index + 1:]:
        h = f(h)
    return readout(h)


def bp_stage_gradients(twin: nn.Module, X: Tensor, y: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Stage outputs and the true gradient of the batch-mean cross-entropy at each (a BP twin)."""
    with torch.enable_grad():
        if X.is_floating_point():
            X = X.detach().requires_grad_(True)     # every stage output then carries a gradient
        hs, logits = run_stages(twin, X)
        grads = torch.autograd.grad(F.cross_entropy(logits, y), hs, allow_unused=True)
    return [h.detach() for h in hs], [torch.zeros_like(h) if g is None else g for h, g in zip(hs, grads)]


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


# --- the four diagnostics -------------------------------------------------------------------

def stream_growth(h_norms: list[float]) -> dict:
    """(a): the ratio of consecutive stage-output norms; non-finite activations count as infinite growth."""
    def ratio(a: float, b: float) -> float:
        r = b / a if math.isfinite(a) and math.isfinite(b) and a > 0 else math.inf
        return r if math.isfinite(r) else math.inf

    ratios = [ratio(a, b) for a, b in zip(h_norms, h_norms[1:])]
    if not ratios:
        return {"ratios": [], "max": None, "total": None}
    return {"ratios": ratios, "max": max(ratios), "total": ratio(h_norms[0], h_norms[-1])}


def direction_stability(twin: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> dict:
    """(c): cosines between the batch-mean BP gradient directions at h_L of disjoint batches."""
    directions = []
    for Xb, yb in batches:
        _, grads = bp_stage_gradients(twin, Xb, yb)
        directions.append(grads[-1].flatten(1).to(torch.float64).mean(dim=0))
    cosines = [float(cosine(a, b, dim=0)) for a, b in combinations(directions, 2)]
    defined = [c for c in cosines if math.isfinite(c)]
    return {"mean_pairwise_cosine": float(np.mean(defined)) if defined else None,
            "pairs": len(cosines), "degenerate_pairs": len(cosines) - len(defined),
            "batches": len(batches), "batch_size": len(batches[0][1])}


def pearson(a: list[float], b: list[float]) -> float | None:
    """Pearson correlation; None where either side is constant or not finite."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))) or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


@torch.no_grad()
def perturbation_correlation(twin: nn.Module, X: Tensor, y: Tensor, index: int, h: Tensor,
                             signals: dict[str, Tensor | None], probes: int, eps_rel: float,
                             gen: torch.Generator) -> dict[str, float | None]:
    """rho per signal at stage `index` (output `h` on batch X): over `probes` random unit directions v
    (one shared set for every signal), the predicted change <g, eps v> against the actual change of
    the batch-mean cross-entropy when the stage outputs h + eps v."""
    base = float(F.cross_entropy(run_from(twin, index, h), y))
    eps = eps_rel * frobenius(h)
    wide = {k: g.to(torch.float64) for k, g in signals.items() if g is not None}   # converted once
    actual, predicted = [], {k: [] for k in wide}
    for _ in range(probes):
        v = torch.randn(h.shape, generator=gen, dtype=torch.float64)
        v = v / torch.linalg.vector_norm(v.flatten(), dim=0)
        step = (eps * v).to(device=h.device, dtype=h.dtype)
        actual.append(float(F.cross_entropy(run_from(twin, index, h + step), y)) - base)
        step64 = step.to(torch.float64)
        for k, g in wide.items():
            predicted[k].append(float((g * step64).sum()))
    return {k: (pearson(predicted[k], actual) if k in predicted else None) for k in signals}


def fresh_feedback(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """A copy of `model` whose every stored feedback matrix is redrawn N(0, s^2), s its own std."""
    twin = copy.deepcopy(model)
    for name in twin.feedback_names():
        b = twin.get_buffer(name)
        s = float(b.to(torch.float64).std())
        b.copy_((torch.randn(b.shape, generator=gen, dtype=torch.float64) * s).to(b))
    return twin


def layer_stages(net: nn.Module) -> dict[str, str | None]:
    """Weight tensor (module path) -> the stage it belongs to (None: the readout)."""
    _, stages, _ = stage_view(net)
    if not hasattr(net, "stages"):
        return {name: (name if name.startswith("hidden_layers.") else None) for name, _ in weight_layers(net)}
    owner = {id(m): stage_name for stage_name, stage in stages for m in stage.modules()}
    return {name: owner.get(id(m)) for name, m in weight_layers(net)}


def has_blocks(model: nn.Module) -> bool:
    return bool(getattr(model, "residual_blocks", lambda: [])())


# --- the data and the accuracy a run is judged on ---------------------------------------------

def test_split(config, data: Dataset | None = None) -> Dataset:
    """The run's held-out split, exactly as training made it."""
    full = data if data is not None else load_dataset(config.dataset)
    return stratified_split(full, config.test_fraction, config.seed)[1]


def test_tensors(run, test_ds: Dataset, device: torch.device) -> tuple[Tensor, Tensor]:
    return (torch.from_numpy(run.standardizer.apply(test_ds.X)).to(device), torch.from_numpy(test_ds.y).to(device))


def run_accuracy(run, X: Tensor, y: Tensor) -> float:
    from ..training.trainer import evaluate

    acc = evaluate(run.model, X, y)[1]
    return acc if math.isfinite(acc) else 0.0


def baseline_config(config):
    """The frozen-random-blocks baseline of a run: the same config with the blocks frozen, alignment
    off. Under DFA the penalty cannot move anything once the blocks are frozen (each block's input
    is detached), so it is dropped there and one baseline serves every lambda."""
    return replace(config, freeze_blocks=True, alignment=False,
                   penalty=0.0 if config.method == "dfa" else config.penalty)


ARCHITECTURE_KEYS = ("kind", "in_shape", "n_outputs", "width", "depth", "expansion", "activation", "heads",
                     "patch", "vocab")


def check_baseline(run, baseline, where: str) -> None:
    """A given baseline must be the run's architecture, frozen, on the run's data and split."""
    if not baseline.config.freeze_blocks:
        raise DiagnosisError(f"{where}: not a frozen-random-blocks run (train it with --freeze-blocks)")
    a, b = run.model.config.to_dict(), baseline.model.config.to_dict()
    differ = [k for k in ARCHITECTURE_KEYS if a.get(k) != b.get(k)]
    if differ:
        raise DiagnosisError(f"{where}: architecture differs from the run's ({', '.join(differ)})")
    for key in ("dataset", "seed", "test_fraction"):
        if getattr(run.config, key) != getattr(baseline.config, key):
            raise DiagnosisError(f"{where}: {key} {getattr(baseline.config, key)!r} is not the run's "
                                 f"{getattr(run.config, key)!r}, so its test split is not the run's")


# --- the protocol ----------------------------------------------------------------------------

def _entry(label: str, value, threshold, fires: str, fired: bool | None, detail: str, status: str | None = None) -> dict:
    return {"label": label, "value": value, "threshold": threshold, "fires_when": fires, "fired": bool(fired),
            "status": status or ("fired" if fired else "passed"), "detail": detail}


def diagnose(run, settings: Settings | None = None, baseline=None, data: Dataset | None = None,
             device: str | torch.device = "cpu") -> dict:
    """The protocol on a trained run (training/trainer.py's Run) against `baseline` (a frozen-blocks
    Run, or None: (d) is then skipped, or not applicable for models without residual blocks).
    Returns the JSON-ready diagnosis."""
    settings = settings or Settings()
    th = settings.thresholds
    dtype = measure_dtype(settings.dtype)
    config, model = run.config, run.model
    if config.loss != "cross_entropy":
        raise DiagnosisError(f"the protocol judges classification runs; this run trains a {config.loss} "
                             "preference scorer")
    expected = model_from_config(model.config.to_dict()).feedback_names()     # what the rule must carry
    missing = [n for n in expected if n not in dict(model.named_buffers())]
    if missing:     # load_run refuses these already; a model built by hand must not slip through
        raise CheckpointError(f"feedback matrices missing ({', '.join(missing)}); refusing to measure alignment")
    device = torch.device(device)
    model = model.to(device)
    test_ds = test_split(config, data)
    Xte, yte = test_tensors(run, test_ds, device)
    Xe, ye = Xte[:settings.eval_batch], yte[:settings.eval_batch]
    cast = (lambda t: t.to(dtype)) if Xte.is_floating_point() else (lambda t: t)
    twin = bp_twin(model, dtype)
    gen = torch.Generator().manual_seed(settings.seed)

    # (a) and (b), and the per-stage norms
    hs, grads = bp_stage_gradients(twin, cast(Xe), ye)
    n = len(ye)
    names = [name for name, _ in stage_view(twin)[1]]
    h_norms = [float(row_norms(h).mean()) for h in hs]
    g_norms = [float((n * row_norms(g)).mean()) for g in grads]
    growth = stream_growth(h_norms)
    g_last = g_norms[-1]

    # (c) on disjoint batches of the test split
    per = min(settings.batch_size, len(yte) // settings.batches)
    if per < 1:
        raise DiagnosisError(f"the test split has {len(yte)} samples, too few for {settings.batches} batches")
    order = torch.from_numpy(np.random.default_rng(settings.seed).permutation(len(yte))).to(device)
    batches = [(cast(Xte[order[i * per:(i + 1) * per]]), yte[order[i * per:(i + 1) * per]])
               for i in range(settings.batches)]
    stability = direction_stability(twin, batches)

    # Gamma, its null calibration and rho
    floor = th.grad_floor

    def below_floor(stage: str | None) -> bool:
        if stage is None:
            return False
        g = g_norms[names.index(stage)]
        return not (math.isfinite(g) and g >= floor)

    bp = bp_gradients(model, Xe, ye, 0.0, dtype)                    # shared by the run and its null draws
    alignment = measure_alignment(model, Xe, ye, 0.0, dtype, bp)    # the task's credit: no penalty term
    null_applies = config.method in ("fa", "dfa", "hybrid")
    null_reason = {"bp": "bp uses no feedback matrices (Gamma is 1 by construction)",
                   "usf": "usf's feedback is sign(W) * mean|W|, derived from the weights, not drawn"}
    null_runs = ([measure_alignment(fresh_feedback(model, gen), Xe, ye, 0.0, dtype, bp)
                  for _ in range(settings.null_draws)] if null_applies else [])
    signals = rule_stage_signals(model, cast(Xe), ye, dtype)

    def null_summary(values: list[float | None]) -> dict:
        vals = [v for v in values if v is not None and math.isfinite(v)]
        return {"mean": float(np.mean(vals)) if vals else None,
                "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                "max": max(vals) if vals else None, "draws": len(vals)}

    stages = {}
    for i, name in enumerate(names):
        degenerate = below_floor(name)
        gamma = alignment["stages"].get(name, {}).get("signal_cosine")
        random_signal = torch.randn(hs[i].shape, generator=gen, dtype=torch.float64).to(hs[i])
        rho = perturbation_correlation(twin, Xe if not Xe.is_floating_point() else cast(Xe), ye, i, hs[i],
                                       {"rule": signals.get(name), "bp": grads[i], "random": random_signal},
                                       settings.probes, settings.eps, gen)
        row = {"h_norm": _finite(h_norms[i]), "grad_norm": _finite(g_norms[i]),
               "degenerate": degenerate, "gamma": None if degenerate else gamma,
               "rho_rule": rho["rule"], "rho_bp": rho["bp"], "rho_random": rho["random"]}
        if degenerate:
            row["degenerate_reason"] = (f"||dL/dh|| {g_norms[i]:.3g} is below the floor {floor:g}: "
                                        "the cosine would be taken against numerical noise")
        if null_applies:
            row["null"] = (None if degenerate else
                           null_summary([r["stages"].get(name, {}).get("signal_cosine") for r in null_runs]))
        stages[name] = row

    owner = layer_stages(model)
    layers = {}
    for name, row in alignment["layers"].items():
        stage = owner.get(name)
        degenerate = below_floor(stage)
        entry = {"stage": stage, "degenerate": degenerate,
                 "gamma": None if degenerate else row.get("weight_grad_cosine")}
        if null_applies and not degenerate:
            entry["null"] = null_summary([r["layers"].get(name, {}).get("weight_grad_cosine") for r in null_runs])
        if "weight_feedback_cosine" in row:
            entry["weight_feedback_cosine"] = row["weight_feedback_cosine"]
        layers[name] = entry

    # (d): the frozen-random-blocks baseline
    accuracy = run_accuracy(run, Xte, yte)
    diagnostics = {
        "growth": _entry("(a) residual-stream growth", growth["max"], th.growth_max, "above", 
                         growth["max"] is not None and not growth["max"] <= th.growth_max,
                         "max over l of ||h_{l+1}|| / ||h_l||" + ("; non-finite activations"
                                                                  if growth["max"] == math.inf else "")),
        "gradient_floor": _entry("(b) BP gradient at the deepest stage", g_last, floor, "below",
                                 not (math.isfinite(g_last) and g_last >= floor),
                                 f"||d loss_n / d h_L|| at {names[-1]}, mean over samples"),
    }
    s = stability["mean_pairwise_cosine"]
    diagnostics["stability"] = (
        _entry("(c) cross-batch direction stability", s, th.stability_max, "above", s > th.stability_max,
               f"mean pairwise cosine of {stability['batches']} batches of {stability['batch_size']}")
        if s is not None else
        _entry("(c) cross-batch direction stability", None, th.stability_max, "above", False,
               "every batch-mean gradient is exactly zero (see (b))", "degenerate"))
    if not has_blocks(model):
        diagnostics["baseline"] = _entry("(d) frozen-random-blocks baseline", None, th.margin, "below", False,
                                         f"not applicable: a {getattr(model.config, 'kind', 'mlp')} has no "
                                         "residual blocks to freeze", "not applicable")
    elif baseline is None:
        diagnostics["baseline"] = _entry("(d) frozen-random-blocks baseline", None, th.margin, "below", False,
                                         "skipped: no baseline was trained or given", "skipped")
    else:
        base_acc = run_accuracy(baseline, Xte, yte)
        gap = accuracy - base_acc
        diagnostics["baseline"] = _entry("(d) frozen-random-blocks baseline", gap, th.margin, "below",
                                         gap < th.margin,
                                         f"test accuracy {accuracy:.4f} - frozen baseline {base_acc:.4f} "
                                         f"(baseline rule {baseline.config.method})")
        diagnostics["baseline"]["baseline_accuracy"] = base_acc
    fired = [key for key, d in diagnostics.items() if d["fired"]]
    verdict = "walk back" if fired else "trustworthy"

    result = _jsonable({
        "schema": SCHEMA,
        "run": {"method": config.method, "model": getattr(model.config, "kind", "mlp"), "dataset": config.dataset,
                "penalty": config.penalty, "epochs_trained": len(run.metrics.get("epochs", [])) or None,
                "diverged": run.metrics.get("diverged"), "test_accuracy": accuracy, "n_test": len(yte)},
        "verdict": verdict,
        "fired": fired,
        "diagnostics": diagnostics,
        "growth": growth,
        "stability": stability,
        "stages": stages,
        "layers": layers,
        "null": ({"draws": settings.null_draws, "what": AGGREGATION["null"]} if null_applies
                 else {"draws": 0, "not_applicable": null_reason.get(config.method, "")}),
        "settings": {**asdict(settings), "device": str(device), "eval_samples": n},
        "aggregation": AGGREGATION,
    })
    result["warnings"] = positive_control_warnings(result["stages"])
    return result


def positive_control_warnings(stages: dict) -> list[str]:
    """rho(bp) is the positive control of the perturbation check: under 0.9 at a stage (or not
    measured), finite differences do not confirm the BP gradient there and rho means little."""
    weak = [name for name, row in stages.items()
            if not row["degenerate"] and (row["rho_bp"] is None or row["rho_bp"] < 0.9)]
    if not weak:
        return []
    return [f"the positive control rho(bp) is under 0.9 at {', '.join(weak)}: finite differences do not "
            "confirm the BP gradient there (try a smaller --eps)"]


def _jsonable(value):
    """Non-finite floats become None (JSON has no infinity); where that matters a detail says so."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --- a run directory: load it, find or train its baseline, write RUN/diagnosis.json ------------

def frozen_baseline(run, run_dir: Path, given: str | os.PathLike | None, device: str,
                    data: Dataset | None = None, on_epoch: Callable[[int, dict], None] | None = None,
                    train_if_missing: bool = True):
    """The run's baseline: the one given (checked), else RUN/frozen_baseline/ when it is this run's
    baseline config, else a fresh one trained and saved there. None when the model has no blocks or
    `train_if_missing` is off and none is found."""
    from ..training.trainer import load_run, save_run, train

    if not has_blocks(run.model):
        return None
    if given is not None:
        baseline = load_run(given, device)
        check_baseline(run, baseline, str(given))
        return baseline
    wanted = baseline_config(run.config)
    cached = Path(run_dir) / BASELINE_DIR
    if cached.is_dir():
        try:
            baseline = load_run(cached, device)
        except CheckpointError:
            baseline = None
        if baseline is not None and asdict(baseline.config) == asdict(wanted):
            return baseline
    if not train_if_missing:
        return None
    baseline = train(wanted, on_epoch=on_epoch, data=data, device=torch.device(device))
    save_run(baseline, cached)
    return baseline


def write_diagnosis(result: dict, run_dir: str | os.PathLike) -> Path:
    """RUN/diagnosis.json, written whole or not at all."""
    path = Path(run_dir) / DIAGNOSIS
    write_atomically(path, json.dumps(result, indent=2).encode("utf-8"))
    return path
