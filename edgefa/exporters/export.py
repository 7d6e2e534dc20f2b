"""Turn a trained run into a bundle: topology, graphs, weights, stored feedback, hashed manifest.

The device trains two kinds of model: the MLP and the pre-LN residual MLP (`resmlp`). Both export
a DFA train_step graph for cross-entropy; an MLP scorer (one output) can instead export a
Bradley-Terry step on pairs (`loss="bradley-terry"`). `trainable="last:K"` writes a step that
updates only the last K units from the head (bundle.trainable_units); the rest stay frozen.

Both graphs are also checked for TensorRT (tensorrt_ready: operators, opset, static ranks, the
batch profile) against the targeted TensorRT release; the bundle records the verdict in its
manifest ("tensorrt") and carries tensorrt/readiness.json and tensorrt/trtexec.sh, the engine
builds to run on the device, and tensorrt/infer_refit.onnx, the forward pass with the weights as
initializers that the device builds its refittable inference engine from.
`require_tensorrt=True` refuses to write a bundle that is not ready.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..bundle import (LOSS_BRADLEY_TERRY, LOSS_CROSS_ENTROPY, REFIT_GRAPH, feedback_shapes, parse_trainable,
                      write_bundle)
from ..errors import EdgefaError
from ..models.rules import dfa_feedback_std, draw_feedback
from ..training.trainer import Run
from .onnx_graphs import OPSET, infer_graph, refittable_infer_graph, serialize_checked, train_step_graph
from .tensorrt_ready import (DEFAULT_PROFILE, bundle_files, check_profile, load_target, manifest_section,
                             readiness, summary_line)

DEVICE_KINDS = ("mlp", "resmlp")
LN_EPS = 1e-5


def check_exportable(model) -> str:
    kind = model.kind
    if kind not in DEVICE_KINDS:
        raise EdgefaError(f"export: {kind} models are host-only; the device trains mlp and resmlp bundles")
    return kind


def topology(model) -> dict:
    if model.kind == "resmlp":
        return _resmlp_topology(model)
    cfg = model.config
    layers = [{"name": n, "in": lin.in_features, "out": lin.out_features}
              for n, lin in zip(model.layer_names(), model.linears())]
    return {"kind": "mlp", "in_features": cfg.in_features, "n_classes": cfg.n_classes,
            "activation": cfg.activation, "layers": layers}


def _resmlp_topology(model) -> dict:
    cfg = model.config
    eps = {float(m.eps) for m in [model.norm, *(b.norm for b in model.blocks)]}
    if eps != {LN_EPS}:
        raise EdgefaError(f"export: this resmlp's LayerNorms use eps {sorted(eps)}; the device graphs use {LN_EPS}")
    return {"kind": "resmlp", "in_features": int(np.prod(cfg.in_shape)), "n_classes": cfg.n_outputs,
            "width": cfg.width, "depth": cfg.depth, "expansion": cfg.expansion,
            "activation": cfg.activation, "ln_eps": LN_EPS}


def dfa_feedback(model) -> tuple[dict[str, np.ndarray], dict]:
    """The B the device will use: the run's own when it trained with DFA; otherwise drawn once
    here from the recorded seed (and stored, so the device never draws anything). All of them,
    keyed as in bundle.feedback_shapes of the whole (all-trainable) model."""
    if model.kind == "resmlp":
        return _resmlp_feedback(model)
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


def _resmlp_feedback(model) -> tuple[dict[str, np.ndarray], dict]:
    """FeedbackNet.finish draws B_stage for dfa and hybrid runs; for any other rule a dfa-rule twin
    of the model draws the same ones from the run's feedback seed (the global RNG left untouched)."""
    cfg = model.config
    if cfg.rule in ("dfa", "hybrid"):
        source, net = f"trained with (host {cfg.rule} run)", model
    else:
        with torch.random.fork_rng(devices=[]):
            net = type(model)(replace(cfg, rule="dfa", freeze_blocks=False))
        source = f"drawn at export (host run used {cfg.rule})"
    arrays = {name: b.detach().cpu().numpy().astype(np.float32)
              for name, b in zip(net.stage_names(), net.dfa_feedback())}
    info = {"seed": cfg.feedback_seed, "distribution": "normal", "mean": 0.0, "std": dfa_feedback_std(cfg.n_outputs),
            "generator": "torch.Generator (CPU) + torch.randn, one matrix per stage in order "
                         "(FeedbackNet.finish)",
            "source": source}
    return arrays, info


