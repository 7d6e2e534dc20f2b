"""The torch side of `edgefa profile compare`: BP fine-tuning of the bundle's own model, under
the same profiler, batches, optimizer settings and energy source as the DFA side.

    python -m edgefa.training.bp_profile --bundle B --config JSON [--data SPEC] --out FILE

It runs in a process of its own so that its peak RSS is torch's and nothing else's.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..bundle import (TRUNK_GRAPH, conv_spatial, layer_shapes, model_kind, param_shapes, part_topology, read_bundle,
                      trainable_layers, trainable_params, trunk_of)
from ..errors import EdgefaError
from ..models import NetConfig, ResMLP
from ..models.feedback_net import ACTIVATIONS
from ..profile_runs.session import (ProfileConfig, device_profile_summary, main, model_line, profile_header,
                                   synthetic_data)
from ..profiling.machine import device_description, open_profiler
from ..profiling.memory import rss_bytes
from ..runtime.finetune import standardize
from ..shared.batches import batch_indices
from ..shared.datasets import Dataset
from .trainer import make_optimizer


class _LayerStack(nn.Module):
    """A bundle's mlp or cnn part as torch layers named as the bundle names them (`conv1.weight`,
    `fc.bias`, `head.weight`): the conv stages (conv, activation, max-pool where the topology
    pools), then the Linear layers with the activation between them."""

    def __init__(self, model: dict):
        super().__init__()
        self.act = ACTIVATIONS[model["activation"]]()
        self.in_shape, self.pools = model.get("in_shape"), []
        self.convs, self.linears = [c["name"] for c in model.get("convs", [])], [l["name"] for l in model["layers"]]
        for c in model.get("convs", []):
            conv = nn.Conv1d if len(c["in_spatial"]) == 1 else nn.Conv2d
            self.add_module(c["name"], conv(c["in_channels"], c["out_channels"], c["kernel"], stride=c["stride"],
                                            padding=c["padding"]))
            self.pools.append((nn.MaxPool1d if len(c["in_spatial"]) == 1 else nn.MaxPool2d)(c["pool"])
                              if c["pool"] > 1 else nn.Identity())
        for layer in model["layers"]:
            self.add_module(layer["name"], nn.Linear(layer["in"], layer["out"]))

    def forward(self, x):
        h = x.reshape(-1, *self.in_shape) if self.convs else x
        for name, pool in zip(self.convs, self.pools):
            h = pool(self.act(getattr(self, name)(h)))
        h = h.flatten(1)
        for name in self.linears[:-1]:
            h = self.act(getattr(self, name)(h))
        return getattr(self, self.linears[-1])(h)


def _layer_stack(model: dict) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    net = _LayerStack(model)
    return net, dict(net.named_parameters())


def _resmlp(model: dict) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """The pre-LN residual MLP of the same width, depth, expansion and activation, and the bundle's
    LayerNorm epsilon (torch's default is the exporter's, but the manifest is what the device runs).
    Its parameter names are the bundle's."""
    net = ResMLP(NetConfig("resmlp", [model["in_features"]], model["n_classes"], rule="bp", width=model["width"],
                           depth=model["depth"], expansion=model["expansion"], activation=model["activation"]))
    for module in net.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = float(model["ln_eps"])
    return net, dict(net.named_parameters())


class _OnTrunk(nn.Module):
    """The trained part under the bundle's frozen trunk. The trunk has no torch form here (it is
    an ONNX graph, possibly the user's), so onnxruntime computes its features, with no gradient:
    what `requires_grad=False` on a torch trunk would give; torch BP trains the part above it."""

    def __init__(self, part: nn.Module, trunk_graph: Path, trunk_weights: dict[str, np.ndarray]):
        super().__init__()
        import onnxruntime as ort

        self.part, self.feeds = part, {n: np.ascontiguousarray(a) for n, a in trunk_weights.items()}
        self.session = ort.InferenceSession(str(trunk_graph), providers=["CPUExecutionProvider"])

    def forward(self, x):
        features = self.session.run(["features"], {"x": x.detach().cpu().numpy(), **self.feeds})[0]
        return self.part(torch.from_numpy(features).to(x.device))


# bundle.model_kind -> (the torch module of that kind, untrained, plain BP; its parameters by bundle name)
BP_TWINS = {"mlp": _layer_stack, "cnn": _layer_stack, "resmlp": _resmlp}


