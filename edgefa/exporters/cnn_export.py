"""A host CNN (models/cnn.py) as the device's cnn part: topology, weights and DFA feedback.

The part starts at conv stage `first_stage` (the stages below it are a frozen trunk, exported
elsewhere) and holds every later conv stage, fc and the head, all trained on the device. Names
follow the bundle's contract (bundle.py): `conv{i}.weight` [O, C, k(, k)], `conv{i}.bias`,
`fc.*`, `head.*`; feedback `conv{i}` [classes, O * prod(out_spatial)] and `fc` [classes, F],
where i is the stage's index in the whole model (a part cut above conv0 starts at conv{first}).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from ..bundle import conv_spatial
from ..errors import EdgefaError
from ..models.rules import dfa_feedback_std


def _check_cut(model, first_stage: int) -> None:
    if getattr(model, "kind", None) != "cnn":
        raise EdgefaError(f"cnn export: expected a cnn model, got {getattr(model, 'kind', type(model).__name__)}")
    depth = len(model.convs)
    if not 0 <= first_stage < depth:
        raise EdgefaError(f"cnn export: first_stage {first_stage} is not a conv stage of this cnn (0 to {depth - 1})")


def _stage_conv(model, i: int):
    return model.convs[i][0]      # Sequential(FeedbackConv, activation[, pool])


def cnn_topology(model, first_stage: int = 0) -> dict:
    """The manifest "model" of the part starting at conv stage `first_stage` (bundle.py's format:
    in_shape is one sample of that stage's input, which arrives flat [batch, in_features])."""
    _check_cut(model, first_stage)
    cfg = model.config
    channels, spatial = cfg.in_shape[0], list(cfg.in_shape[1:])
    convs, in_shape = [], None
    for i, stage in enumerate(model.convs):
        conv = stage[0]
        if len(set(conv.stride)) != 1 or len(set(conv.padding)) != 1:
            raise EdgefaError(f"cnn export: conv{i} has unequal strides or paddings {conv.stride}, {conv.padding}")
        entry = {"name": f"conv{i}", "in_channels": channels, "out_channels": int(conv.weight.shape[0]),
                 "kernel": int(conv.weight.shape[2]), "stride": int(conv.stride[0]), "padding": int(conv.padding[0]),
                 "pool": 2 if isinstance(stage[-1], (torch.nn.MaxPool1d, torch.nn.MaxPool2d)) else 1,
                 "in_spatial": spatial}
        entry["out_spatial"] = [s // entry["pool"] for s in conv_spatial(entry)]
        if i == first_stage:
            in_shape = [channels, *spatial]
        if i >= first_stage:
            convs.append(entry)
        channels, spatial = entry["out_channels"], entry["out_spatial"]
    fc, head = model.fc[1], model.head
    return {"kind": "cnn", "in_features": math.prod(in_shape), "n_classes": cfg.n_outputs,
            "activation": cfg.activation, "in_shape": in_shape, "convs": convs,
            "layers": [{"name": "fc", "in": fc.in_features, "out": fc.out_features},
                       {"name": "head", "in": head.in_features, "out": head.out_features}]}


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def cnn_weights(model, first_stage: int = 0) -> dict[str, np.ndarray]:
    """The part's weights under the bundle's names, float32."""
    _check_cut(model, first_stage)
    weights = {}
    for i in range(first_stage, len(model.convs)):
        conv = _stage_conv(model, i)
        weights[f"conv{i}.weight"], weights[f"conv{i}.bias"] = _numpy(conv.weight), _numpy(conv.bias)
    for name, linear in (("fc", model.fc[1]), ("head", model.head)):
        weights[f"{name}.weight"], weights[f"{name}.bias"] = _numpy(linear.weight), _numpy(linear.bias)
    return weights


def _dfa_twin(model):
    """The model whose feedback buffers are the run's B: the model itself for dfa and hybrid runs;
    for any other rule a dfa-rule twin built from the same config, which draws the same B from the
    run's feedback seed (FeedbackNet.finish), the global RNG left where it was."""
    if model.config.rule in ("dfa", "hybrid"):
        return model
    with torch.random.fork_rng(devices=[]):
        return type(model)(replace(model.config, rule="dfa", freeze_blocks=False))


def cnn_feedback(model, first_stage: int = 0) -> dict[str, np.ndarray]:
    """The B of the part's conv stages and fc, keyed as bundle.feedback_shapes of cnn_topology."""
    _check_cut(model, first_stage)
    twin = _dfa_twin(model)
    stages = [f"conv{i}" for i in range(first_stage, len(model.convs))] + ["fc"]
    return {name: _numpy(getattr(twin, f"feedback_{name}")) for name in stages}


def cnn_feedback_info(model) -> dict:
    """The manifest "feedback" provenance of cnn_feedback (as export.py's _resmlp_feedback)."""
    cfg = model.config
    source = (f"trained with (host {cfg.rule} run)" if cfg.rule in ("dfa", "hybrid")
              else f"drawn at export (host run used {cfg.rule})")
    return {"seed": cfg.feedback_seed, "distribution": "normal", "mean": 0.0, "std": dfa_feedback_std(cfg.n_outputs),
            "generator": "torch.Generator (CPU) + torch.randn, one matrix per stage in order (FeedbackNet.finish)",
            "source": source}