def run_loss(run: Run, loss: str | None) -> str:
    """The bundle's loss: `loss` when given, else the run's (`run.loss` or `run.config.loss`,
    "bradley-terry" for a preference run), else cross-entropy."""
    name = loss or getattr(run, "loss", None) or getattr(run.config, "loss", None) or "cross_entropy"
    if name in ("cross_entropy", LOSS_CROSS_ENTROPY):
        return LOSS_CROSS_ENTROPY
    if name == LOSS_BRADLEY_TERRY:
        return LOSS_BRADLEY_TERRY
    raise EdgefaError(f"export: the device trains cross_entropy and bradley-terry bundles, not {name!r}")


def build_manifest(run: Run, topo: dict, feedback_info: dict, momentum: float, lr: float,
                   loss: str = LOSS_CROSS_ENTROPY) -> dict:
    return {
        "edgefa_version": __version__,
        "model": topo,
        "input": {"standardize": run.standardizer.to_dict(),
                  "image_shape": list(run.image_shape) if run.image_shape else None},
        "loss": loss,
        "update_rule": "dfa",
        "optimizer": {"name": "sgd", "lr": lr, "momentum": momentum, "dampening": 0.0,
                      "nesterov": False, "weight_decay": 0.0},
        "feedback": feedback_info,
        "graphs": {"opset": OPSET, "infer": "infer.onnx", "train_step": "train_step.onnx"},
        "host_run": {"method": run.config.method, "dataset": run.config.dataset,
                     "final_test_accuracy": run.metrics.get("final_test_accuracy")},
    }


def export_bundle(run: Run, out_dir: str | os.PathLike, momentum: float | None = None,
                  lr: float | None = None, trainable: str = "all", loss: str | None = None,
                  trt_target: str = "10.3", batch_profile=DEFAULT_PROFILE, fp16_infer: bool = True,
                  require_tensorrt: bool = False) -> Path:
    """`trainable`: "all" or "last:K" (see bundle.trainable_units). `loss`: None (the run's),
    "cross_entropy" or "bradley-terry" (an MLP scorer with one output, trained on pairs).
    `trt_target`: the TensorRT release the graphs are checked against ("8.5": JetPack 5.1,
    "10.3": JetPack 6.1/6.2); `batch_profile`: (min, opt, max) batch of the engines' optimization
    profile; `fp16_infer`: let infer.onnx build in FP16 (train_step never does);
    `require_tensorrt`: a graph that is not ready is an EdgefaError and nothing is written."""
    check_exportable(run.model)
    try:
        target, profile = load_target(trt_target), check_profile(batch_profile)
    except EdgefaError as exc:
        raise EdgefaError(f"export: {exc}") from None
    momentum = run.config.momentum if momentum is None else momentum
    lr = run.config.lr if lr is None else lr
    loss = run_loss(run, loss)
    topo = topology(run.model)
    try:
        k = parse_trainable(trainable, topo)
    except EdgefaError as exc:
        raise EdgefaError(f"export: --{exc}") from None
    topo["trainable"] = "all" if k is None else f"last:{k}"
    if loss == LOSS_BRADLEY_TERRY and (topo["kind"] != "mlp" or topo["n_classes"] != 1):
        raise EdgefaError(f"export: a bradley-terry bundle needs an MLP scorer with one output, "
                          f"not a {topo['kind']} with {topo['n_classes']}")
    feedback, info = dfa_feedback(run.model)
    feedback = {k: feedback[k] for k in feedback_shapes(topo)}     # the trainable stages' only
    graphs = {"infer.onnx": serialize_checked(infer_graph(topo)),
              "train_step.onnx": serialize_checked(train_step_graph(topo, momentum, loss))}
    trt = readiness(graphs, target, profile)
    if require_tensorrt and not trt["ready"]:
        raise EdgefaError(f"export: tensorrt {target.version}: {summary_line(trt)}; no bundle written")
    if topo["kind"] == "resmlp":
        weights = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in run.model.named_parameters()}
    else:
        weights = {_param_name(k): v.detach().cpu().numpy().astype(np.float32)
                   for k, v in run.model.state_dict().items() if not k.startswith("feedback_")}
    manifest = build_manifest(run, topo, info, momentum, lr, loss)
    manifest["tensorrt"] = manifest_section(trt, fp16_infer)
    extra = bundle_files(trt, graphs, fp16_infer)
    extra[REFIT_GRAPH] = serialize_checked(refittable_infer_graph(topo, weights))
    return write_bundle(out_dir, manifest, graphs, weights, feedback, extra_files=extra)


def _param_name(state_key: str) -> str:
    """torch's `hidden_layers.3.weight` / `head.bias` -> the bundle's `fc3.weight` / `head.bias`.
    (A resmlp's parameter names are the bundle's names as they are.)"""
    if state_key.startswith("hidden_layers."):
        _, idx, kind = state_key.split(".")
        return f"fc{idx}.{kind}"
    return state_key
