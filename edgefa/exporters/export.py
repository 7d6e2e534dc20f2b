"""Turn a trained run into a bundle: topology, graphs, weights, stored feedback, hashed manifest.

Every model kind exports. The device trains by DFA, in hand-built graphs, the MLP, the pre-LN
residual MLP (`resmlp`) and the CNN's conv, fc and head stages; an MLP scorer (one output) can
instead export a Bradley-Terry step on pairs (`loss="bradley-terry"`). `trainable` chooses what the
device trains: "all" (where the device can train it), "last:K" (the last K units from the head,
bundle.trainable_units) or "head" (last:1). For mlp and resmlp the frozen layers stay inside the
hand-built graphs as frozen inputs; for cnn, vit and transformer everything below the cut is a
frozen *trunk* exported by torch's own ONNX exporter (exporters/trunk.py, `device_split`), and
the manifest says where the cut is. A vit or transformer trains its head on the device (its
attention blocks have no DFA graph here).

Both graphs are also checked for TensorRT (tensorrt_ready: operators, opset, static ranks, the
batch profile) against the targeted TensorRT release; the bundle records the verdict in its
manifest ("tensorrt") and carries tensorrt/readiness.json and tensorrt/trtexec.sh, the engine
builds to run on the device. `refit_graph=True` (`export --tensorrt`) adds tensorrt/infer_refit.onnx,
the forward pass with the weights as initializers that TensorRT's refittable inference engine is
built from; it is a second copy of every weight, so by default the bundle leaves it out and the
device derives the same bytes when it builds its engines (runtime/refit_graph.py).
`require_tensorrt=True` refuses to write a bundle that is not ready.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..bundle import (HEAD_FACTORS_GRAPH, HEAD_STEP_GRAPH, LOSS_BRADLEY_TERRY, LOSS_CROSS_ENTROPY, REFIT_GRAPH,
                      STEP_FACTORS_GRAPH, TRUNK_GRAPH, check_trainable_syntax, feedback_shapes, param_shapes, parse_trainable, part_topology,
                      write_bundle)
from ..errors import EdgefaError
from ..models.rules import dfa_feedback_std, draw_feedback
from ..training.trainer import Run
from . import trunk as trunks
from .onnx_graphs import OPSET, infer_graph, refittable_infer_graph, serialize_checked, train_step_graph
from .tensorrt_ready import (DEFAULT_PROFILE, bundle_files, check_profile, load_target, manifest_section,
                             readiness, summary_line)

HAND_BUILT_KINDS = ("mlp", "resmlp")       # exported as they are, frozen layers inside the graphs
TRUNK_KINDS = ("cnn", "vit", "transformer")  # exported as a torch trunk under a hand-built part
HEAD_ONLY_KINDS = ("vit", "transformer")     # the device trains their head (no DFA graph for attention)
LN_EPS = 1e-5


def check_exportable(model) -> str:
    kind = model.kind
    if kind not in HAND_BUILT_KINDS + TRUNK_KINDS:
        raise EdgefaError(f"export: no device export for {kind} models "
                          f"(exported: {', '.join(HAND_BUILT_KINDS + TRUNK_KINDS)})")
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
    return manifest_for(topo, feedback_info, momentum, lr, loss, standardize=run.standardizer.to_dict(),
                        image_shape=run.image_shape, residual_penalty=float(getattr(run.config, "penalty", 0.0)),
                        host_run={"method": run.config.method, "dataset": run.config.dataset,
                                  "final_test_accuracy": run.metrics.get("final_test_accuracy")})


def manifest_for(topo: dict, feedback_info: dict, momentum: float, lr: float, loss: str, standardize: dict,
                 image_shape=None, residual_penalty: float = 0.0, host_run: dict | None = None) -> dict:
    """A bundle's manifest (write_bundle adds the format and the files table)."""
    return {
        "edgefa_version": __version__,
        "model": topo,
        "input": {"standardize": standardize, "image_shape": list(image_shape) if image_shape else None},
        "loss": loss,
        "update_rule": "dfa",
        "optimizer": {"name": "sgd", "lr": lr, "momentum": momentum, "dampening": 0.0,
                      "nesterov": False, "weight_decay": 0.0, "residual_penalty": residual_penalty},
        "feedback": feedback_info,
        "graphs": {"opset": OPSET, "infer": "infer.onnx", "train_step": "train_step.onnx"},
        "host_run": host_run,
    }


@dataclass
class DeviceSplit:
    """What the device gets of a model: an optional frozen trunk, and the part it trains (its
    topology as the manifest holds it, its weights and its feedback, by bundle name)."""
    model: dict                         # manifest["model"]: the part's topology (+ "trunk")
    weights: dict[str, np.ndarray]      # every tensor of weights.npz (trunk ones included)
    feedback: dict[str, np.ndarray]
    feedback_info: dict
    trunk: trunks.Trunk | None = None