def bp_twin(model_topology: dict, weights: dict[str, np.ndarray] | None = None,
            trunk_graph: Path | None = None) -> nn.Module:
    """The torch module that BP fine-tunes in place of a bundle's model (manifest["model"]): the same
    kind and shapes, holding `weights` (the bundle's arrays, by bundle name) when given, and with
    `requires_grad` only on the tensors the device trains (bundle.trainable_params: the `last:K`
    split), so that BP and DFA update the same parameters. A bundle with a frozen trunk needs
    `weights` and `trunk_graph` (its trunk.onnx): the part sits on the trunk (_OnTrunk). A kind it
    cannot build is one line naming what it builds (profile_runs.compare.check_comparable says it
    first, before any work)."""
    kind, trunk = model_kind(model_topology), trunk_of(model_topology)
    build = BP_TWINS.get(kind)
    if build is None:
        raise EdgefaError(f"no BP twin for a {kind!r} bundle: the BP side builds {', '.join(BP_TWINS)} models")
    if trunk is not None and (trunk_graph is None or weights is None):
        raise EdgefaError("the BP twin of a bundle on a frozen trunk needs its weights and trunk graph")
    part = part_topology(model_topology)
    net, params = build(part)
    shapes = {n: s for n, s in param_shapes(model_topology).items() if trunk is None or n not in trunk["params"]}
    if len(params) != len(list(net.parameters())) or \
            {n: tuple(p.shape) for n, p in params.items()} != {n: tuple(s) for n, s in shapes.items()}:
        raise EdgefaError(f"the BP twin of this {kind} bundle does not match its tensors (an edgefa bug)")
    trainable = trainable_params(model_topology)
    with torch.no_grad():
        for name, p in params.items():
            if weights is not None:
                p.copy_(torch.from_numpy(np.asarray(weights[name], np.float32)))
            p.requires_grad_(name in trainable)
    if trunk is None:
        return net
    return _OnTrunk(net, trunk_graph, {n: weights[n] for n in trunk["params"]})


def bp_step_cost(model: dict, batch: int, momentum: float) -> tuple[float, float]:
    """FLOPs and compulsory bytes of one BP step of the bundle's trainable part: the forward pass,
    the weight gradient of every trainable matmul, the input gradient of every matmul from the head
    down to the lowest trainable one (the error's way back), SGD on the trainable tensors; traffic
    as the DFA step's plus the gradient buffers; a frozen trunk's forward (its manifest count).
    (An mlp trained whole: 6 x batch x weights + SGD.)"""
    # multiply-adds per sample of each matmul; a conv's is its weight size times its output positions
    positions = {c["name"]: int(np.prod(conv_spatial(c))) for c in part_topology(model).get("convs", [])}
    mats = [(name, int(np.prod(w)) * positions.get(name, 1)) for name, (w, _) in layer_shapes(model).items()
            if len(w) >= 2]
    trained = set(trainable_layers(model))
    trained_at = [i for i, (name, _) in enumerate(mats) if name in trained]
    trunk = trunk_of(model) or {}
    forward = 2 * batch * sum(size for _, size in mats) + batch * (trunk.get("flops_per_sample") or 0)
    weight_grads = 2 * batch * sum(size for name, size in mats if name in trained)
    input_grads = 2 * batch * sum(size for _, size in mats[trained_at[0]:]) if trained_at else 0
    params = sum(int(np.prod(s)) for s in param_shapes(model).values())
    trainable = sum(int(np.prod(s)) for s in trainable_params(model).values())
    flops = forward + weight_grads + input_grads + (4 if momentum else 2) * trainable
    state = params + trainable * (1 if momentum else 0)
    return float(flops), float(4 * (2 * state + 2 * trainable + batch * (model["in_features"] + 1)))


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
            model = bp_twin(bundle.model, bundle.weights, bundle.path / TRUNK_GRAPH).to(device)
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
                         "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                         "batch_size": cfg.batch_size, "loss_first": losses[0] if losses else None,
                         "loss_last": losses[-1] if losses else None, "refused_steps": []},
            "model": model_line(bundle.manifest), "energy_line": machine.energy_line}


if __name__ == "__main__":
    main(run=profile_bp)
