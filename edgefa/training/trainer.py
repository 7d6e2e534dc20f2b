"""Train an MLP on the host with bp, fa or dfa; save and load runs.

A run directory holds `checkpoint.pt` (model config, weights *and* feedback buffers, optimizer
state, input standardizer) and `metrics.json` (loss and accuracy per epoch).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

from ..data import Dataset, Standardizer, load_dataset, stratified_split
from ..errors import CheckpointError
from ..models import MLP, MLPConfig
from ..runtime.batches import batch_indices

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
CHECKPOINT_FORMAT = "edgefa-checkpoint"


@dataclass
class TrainConfig:
    method: str = "dfa"
    dataset: str = "digits"
    hidden: list[int] = field(default_factory=lambda: [256, 256])
    activation: str = "relu"
    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.003
    momentum: float = 0.9
    seed: int = 0
    feedback_seed: int = 1
    test_fraction: float = 0.25
    hybrid_every: int = 10           # method "hybrid": a true BP step every k-th step
    device: str = "auto"


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    # cuBLAS is deterministic only with a fixed workspace; it must be set before the first CUDA call.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass
class Run:
    """Everything a trained run is: the model, its optimizer, how inputs are scaled, the metrics."""

    model: MLP
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    standardizer: Standardizer
    metrics: dict
    image_shape: tuple[int, int] | None = None


def make_optimizer(model: MLP, lr: float, momentum: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)


def to_tensors(ds: Dataset, std: Standardizer, device: torch.device):
    return (torch.from_numpy(std.apply(ds.X)).to(device), torch.from_numpy(ds.y).to(device))


@torch.no_grad()
def evaluate(model: MLP, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy over samples, accuracy) on a whole set."""
    model.eval()
    logits = model(X)
    model.train()
    return F.cross_entropy(logits, y).item(), (logits.argmax(dim=1) == y).float().mean().item()


def train_steps(model: MLP, optimizer, X: torch.Tensor, y: torch.Tensor, steps: int,
                batch_size: int, seed: int, first_step: int = 0,
                on_step: Callable[[float], None] | None = None) -> list[float]:
    """`steps` optimizer steps on batches chosen by `batch_indices` (the device runtime's order)."""
    losses = []
    every = model.config.hybrid_every if model.config.rule == "hybrid" else 0
    for step in range(first_step, first_step + steps):
        model.bp_step = bool(every) and (step + 1) % every == 0       # hybrid: steps k, 2k, ... are BP
        idx = torch.from_numpy(batch_indices(len(y), batch_size, seed, step)).to(X.device)
        loss = F.cross_entropy(model(X[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_step:
            on_step(losses[-1])
    model.bp_step = False
    return losses


def train(config: TrainConfig, on_epoch: Callable[[int, dict], None] | None = None,
          data: Dataset | None = None) -> Run:
    """Train by `config`; `data` is `config.dataset` already loaded (the CLI loads it first, so a
    bad file is reported before any progress is shown)."""
    seed_everything(config.seed)
    device = pick_device(config.device)
    full = data if data is not None else load_dataset(config.dataset)
    train_ds, test_ds = stratified_split(full, config.test_fraction, config.seed)
    std = Standardizer.fit(train_ds.X)
    Xtr, ytr = to_tensors(train_ds, std, device)
    Xte, yte = to_tensors(test_ds, std, device)

    model = MLP(MLPConfig(train_ds.X.shape[1], list(config.hidden), full.n_classes,
                          config.activation, config.method, config.feedback_seed,
                          config.hybrid_every)).to(device)
    optimizer = make_optimizer(model, config.lr, config.momentum)
    steps_per_epoch = max(1, len(ytr) // min(config.batch_size, len(ytr)))
    metrics = {"dataset": full.name, "method": config.method, "device": str(device),
               "n_train": len(ytr), "n_test": len(yte), "epochs": []}
    for epoch in range(config.epochs):
        losses = train_steps(model, optimizer, Xtr, ytr, steps_per_epoch, config.batch_size,
                             config.seed, first_step=epoch * steps_per_epoch)
        train_loss, train_acc = evaluate(model, Xtr, ytr)
        test_loss, test_acc = evaluate(model, Xte, yte)
        row = {"epoch": epoch + 1, "batch_loss_mean": float(np.mean(losses)),
               "train_loss": train_loss, "train_accuracy": train_acc,
               "test_loss": test_loss, "test_accuracy": test_acc}
        metrics["epochs"].append(row)
        if on_epoch:
            on_epoch(epoch + 1, row)
    metrics["final_test_accuracy"] = metrics["epochs"][-1]["test_accuracy"] if metrics["epochs"] else None
    return Run(model, optimizer, config, std, metrics, full.image_shape)


def save_run(run: Run, out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": 1,
        "model_config": run.model.config.to_dict(),
        "train_config": asdict(run.config),
        "state_dict": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
        "optimizer": run.optimizer.state_dict(),
        "standardizer": run.standardizer.to_dict(),
        "image_shape": list(run.image_shape) if run.image_shape else None,
    }
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, out / CHECKPOINT)
    (out / METRICS).write_text(json.dumps(run.metrics, indent=2))
    return out / CHECKPOINT


def load_run(run_dir: str | os.PathLike, device: str = "cpu") -> Run:
    """Load a run; a checkpoint without its feedback matrices is an error, never a re-draw."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint (train a run with `edgefa train --out DIR`)")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an edgefa checkpoint")
    model = MLP(MLPConfig(**payload["model_config"])).to(device)
    state = payload["state_dict"]
    missing_feedback = [n for n in model.feedback_names() if n not in state]
    if missing_feedback:
        raise CheckpointError(f"{path}: feedback matrices missing ({', '.join(missing_feedback)}); "
                              "refusing to draw new ones silently")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model ({str(exc).splitlines()[0]})") from None
    config = TrainConfig(**payload["train_config"])
    optimizer = make_optimizer(model, config.lr, config.momentum)
    optimizer.load_state_dict(payload["optimizer"])
    metrics_path = Path(run_dir) / METRICS
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    shape = payload.get("image_shape")
    return Run(model, optimizer, config, Standardizer.from_dict(payload["standardizer"]), metrics,
               tuple(shape) if shape else None)
