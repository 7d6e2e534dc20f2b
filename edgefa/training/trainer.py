"""Train a model (mlp, resmlp, cnn, vit, transformer) on the host with any rule; save and load runs.

A run directory holds `checkpoint.pt` (model config, weights *and* feedback buffers, optimizer
state, input standardizer) and `metrics.json` (loss and accuracy per epoch).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

from ..errors import CheckpointError
from ..models import MLP, MLPConfig, NETS, NetConfig, model_from_config
from ..models.rules import is_bp_step
from ..shared.batches import batch_indices
from ..shared.datasets import Dataset, Standardizer, load_dataset, stratified_split
from .alignment import measure_alignment
from .dfa_step import explicit_dfa_applies, explicit_dfa_step
from .config import TrainConfig  # its home is training/config.py (no torch); imported from here too

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
CHECKPOINT_FORMAT = "edgefa-checkpoint"

MODEL_DEFAULTS = {"resmlp": {"width": 256, "depth": 4}, "cnn": {"width": 16, "depth": 2},
                  "vit": {"width": 64, "depth": 2}, "transformer": {"width": 64, "depth": 2}}


def input_shape(kind: str, n_features: int, image_shape: tuple[int, ...] | None) -> list[int]:
    """One sample's shape as the model sees it: images [C, H, W] for cnn/vit (1-D data as [1, D]),
    a flat [D] for the others (the transformer reads one feature per position)."""
    if kind in ("cnn", "vit"):
        if image_shape is None:
            return [1, n_features]
        return list(image_shape) if len(image_shape) == 3 else [1, *image_shape]
    return [n_features]


def build_model(config: TrainConfig, n_features: int, n_outputs: int,
                image_shape: tuple[int, ...] | None = None, vocab: int = 0, pad_id: int = -1):
    """The model `config` asks for, its feedback matrices drawn from `config.feedback_seed`."""
    if config.model == "mlp":
        return MLP(MLPConfig(n_features, list(config.hidden), n_outputs, config.activation, config.method,
                             config.feedback_seed, config.hybrid_every))
    if config.model not in NETS:
        raise ValueError(f"unknown model {config.model!r}; expected mlp or one of {', '.join(NETS)}")
    shape = input_shape(config.model, n_features, image_shape)
    defaults = MODEL_DEFAULTS[config.model]
    patch = config.patch
    if patch is None:
        patch = 4 if all(s % 4 == 0 and s >= 16 for s in shape[1:]) else 2
    return NETS[config.model](NetConfig(
        config.model, shape, n_outputs, config.method, config.feedback_seed, config.hybrid_every,
        width=config.width or defaults["width"], depth=config.depth or defaults["depth"],
        expansion=config.expansion, activation=config.activation, heads=config.heads, patch=patch,
        vocab=vocab, pad_id=pad_id, freeze_blocks=config.freeze_blocks))


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    # cuBLAS is deterministic only with a fixed workspace; it must be set before the first CUDA call.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(seed)
    np.random.seed(seed)
    # Deterministic mode matters for CUDA kernels (scatter, index_add, cuBLAS); the CPU kernels used
    # here are deterministic already, and switching it on imports torch._inductor: 5 s of CPU a process.
    if torch.cuda.is_available():
        torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass
class Run:
    """Everything a trained run is: the model, its optimizer, how inputs are scaled, the metrics."""

    model: torch.nn.Module           # MLP or a FeedbackNet (models/feedback_net.py)
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    standardizer: Standardizer
    metrics: dict
    image_shape: tuple[int, ...] | None = None


def make_optimizer(model: torch.nn.Module, lr: float, momentum: float) -> torch.optim.SGD:
    """SGD over the parameters that train (frozen blocks are left out)."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum)


def to_tensors(ds: Dataset, std: Standardizer, device: torch.device):
    return (torch.from_numpy(std.apply(ds.X)).to(device), torch.from_numpy(ds.y).to(device))


