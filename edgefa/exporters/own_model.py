"""Bring your own model: a user's network as a frozen trunk under a new head the device trains.

    bundle_from_onnx("kws.onnx", features="pool_out", out="bundle", head=[256, 10])
    bundle_from_module(backbone, example_input, out="bundle", head=[256, 10])

The trunk is the user's model up to a named tensor (ONNX) or the whole module (torch), exported by
torch's own exporter where it is torch (exporters/trunk.py). The head is a new MLP, hidden widths
then classes (`head=[256, 10]`: features -> 256 -> 10), initialised as edgefa's MLP is (seeded),
its DFA feedback drawn from `feedback_seed` and stored in the bundle. `trainable`: the whole head
("all"), or its last K layers ("last:K", "head" = the readout alone).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..bundle import NEW_HEAD_ACTIVATIONS as HEAD_ACTIVATIONS, LOSS_CROSS_ENTROPY, feedback_shapes, parse_trainable
from ..errors import EdgefaError
from ..models import MLP, MLPConfig
from . import trunk as trunks
from .export import DeviceSplit, dfa_feedback, manifest_for, topology, write_device_bundle, _param_name
from .tensorrt_ready import DEFAULT_PROFILE



def bundle_from_onnx(model_path: str | os.PathLike, features: str, out: str | os.PathLike, head: list[int],
                     **options) -> Path:
    """The user's ONNX model cut at `features` (a tensor or node name) under a new head."""
    return _bundle(trunks.from_onnx(model_path, features), out, head, **options)


def bundle_from_module(module: torch.nn.Module, example_input, out: str | os.PathLike, head: list[int],
                       **options) -> Path:
    """A torch module (the frozen feature extractor; what it returns is flattened) under a new
    head. `example_input`: two or more samples shaped as the module takes them."""
    trunk = trunks.from_module(module, example_input, source=f"torch.onnx export of {type(module).__name__}",
                               cut="the module's output")
    return _bundle(trunk, out, head, **options)


def _new_head(features: int, hidden: list[int], classes: int, activation: str, seed: int, feedback_seed: int):
    """The new head, initialised from `seed` (the global RNG left as it was): edgefa's MLP, or
    with no hidden widths a single linear readout named `head`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if hidden:
            net = MLP(MLPConfig(features, hidden, classes, activation, "dfa", feedback_seed=feedback_seed))
            return net, topology(net)
        net = torch.nn.Module()
        net.head = torch.nn.Linear(features, classes)
    return net, {"kind": "mlp", "in_features": features, "n_classes": classes, "activation": activation,
                 "layers": [{"name": "head", "in": features, "out": classes}]}


def _bundle(trunk: trunks.Trunk, out, head: list[int], trainable: str = "all", activation: str = "relu",
            momentum: float = 0.9, lr: float = 0.01, seed: int = 0, feedback_seed: int = 1,
            standardize: tuple[float, float] = (0.0, 1.0), trt_target: str = "10.3",
            batch_profile=DEFAULT_PROFILE, fp16_infer: bool = True, require_tensorrt: bool = False,
            refit_graph: bool = False) -> Path:
    widths = [int(w) for w in head]
    if not widths or any(w < 1 for w in widths):
        raise EdgefaError(f"head {head}: needs positive widths, the last one the number of classes")
    if activation not in HEAD_ACTIVATIONS:
        raise EdgefaError(f"head activation {activation!r}: expected one of {', '.join(HEAD_ACTIVATIONS)}")
    *hidden, classes = widths
    net, part = _new_head(trunk.features, hidden, classes, activation, seed, feedback_seed)
    try:
        k = parse_trainable(trainable, part)
    except EdgefaError as exc:
        raise EdgefaError(f"--{exc}") from None
    part["trainable"] = "all" if k is None else f"last:{k}"
    if hidden:
        feedback, info = dfa_feedback(net)
        info["source"] = f"drawn for the new head (seed {feedback_seed})"
    else:
        feedback, info = {}, {"source": "none: a head alone trains on its true gradient", "seed": feedback_seed}
    weights = {_param_name(name): v.detach().numpy().astype(np.float32)
               for name, v in net.state_dict().items() if not name.startswith("feedback_")}
    model = dict(part, in_features=trunk.in_features, trunk=trunk.manifest_section())
    split = DeviceSplit(model, {**trunk.params, **weights}, {n: feedback[n] for n in feedback_shapes(part)},
                        info, trunk)
    mean, std = standardize
    manifest = manifest_for(model, info, momentum, lr, LOSS_CROSS_ENTROPY,
                            standardize={"mean": float(mean), "std": float(std)},
                            host_run={"method": "frozen trunk + new head", "dataset": None,
                                      "final_test_accuracy": None})
    return write_device_bundle(out, manifest, split, momentum, LOSS_CROSS_ENTROPY, trt_target, batch_profile,
                               fp16_infer, require_tensorrt, refit_graph)
