"""Turn a trained run into a bundle: topology, graphs, weights, stored feedback, hashed manifest."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .. import __version__
from ..bundle import feedback_shapes, write_bundle
from ..models.mlp import MLP, dfa_feedback_std
from ..training.rules import draw_feedback
from ..training.trainer import Run
from .onnx_graphs import OPSET, infer_graph, serialize_checked, train_step_graph


def topology(model: MLP) -> dict:
    cfg = model.config
    layers = [{"name": n, "in": lin.in_features, "out": lin.out_features}
              for n, lin in zip(model.layer_names(), model.linears())]
    return {"kind": "mlp", "in_features": cfg.in_features, "n_classes": cfg.n_classes,
            "activation": cfg.activation, "layers": layers}


def dfa_feedback(model: MLP) -> tuple[dict[str, np.ndarray], dict]:
    """The B_l the device will use: the run's own when it trained with DFA; otherwise drawn once
    here from the recorded seed (and stored, so the device never draws anything)."""
    topo = topology(model)
    shapes = feedback_shapes(topo)
    std = dfa_feedback_std(model.config.n_classes)
    if model.config.rule in ("dfa", "hybrid"):
        mats, source = [b.detach().cpu() for b in model.feedback()], f"trained with (host {model.config.rule} run)"
    else:
        mats = draw_feedback(list(shapes.values()), model.config.feedback_seed, [std] * len(shapes))
        source = f"drawn at export (host run used {model.config.rule})"
    arrays = {name: m.numpy().astype(np.float32) for name, m in zip(shapes, mats)}
    info = {"seed": model.config.feedback_seed, "distribution": "normal", "mean": 0.0, "std": std,
            "generator": "torch.Generator (CPU) + torch.randn, one matrix per hidden layer in order",
            "source": source}
    return arrays, info


def build_manifest(run: Run, topo: dict, feedback_info: dict, momentum: float, lr: float) -> dict:
    return {
        "edgefa_version": __version__,
        "model": topo,
        "input": {"standardize": run.standardizer.to_dict(),
                  "image_shape": list(run.image_shape) if run.image_shape else None},
        "loss": "cross_entropy (mean over the batch)",
        "update_rule": "dfa",
        "optimizer": {"name": "sgd", "lr": lr, "momentum": momentum, "dampening": 0.0,
                      "nesterov": False, "weight_decay": 0.0},
        "feedback": feedback_info,
        "graphs": {"opset": OPSET, "infer": "infer.onnx", "train_step": "train_step.onnx"},
        "host_run": {"method": run.config.method, "dataset": run.config.dataset,
                     "final_test_accuracy": run.metrics.get("final_test_accuracy")},
    }


def export_bundle(run: Run, out_dir: str | os.PathLike, momentum: float | None = None,
                  lr: float | None = None) -> Path:
    momentum = run.config.momentum if momentum is None else momentum
    lr = run.config.lr if lr is None else lr
    topo = topology(run.model)
    feedback, info = dfa_feedback(run.model)
    graphs = {"infer.onnx": serialize_checked(infer_graph(topo)),
              "train_step.onnx": serialize_checked(train_step_graph(topo, momentum))}
    weights = {k: v.detach().cpu().numpy().astype(np.float32)
               for k, v in run.model.state_dict().items() if not k.startswith("feedback_")}
    weights = {_param_name(k): v for k, v in weights.items()}
    return write_bundle(out_dir, build_manifest(run, topo, info, momentum, lr), graphs, weights, feedback)


def _param_name(state_key: str) -> str:
    """torch's `hidden_layers.3.weight` / `head.bias` -> the bundle's `fc3.weight` / `head.bias`."""
    if state_key.startswith("hidden_layers."):
        _, idx, kind = state_key.split(".")
        return f"fc{idx}.{kind}"
    return state_key