@torch.no_grad()
def evaluate(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy over samples, accuracy) on a whole set, in chunks of `chunk` samples."""
    model.eval()
    logits = torch.cat([model(X[i:i + chunk]) for i in range(0, len(X), chunk)])
    model.train()
    return F.cross_entropy(logits, y).item(), (logits.argmax(dim=1) == y).float().mean().item()


def task_loss(model: torch.nn.Module, logits: torch.Tensor, y: torch.Tensor, penalty: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy, plus lambda * the residual-stream penalty of the last forward pass."""
    loss = F.cross_entropy(logits, y)
    return loss + penalty * model.penalty if penalty else loss


def train_steps(model: torch.nn.Module, optimizer, X: torch.Tensor, y: torch.Tensor, steps: int,
                batch_size: int, seed: int, first_step: int = 0,
                on_step: Callable[[float], None] | None = None, penalty: float = 0.0,
                shard: tuple[int, int] = (0, 1)) -> list[float]:
    """`steps` optimizer steps on batches chosen by `batch_indices` (the device runtime's order).

    A non-finite loss ends the steps before its update is applied (in one process), so a diverged
    run keeps its last finite weights for `edgefa diagnose`; the returned losses end with it.

    `shard` = (rank, world): this process takes the rank-th of `world` equal, contiguous slices of
    every global batch (`batch_size` samples) and its loss is the mean over that slice, so with
    `model` a DistributedDataParallel wrapper (which averages gradients over the ranks) the world
    together takes exactly the step one process takes on the whole batch (training/distributed.py).
    """
    net = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    rank, world = shard
    # DFA on an MLP, trained alone with plain SGD: the step written out, no autograd (dfa_step.py)
    explicit = model is net and world == 1 and explicit_dfa_applies(net, optimizer, penalty)
    losses = []
    for step in range(first_step, first_step + steps):
        net.bp_step = is_bp_step(net.config, step)
        idx = batch_indices(len(y), batch_size, seed, step)
        if world > 1:
            if len(idx) % world:
                raise ValueError(f"a global batch of {len(idx)} samples does not split into {world} equal shards")
            part = len(idx) // world
            idx = idx[rank * part:(rank + 1) * part]
        idx = torch.from_numpy(idx).to(X.device)
        if explicit and not net.bp_step:
            losses.append(explicit_dfa_step(net, optimizer, X[idx], y[idx]))
            if not np.isfinite(losses[-1]):
                break           # the step left the weights as they were
            if on_step:
                on_step(losses[-1])
            continue
        loss = task_loss(net, model(X[idx]), y[idx], penalty)
        losses.append(loss.item())
        if world == 1 and not np.isfinite(losses[-1]):
            break               # keep the last finite weights (a DDP rank cannot leave the collective alone)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step:
            on_step(losses[-1])
    net.bp_step = False
    return losses


def finetune_bp(run: Run, train_ds: Dataset, test_ds: Dataset, steps: int, batch_size: int, lr: float,
                momentum: float, seed: int, on_step: Callable[[float], None] | None = None) -> float:
    """Test accuracy after BP fine-tuning a copy of `run`'s model on `train_ds`: the host reference
    for device DFA fine-tuning, from the same weights, on the same batches (`train_steps`, the device
    runtime's order), with the same optimizer. `run` itself is left as it is."""
    model = model_from_config({**run.model.config.to_dict(), "rule": "bp"})
    state = run.model.state_dict()
    model.load_state_dict({k: state[k] for k in model.state_dict()})      # the feedback buffers stay out
    device = next(run.model.parameters()).device
    model.to(device)
    X, y = to_tensors(train_ds, run.standardizer, device)
    train_steps(model, make_optimizer(model, lr, momentum), X, y, steps, batch_size, seed, on_step=on_step)
    return evaluate(model, *to_tensors(test_ds, run.standardizer, device))[1]


class SingleProcess:
    """How `train` runs alone; training/distributed.py's DDPReplicas runs it as one rank of many."""

    rank, world = 0, 1

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return module

    def mean_loss(self, losses: list[float], device: torch.device) -> float:
        return float(np.mean(losses))

    def check(self, module: torch.nn.Module, when: str) -> None:
        pass

    def describe(self) -> dict:
        return {}