def device_split(model, trainable: str = "all") -> DeviceSplit:
    """Split a host model at the cut `trainable` asks for (bundle.parse_trainable's syntax)."""
    check_exportable(model)
    if model.kind in HAND_BUILT_KINDS:
        topo = topology(model)
        try:
            k = parse_trainable(trainable, topo)
        except EdgefaError as exc:
            raise EdgefaError(f"export: --{exc}") from None
        topo["trainable"] = "all" if k is None else f"last:{k}"
        feedback, info = dfa_feedback(model)
        if topo["kind"] == "resmlp":
            weights = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.named_parameters()}
        else:
            weights = {_param_name(k): v.detach().cpu().numpy().astype(np.float32)
                       for k, v in model.state_dict().items() if not k.startswith("feedback_")}
        return DeviceSplit(topo, weights, {k: feedback[k] for k in feedback_shapes(topo)}, info)
    return _trunk_split(model, trainable)


def _trunk_split(model, trainable: str) -> DeviceSplit:
    """cnn: `all` trains every stage on the device; `last:K` / `head` puts the stages below the cut
    in a torch-exported trunk. vit, transformer: the head only, on a trunk of everything else."""
    cfg, kind = model.config, model.kind
    try:
        k = check_trainable_syntax(trainable)
    except EdgefaError as exc:
        raise EdgefaError(f"export: --{exc}") from None
    if kind in HEAD_ONLY_KINDS:
        if k != 1:
            raise EdgefaError(f"export: --trainable {trainable}: the device trains a {kind}'s head only "
                              f"(--trainable head); its attention blocks have no DFA graph")
        return _head_on_trunk(model, _readout_features(model), ["embed", *[f"block{i}" for i in range(cfg.depth)],
                                                                 "norm"], cut="the pooled, normalised tokens")
    units = cfg.depth + 2                                      # [head], [fc], [conv{depth-1}], ..., [conv0]
    if k is not None and not 1 <= k <= units:
        raise EdgefaError(f"export: --trainable {trainable}: K must be between 1 and {units} "
                          f"(this cnn's units from the head: head, fc, "
                          + ", ".join(f"conv{i}" for i in reversed(range(cfg.depth))) + ")")
    if k == 1:
        return _head_on_trunk(model, lambda x: _stages(model, x, cfg.depth + 1),
                              [*(f"conv{i}" for i in range(cfg.depth)), "fc"], cut="fc's output")
    from .cnn_export import cnn_feedback, cnn_topology, cnn_weights

    first = 0 if k is None else units - k                      # the first trained conv stage (depth: none)
    full = cnn_topology(model, first) if first < cfg.depth else None
    if first >= cfg.depth:                                     # fc and head: an MLP part on the flat features
        lin = model.fc[1]
        part = {"kind": "mlp", "in_features": lin.in_features, "n_classes": cfg.n_outputs,
                "activation": cfg.activation,
                "layers": [{"name": "fc", "in": lin.in_features, "out": lin.out_features},
                           {"name": "head", "in": lin.out_features, "out": cfg.n_outputs}]}
    else:
        part = full
    part["trainable"] = "all"
    weights = {n: a for n, a in cnn_weights(model, min(first, cfg.depth - 1)).items() if n in param_shapes(part)}
    all_feedback = cnn_feedback(model, min(first, cfg.depth - 1))
    feedback = {n: all_feedback[n] for n in feedback_shapes(part)}
    info = _feedback_info(cfg, "one matrix per stage in order (FeedbackNet.finish)")
    if first == 0:
        return DeviceSplit(part, weights, feedback, info)
    with plain_forward(model):
        trunk = trunks.from_module(_Below(model, lambda x: _stages(model, x, first)), _example(model),
                                   source=f"torch.onnx export of the run's {kind} conv0..conv{first - 1}",
                                   cut=(f"conv{first - 1}'s output" if first < cfg.depth
                                        else "the flattened conv output"),
                                   frozen_layers=[f"conv{i}" for i in range(first)])
    return _with_trunk(part, weights, feedback, info, trunk, model)


