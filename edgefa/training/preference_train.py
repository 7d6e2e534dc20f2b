"""Pairwise preference fine-tuning on the host: a scorer s(x) with one output, trained on
(chosen, rejected) pairs with any rule.

Each step takes a batch of pairs in the device runtime's order (`batch_indices`), scores both
items with the same model in two forward passes, s_w = s(x_chosen) and s_l = s(x_rejected), and
takes one optimizer step on

    Bradley-Terry   -log sigmoid(s_w - s_l)
    hinge           max(0, m - (s_w - s_l))

Under DFA each pass carries its own output error to its own hidden layers (e_w = dL/ds_w reaches
the chosen pass, e_l = dL/ds_l = -e_w the rejected one), and the two passes' weight updates add
up, exactly as the device's preference step does. `hybrid` makes every k-th step a BP step, the
same steps as `trainer.train_steps`.

Real-valued pairs (synthetic) are standardized with a global scalar fitted on the training pairs
(both items); token pairs (JSONL through the byte tokenizer) go to the causal transformer as ids.
The metric is preference accuracy: the share of held-out pairs with s_w > s_l. For synthetic
pairs, whose noise-free utility margin is known, the run also records the *ceiling*: the share of
held-out pairs whose (noisy) label agrees with the noise-free utility sign, which no scorer can
beat in expectation.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..shared.datasets import Standardizer
from ..shared.preference_pairs import PAD, VOCAB_SIZE, PreferencePairs, load_preference_jsonl, synthetic_pairs
from ..errors import DataError, EdgefaError
from ..shared.batches import batch_indices
from .preference import LOSSES, preference_accuracy, preference_loss
from ..models.rules import is_bp_step
from .trainer import Run, TrainConfig, build_model, make_optimizer, pick_device, seed_everything

PAIRS_SPEC_HELP = "synthetic[:N] (N pairs from a hidden utility, default 2000) | jsonl:FILE (prompt/chosen/rejected)"
DEFAULT_SYNTHETIC_PAIRS = 2000


# --- data ---------------------------------------------------------------------------------------

def load_pairs_spec(spec: str, sigma: float = 0.0, dim: int = 16, seed: int = 0,
                    max_len: int = 128) -> PreferencePairs:
    """`synthetic[:N]` (drawn from `seed`, label noise `sigma`, items of `dim` features) or
    `jsonl:FILE` (a path ending in .jsonl works too; `max_len` tokens per item)."""
    spec = str(spec).strip()
    m = re.fullmatch(r"synthetic(?::(.*))?", spec)
    if m:
        count = m.group(1)
        try:
            n = DEFAULT_SYNTHETIC_PAIRS if count is None else int(count)
        except ValueError:
            raise DataError(f"--data {spec!r}: expected synthetic:N with N a whole number of pairs") from None
        if n < 2:
            raise DataError(f"--data {spec!r}: need at least 2 pairs (one to train on, one held out)")
        return synthetic_pairs(n, dim=dim, sigma=sigma, seed=seed)
    if spec.startswith("jsonl:") or spec.endswith(".jsonl"):
        path = spec[len("jsonl:"):] if spec.startswith("jsonl:") else spec
        if not path:
            raise DataError("--data jsonl:FILE needs a file")
        return load_preference_jsonl(Path(path), max_len=max_len)
    raise DataError(f"--data {spec!r}: expected {PAIRS_SPEC_HELP}")


def is_token_pairs(pairs: PreferencePairs) -> bool:
    return np.issubdtype(pairs.chosen.dtype, np.integer)


def scorer_model(pairs: PreferencePairs, model: str | None, data_spec: str) -> str:
    """The scorer's model kind: `model`, by default the mlp for feature pairs and the transformer
    for token pairs (which only a transformer reads)."""
    tokens = is_token_pairs(pairs)
    kind = model or ("transformer" if tokens else "mlp")
    if tokens and kind != "transformer":
        raise EdgefaError(f"--data {data_spec}: token pairs need --model transformer, not {kind}")
    return kind


def split_pairs(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices: a seeded permutation, at least one pair on each side."""
    if n < 2:
        raise DataError(f"need at least 2 preference pairs (one to train on, one held out), got {n}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng([seed, 0x9AE5]).permutation(n)
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


# --- the model and its steps --------------------------------------------------------------------

def build_scorer(config: TrainConfig, pairs: PreferencePairs) -> torch.nn.Module:
    """A one-output scorer: `config.model` on real-valued pairs, the causal transformer over the
    byte vocabulary on token pairs (padding at PAD, the score read at the last real token)."""
    width = pairs.chosen.shape[1]
    if is_token_pairs(pairs):
        if config.model != "transformer":
            raise ValueError(f"token pairs ({pairs.name}) need the transformer scorer, not {config.model!r}")
        return build_model(config, width, 1, vocab=VOCAB_SIZE, pad_id=PAD)
    return build_model(config, width, 1)


def pair_loss(model: torch.nn.Module, x_chosen: torch.Tensor, x_rejected: torch.Tensor, loss: str,
              margin: float = 1.0, penalty: float = 0.0) -> torch.Tensor:
    """The preference loss of one batch of pairs: two forward passes of the same model (each pass
    keeps its own DFA hook), plus lambda times the mean of the two passes' residual penalties."""
    s_w = model(x_chosen)
    extra = getattr(model, "penalty", None) if penalty else None
    s_l = model(x_rejected)
    value = preference_loss(loss, s_w.squeeze(-1), s_l.squeeze(-1), margin)
    if extra is not None:
        value = value + penalty * (extra + model.penalty) / 2
    return value


def preference_steps(model: torch.nn.Module, optimizer, x_chosen: torch.Tensor, x_rejected: torch.Tensor,
                     steps: int, batch_size: int, seed: int, loss: str, margin: float = 1.0,
                     first_step: int = 0, penalty: float = 0.0,
                     on_step: Callable[[float], None] | None = None) -> list[float]:
    """`steps` optimizer steps on batches of pairs chosen by `batch_indices` (the device's order)."""
    losses = []
    for step in range(first_step, first_step + steps):
        model.bp_step = is_bp_step(model.config, step)
        idx = torch.from_numpy(batch_indices(len(x_chosen), batch_size, seed, step)).to(x_chosen.device)
        value = pair_loss(model, x_chosen[idx], x_rejected[idx], loss, margin, penalty)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        losses.append(value.item())
        if on_step:
            on_step(losses[-1])
    model.bp_step = False
    return losses


@torch.no_grad()
def score(model: torch.nn.Module, X: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """s(x) for every row of X, in chunks, in eval mode: a flat [N] tensor."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(X[i:i + chunk]).reshape(-1) for i in range(0, len(X), chunk)])
    model.train(was_training)
    return out


def evaluate_pairs(model: torch.nn.Module, x_chosen: torch.Tensor, x_rejected: torch.Tensor, loss: str,
                   margin: float = 1.0) -> tuple[float, float, torch.Tensor]:
    """(mean loss, preference accuracy, s_w - s_l per pair) over a whole set of pairs."""
    s_w, s_l = score(model, x_chosen), score(model, x_rejected)
    return preference_loss(loss, s_w, s_l, margin).item(), preference_accuracy(s_w, s_l), s_w - s_l


# --- a whole run ----------------------------------------------------------------------------------

def train_preference(config: TrainConfig, pairs: PreferencePairs, margin: float = 1.0,
                     on_epoch: Callable[[int, dict], None] | None = None,
                     on_step: Callable[[float], None] | None = None) -> Run:
    """Train a scorer on `pairs` by `config` (`config.loss`: bradley-terry or hinge; `margin` is
    the hinge's m). The held-out split (`config.test_fraction`) and the batch order come from
    `config.seed`; metrics per epoch: train and held-out loss and preference accuracy."""
    if config.loss not in LOSSES:
        raise ValueError(f"unknown preference loss {config.loss!r}; expected one of {', '.join(LOSSES)}")
    if not np.isfinite(margin):
        raise ValueError(f"margin must be finite, got {margin}")
    seed_everything(config.seed)
    device = pick_device(config.device)
    tokens = is_token_pairs(pairs)
    train_idx, test_idx = split_pairs(len(pairs), config.test_fraction, config.seed)
    if tokens:
        std = Standardizer(0.0, 1.0)            # ids are not scaled; kept so the run has one

        def prepare(a):
            return torch.from_numpy(np.ascontiguousarray(a)).to(device)
    else:
        if not (np.isfinite(pairs.chosen).all() and np.isfinite(pairs.rejected).all()):
            raise DataError(f"{pairs.name}: NaN or Inf in the pairs")
        std = Standardizer.fit(np.concatenate([pairs.chosen[train_idx], pairs.rejected[train_idx]]))

        def prepare(a):
            return torch.from_numpy(std.apply(a)).to(device)
    Xw_tr, Xl_tr = prepare(pairs.chosen[train_idx]), prepare(pairs.rejected[train_idx])
    Xw_te, Xl_te = prepare(pairs.chosen[test_idx]), prepare(pairs.rejected[test_idx])

    model = build_scorer(config, pairs).to(device)
    optimizer = make_optimizer(model, config.lr, config.momentum)
    n_train = len(train_idx)
    steps_per_epoch = max(1, n_train // min(config.batch_size, n_train))
    metrics = {"kind": "preference", "dataset": pairs.name, "method": config.method, "model": config.model,
               "loss": config.loss, "margin": margin, "metric": "preference accuracy", "device": str(device),
               "n_train": n_train, "n_test": len(test_idx), "epochs": []}
    truth = None
    if pairs.true_margin is not None:
        # the ceiling: the share of held-out labels that agree with the noise-free utility sign
        truth = torch.from_numpy(pairs.true_margin[test_idx] > 0).to(device)
        metrics["heldout_ceiling"] = float(truth.float().mean().item())
    for epoch in range(config.epochs):
        losses = preference_steps(model, optimizer, Xw_tr, Xl_tr, steps_per_epoch, config.batch_size, config.seed,
                                  config.loss, margin, first_step=epoch * steps_per_epoch,
                                  penalty=config.penalty, on_step=on_step)
        train_loss, train_acc, _ = evaluate_pairs(model, Xw_tr, Xl_tr, config.loss, margin)
        test_loss, test_acc, diff = evaluate_pairs(model, Xw_te, Xl_te, config.loss, margin)
        row = {"epoch": epoch + 1, "batch_loss_mean": float(np.mean(losses)),
               "train_loss": train_loss, "train_accuracy": train_acc,
               "test_loss": test_loss, "test_accuracy": test_acc}
        if truth is not None:
            # agreement with the noise-free preference: how well the utility itself was learnt
            row["test_true_accuracy"] = float(((diff > 0) == truth).float().mean().item())
        metrics["epochs"].append(row)
        if on_epoch:
            on_epoch(epoch + 1, row)
    last = metrics["epochs"][-1] if metrics["epochs"] else {}
    metrics["final_test_accuracy"] = last.get("test_accuracy")
    metrics["final_test_true_accuracy"] = last.get("test_true_accuracy")
    return Run(model, optimizer, config, std, metrics, None)


__all__ = ["LOSSES", "PAIRS_SPEC_HELP", "build_scorer", "evaluate_pairs", "is_token_pairs",
           "load_pairs_spec", "pair_loss", "preference_steps", "score", "split_pairs", "train_preference"]
