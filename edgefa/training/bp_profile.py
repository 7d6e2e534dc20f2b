"""The torch side of `edgefa profile compare`: BP fine-tuning of the bundle's own model, under
the same profiler, batches, optimizer settings and energy source as the DFA side.

    python -m edgefa.training.bp_profile --bundle B --config JSON [--data SPEC] --out FILE

It runs in a process of its own so that its peak RSS is torch's and nothing else's.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.nn import functional as F

from ..bundle import read_bundle
from ..models import MLP, MLPConfig
from ..profile_runs.session import (ProfileConfig, device_profile_summary, main, model_line, profile_header,
                                   synthetic_data)
from ..profiling.machine import device_description, open_profiler
from ..profiling.memory import rss_bytes
from ..runtime.finetune import standardize
from ..shared.batches import batch_indices
from ..shared.datasets import Dataset
from .trainer import make_optimizer


def mlp_from_bundle(bundle) -> MLP:
    """A BP MLP holding the bundle's weights (bundle fc{i}.* / head.* -> torch's layers)."""
    topo = bundle.model
    hidden = [layer["out"] for layer in topo["layers"][:-1]]
    model = MLP(MLPConfig(topo["in_features"], hidden, topo["n_classes"], topo["activation"], rule="bp"))
    with torch.no_grad():
        for name, lin in zip(model.layer_names(), model.linears()):
            lin.weight.copy_(torch.from_numpy(bundle.weights[f"{name}.weight"]))
            lin.bias.copy_(torch.from_numpy(bundle.weights[f"{name}.bias"]))
    return model


def bp_step_cost(model: dict, batch: int, momentum: float) -> tuple[float, float]:
    """FLOPs and compulsory bytes of one BP step: forward, the two backward Gemms per layer
    (input and weight gradients), SGD; traffic as the DFA step's plus the gradient buffers."""
    weights = sum(layer["in"] * layer["out"] for layer in model["layers"])
    params = weights + sum(layer["out"] for layer in model["layers"])
    flops = 6 * batch * weights + (4 if momentum else 2) * params
    state = params * (2 if momentum else 1)
    return float(flops), float(4 * (2 * state + 2 * params + batch * (model["in_features"] + 1)))


def profile_bp(bundle_path, cfg: ProfileConfig, data: Dataset | None = None) -> dict:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    # on a GPU host BP runs there, as onnxruntime's CUDA provider would run the DFA side
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.provider != "CPUExecutionProvider" else "cpu")
    profiler, machine = open_profiler(cfg.profile, work_on_gpu=device.type == "cuda", warmup=cfg.warmup,
                                      sample_interval_s=cfg.sample_interval_s)
    if device.type == "cuda":
        profiler.gpu_memory = lambda: {"source": "torch.cuda (this process)",
                                       "used_bytes": torch.cuda.memory_allocated(),
                                       "peak_bytes": torch.cuda.max_memory_allocated()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with profiler:
        rss_before = rss_bytes()
        with profiler.window("load"):
            bundle = read_bundle(bundle_path)
            model = mlp_from_bundle(bundle).to(device)
            momentum = float(bundle.manifest["optimizer"]["momentum"])
            opt = make_optimizer(model, float(bundle.manifest["optimizer"]["lr"]), momentum)
        data = data or synthetic_data(bundle, max(16 * cfg.batch_size, 256), cfg.seed)
        X = torch.from_numpy(standardize(bundle, data, data.name)).to(device)
        y = torch.from_numpy(data.y).to(device)
        flops, nbytes = bp_step_cost(bundle.model, cfg.batch_size, momentum)
        losses = []
        for step in range(cfg.steps):
            idx = torch.from_numpy(batch_indices(len(y), cfg.batch_size, cfg.seed, step)).to(device)
            xb, yb = X[idx], y[idx]
            with profiler.window("train_step", flops, nbytes):
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sync()                       # the window ends when the GPU has finished the step
            losses.append(loss.item())
        profiler.extra["runtime_growth_bytes"] = rss_bytes() - rss_before if rss_before else None
    return {**profile_header(f"edgefa profile: BP in torch on {Path(bundle_path).name}", "local (torch)", cfg,
                             device_profile_summary(machine), device_description()),
            **profiler.summary(), "link": None,
            "finetune": {"providers": [f"torch {torch.__version__} {device.type}"], "steps_run": len(losses),
                         "batch_size": cfg.batch_size, "loss_first": losses[0] if losses else None,
                         "loss_last": losses[-1] if losses else None, "refused_steps": []},
            "model": model_line(bundle.manifest), "energy_line": machine.energy_line}


if __name__ == "__main__":
    main(run=profile_bp)