def _head_on_trunk(model, features_of, frozen: list[str], cut: str) -> DeviceSplit:
    """A part that is the model's head alone (its true gradient: no feedback) on a trunk."""
    cfg = model.config
    head = model.head
    part = {"kind": "mlp", "in_features": head.in_features, "n_classes": cfg.n_outputs,
            "activation": cfg.activation,
            "layers": [{"name": "head", "in": head.in_features, "out": cfg.n_outputs}], "trainable": "all"}
    weights = {"head.weight": head.weight.detach().cpu().numpy().astype(np.float32),
               "head.bias": head.bias.detach().cpu().numpy().astype(np.float32)}
    with plain_forward(model):
        trunk = trunks.from_module(_Below(model, features_of), _example(model),
                                   source=f"torch.onnx export of the run's {model.kind} below its head", cut=cut,
                                   frozen_layers=frozen)
    info = _feedback_info(cfg, "none: the head trains on its true gradient")
    return _with_trunk(part, weights, {}, info, trunk, model)


def _with_trunk(part: dict, weights: dict, feedback: dict, info: dict, trunk, model) -> DeviceSplit:
    if part["in_features"] != trunk.features:
        raise EdgefaError(f"export: the trunk gives {trunk.features} features, the part takes {part['in_features']}")
    topo = dict(part, in_features=trunk.in_features, trunk=trunk.manifest_section())
    return DeviceSplit(topo, {**trunk.params, **weights}, feedback, info, trunk)


def _feedback_info(cfg, generator: str) -> dict:
    source = (f"trained with (host {cfg.rule} run)" if cfg.rule in ("dfa", "hybrid")
              else f"drawn at export (host run used {cfg.rule})")
    return {"seed": cfg.feedback_seed, "distribution": "normal", "mean": 0.0,
            "std": dfa_feedback_std(cfg.n_outputs), "generator": f"torch.Generator (CPU) + torch.randn, {generator}",
            "source": source}


class _Below(torch.nn.Module):
    """The frozen part of a host model as a module of its own, for torch.onnx: `features_of(x)`
    on flat x."""

    def __init__(self, net, features_of):
        super().__init__()
        self.net, self.features_of = net, features_of

    def forward(self, x):
        return self.features_of(x)


@contextmanager
def plain_forward(net):
    """FA and uSF layers run their plain forward while torch.onnx traces them: their custom
    backward cannot be exported, and is never needed below the cut."""
    layers = [m for m in net.modules() if isinstance(getattr(m, "rule", None), str)]
    rules = [m.rule for m in layers]
    for m in layers:
        m.rule = "bp"
    try:
        yield
    finally:
        for m, rule in zip(layers, rules):
            m.rule = rule


def _stages(net, x, count: int):
    h = net.prepare(x)
    for _, stage in net.stages()[:count]:
        h = stage(h)
    return h


def _readout_features(net):
    """vit: the head's input (normalised tokens, mean over tokens); transformer: the normalised
    token at the last real position (the pad id's positions skipped, as CausalTransformer does)."""
    cfg = net.config

    def vit(x):
        return net.norm(_stages(net, x, len(net.stages()))).mean(dim=1)

    def transformer(x):
        tokens = x.to(torch.int64) if cfg.vocab else x
        h = net.norm(_stages(net, tokens, len(net.stages())))
        if cfg.pad_id >= 0:
            last = ((tokens != cfg.pad_id).sum(dim=1) - 1).clamp(min=0)
        else:
            last = torch.zeros(tokens.shape[0], dtype=torch.int64) + (tokens.shape[1] - 1)
        index = last.reshape(-1, 1, 1).expand(-1, 1, h.shape[-1])
        return torch.gather(h, 1, index).flatten(1)     # not squeeze: traced, it becomes an If node

    return vit if net.kind == "vit" else transformer


def _example(net) -> torch.Tensor:
    """Three flat samples the trunk export traces with (token ids where the model takes them)."""
    gen = torch.Generator().manual_seed(0)
    size = int(np.prod(net.config.in_shape))
    if net.config.vocab:
        return torch.randint(0, net.config.vocab, (3, size), generator=gen).to(torch.float32)
    return torch.randn((3, size), generator=gen)