def train(config: TrainConfig, on_epoch: Callable[[int, dict], None] | None = None,
          data: Dataset | None = None, replicas=None, device: torch.device | None = None) -> Run:
    """Train by `config`; `data` is `config.dataset` already loaded (the CLI loads it first, so a
    bad file is reported before any progress is shown). With `replicas` (distributed.py) this
    process is one rank: it takes its shard of every global batch, and only rank 0 evaluates,
    logs alignment and reports."""
    replicas = replicas or SingleProcess()
    rank, world = replicas.rank, replicas.world
    seed_everything(config.seed)
    device = device or pick_device(config.device)
    full = data if data is not None else load_dataset(config.dataset)
    train_ds, test_ds = stratified_split(full, config.test_fraction, config.seed)
    std = Standardizer.fit(train_ds.X)
    Xtr, ytr = to_tensors(train_ds, std, device)
    Xte, yte = to_tensors(test_ds, std, device)

    module = build_model(config, train_ds.X.shape[1], full.n_classes, full.image_shape).to(device)
    replicas.check(module, "initial weights and feedback")
    model = replicas.wrap(module)
    optimizer = make_optimizer(module, config.lr, config.momentum)
    global_batch = min(config.batch_size, len(ytr))
    steps_per_epoch = max(1, len(ytr) // global_batch)
    metrics = {"dataset": full.name, "method": config.method, "model": config.model, "device": str(device),
               "n_train": len(ytr), "n_test": len(yte), **replicas.describe(), "epochs": []}
    alignment = config.alignment and rank == 0
    if alignment:               # a fixed probe: the first (up to) 256 standardized training samples
        probe_X, probe_y = Xtr[:min(256, len(ytr))], ytr[:min(256, len(ytr))]
    last_finite = None          # (epoch, weights, optimizer state) at the end of the last finite epoch
    for epoch in range(config.epochs):
        losses = train_steps(model, optimizer, Xtr, ytr, steps_per_epoch, config.batch_size,
                             config.seed, first_step=epoch * steps_per_epoch, penalty=config.penalty,
                             shard=(rank, world))
        batch_loss_mean = replicas.mean_loss(losses, device)   # every rank gets it: all stop together
        if rank == 0:           # evaluated on the module itself (a DDP forward is a collective)
            train_loss, train_acc = evaluate(module, Xtr, ytr)
            test_loss, test_acc = evaluate(module, Xte, yte)
            row = {"epoch": epoch + 1, "batch_loss_mean": batch_loss_mean,
                   "train_loss": train_loss, "train_accuracy": train_acc,
                   "test_loss": test_loss, "test_accuracy": test_acc}
            if alignment:       # float64 copies: no RNG drawn, no grads left, mode kept (bit-identical runs)
                row["alignment"] = measure_alignment(module, probe_X, probe_y, config.penalty)
            metrics["epochs"].append(row)
            if on_epoch:
                on_epoch(epoch + 1, row)
        if not np.isfinite(batch_loss_mean):    # nothing more to learn from NaN weights
            metrics["diverged"] = {"epoch": epoch + 1, "note": "the training loss became non-finite; "
                                   "training stopped (try a smaller --lr, or --penalty for residual models)"}
            if last_finite is not None:         # keep weights whose forward pass is finite, for diagnosis
                module.load_state_dict(last_finite[1])
                optimizer.load_state_dict(last_finite[2])
                metrics["diverged"]["weights_of_epoch"] = last_finite[0]
            break
        if world == 1:
            last_finite = (epoch + 1, copy.deepcopy(module.state_dict()), copy.deepcopy(optimizer.state_dict()))
    replicas.check(module, "trained weights")
    kept = (metrics.get("diverged") or {}).get("weights_of_epoch")
    final = metrics["epochs"][kept - 1] if kept else (metrics["epochs"][-1] if metrics["epochs"] else None)
    metrics["final_test_accuracy"] = final["test_accuracy"] if final else None
    return Run(module, optimizer, config, std, metrics, full.image_shape)


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
    try:
        model = model_from_config(payload["model_config"]).to(device)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad model config ({exc})") from None
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