def export_bundle(run: Run, out_dir: str | os.PathLike, momentum: float | None = None,
                  lr: float | None = None, trainable: str = "all", loss: str | None = None,
                  trt_target: str = "10.3", batch_profile=DEFAULT_PROFILE, fp16_infer: bool = True,
                  require_tensorrt: bool = False, refit_graph: bool = False) -> Path:
    """`trainable`: "all", "last:K" or "head" (see the module doc). `loss`: None (the run's),
    "cross_entropy" or "bradley-terry" (an MLP scorer with one output, trained on pairs).
    `trt_target`: the TensorRT release the graphs are checked against ("8.5": JetPack 5.1,
    "10.3": JetPack 6.1/6.2); `batch_profile`: (min, opt, max) batch of the engines' optimization
    profile; `fp16_infer`: let infer.onnx build in FP16 (train_step never does);
    `require_tensorrt`: a graph that is not ready is an EdgefaError and nothing is written;
    `refit_graph`: carry tensorrt/infer_refit.onnx (see the module doc)."""
    check_exportable(run.model)
    try:
        load_target(trt_target), check_profile(batch_profile)
    except EdgefaError as exc:
        raise EdgefaError(f"export: {exc}") from None
    momentum = run.config.momentum if momentum is None else momentum
    lr = run.config.lr if lr is None else lr
    loss = run_loss(run, loss)
    split = device_split(run.model, trainable)
    topo = split.model
    if loss == LOSS_BRADLEY_TERRY and (topo["kind"] != "mlp" or topo["n_classes"] != 1 or split.trunk):
        raise EdgefaError(f"export: a bradley-terry bundle needs an MLP scorer with one output, "
                          f"not a {run.model.kind} with {topo['n_classes']}")
    manifest = build_manifest(run, topo, split.feedback_info, momentum, lr, loss)
    return write_device_bundle(out_dir, manifest, split, momentum, loss, trt_target, batch_profile,
                               fp16_infer, require_tensorrt, refit_graph)


def write_device_bundle(out_dir, manifest: dict, split: DeviceSplit, momentum: float, loss: str,
                        trt_target: str = "10.3", batch_profile=DEFAULT_PROFILE, fp16_infer: bool = True,
                        require_tensorrt: bool = False, refit_graph: bool = False) -> Path:
    """Build the graphs of a split (composed with its trunk where it has one), check them for
    TensorRT, and write the bundle. Shared by export_bundle and the bring-your-own-model paths."""
    target, profile = load_target(trt_target), check_profile(batch_profile)
    part = part_topology(split.model)
    penalty = manifest["optimizer"].get("residual_penalty", 0.0)
    infer, step = infer_graph(part), train_step_graph(part, momentum, loss, penalty)
    # The same step up to its gradients, for the CPU runtime's in-place update (bundle.STEP_FACTORS_GRAPH)
    factors = train_step_graph(part, momentum, loss, penalty, factors=True)
    extra = {}
    if split.trunk is None:
        graphs = {"infer.onnx": serialize_checked(infer), "train_step.onnx": serialize_checked(step)}
        refit = refittable_infer_graph(part, split.weights) if refit_graph else None
        extra[STEP_FACTORS_GRAPH] = serialize_checked(factors)
        manifest["graphs"].update(step_factors=STEP_FACTORS_GRAPH)
    else:
        extra[STEP_FACTORS_GRAPH] = serialize_checked(trunks.compose(split.trunk, factors, "edgefa_dfa_step_factors"))
        extra[HEAD_FACTORS_GRAPH] = serialize_checked(factors)
        manifest["graphs"].update(step_factors=STEP_FACTORS_GRAPH, head_factors=HEAD_FACTORS_GRAPH)
        whole_infer = trunks.compose(split.trunk, infer, "edgefa_infer")
        graphs = {"infer.onnx": serialize_checked(whole_infer),
                  "train_step.onnx": serialize_checked(trunks.compose(split.trunk, step, "edgefa_dfa_train_step")),
                  TRUNK_GRAPH: serialize_checked(split.trunk.graph), HEAD_STEP_GRAPH: serialize_checked(step)}
        refit = refittable_infer_graph(split.model, split.weights, infer=whole_infer) if refit_graph else None
        manifest["graphs"].update(trunk=TRUNK_GRAPH, head_step=HEAD_STEP_GRAPH)
    trt = readiness(graphs, target, profile)
    if require_tensorrt and not trt["ready"]:
        raise EdgefaError(f"export: tensorrt {target.version}: {summary_line(trt)}; no bundle written")
    manifest["tensorrt"] = manifest_section(trt, fp16_infer, refit_graph=refit is not None)
    extra.update(bundle_files(trt, graphs, fp16_infer))
    if refit is not None:
        extra[REFIT_GRAPH] = serialize_checked(refit)
    payload = {name: data for name, data in graphs.items() if name in ("infer.onnx", "train_step.onnx")}
    extra.update({name: data for name, data in graphs.items() if name not in payload})
    return write_bundle(out_dir, manifest, payload, split.weights, split.feedback, extra_files=extra)


def _param_name(state_key: str) -> str:
    """torch's `hidden_layers.3.weight` / `head.bias` -> the bundle's `fc3.weight` / `head.bias`.
    (A resmlp's parameter names are the bundle's names as they are.)"""
    if state_key.startswith("hidden_layers."):
        _, idx, kind = state_key.split(".")
        return f"fc{idx}.{kind}"
    return state_key
