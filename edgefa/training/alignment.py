"""How well each learning rule's signal points along the true gradient, measured on one probe batch.

`measure_alignment(model, X, y)` runs two float64 copies of `model` on the same batch: the model as
it is (its own rule) and its BP twin (the same weights under rule "bp"), both on the same loss
(mean cross-entropy, plus penalty * model.penalty where the model has one). It compares:

- per layer (every module owning a `weight` parameter, named by module path): the rule's weight
  gradient against the true one, cosine over the flattened tensor;
- per layer under fa/usf: the feedback B against W (||W - B||_F and their cosine);
- per stage (MLP: each hidden layer's output after its activation; FeedbackNet: each stage's
  output): the gradient the rule delivers there against the true dL/dh, one cosine per sample
  (norms over dim 1 of the per-sample flattened signal), averaged over samples; and the mean over
  samples of ||h|| and of the true per-sample gradient norm.

A cosine is undefined where a norm is exactly 0: it is None ("degenerate"), never an eps-clamped
number; `F.cosine_similarity` clamps, so `cosine` below does not use it. The originals are never
touched: no RNG is drawn, no `.grad` is written, the mode is kept, so training with the
measurement on is bit-identical to training with it off.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..models import model_from_config
from ..models.rules import sign_feedback

SCHEMA = "edgefa.alignment/1"
DTYPE = torch.float64

AGGREGATION = {
    "weight_grad_cosine": "per weight tensor, flattened: <g_rule, g_bp> / (||g_rule|| * ||g_bp||), float64, "
                          "no eps; null (degenerate) when a norm is exactly 0",
    "signal_cosine": "mean over samples, per-sample norm over dim 1 of the flattened stage-output signal: "
                     "cos(g_rule_n, g_bp_n); samples where a norm is exactly 0 excluded and counted "
                     "(excluded_samples); null (degenerate) when every sample is excluded",
    "alignment_error": "||W - B||_F over the whole weight tensor (B stored in W's shape)",
    "weight_feedback_cosine": "per weight tensor, flattened: <W, B> / (||W|| * ||B||); null when a norm is 0",
    "feedback_used": "false where the layer's input needs no gradient (the first layer, whose input is the data): "
                     "its B is never used in training, so its alignment says nothing",
    "h_norm_mean": "mean over samples of ||h_l|| over dim 1 of the per-sample flattened stage output",
    "grad_norm_mean": "mean over samples of ||d loss_n / d h_l|| over dim 1 (true BP), loss_n the sample's own "
                      "loss, i.e. N x the gradient of the batch-mean loss (independent of the probe size)",
}
FEEDBACK_CONVENTION = ("B has W's shape [out, in, ...] and stands in for W^T in the backward "
                       "(grad_input = grad_output @ B); alignment_error = ||W - B||_F is ||W_{l+1}^T - B_l||_F "
                       "with B_l stored transposed at the layer whose W it replaces")
SIGNAL = ("the gradient the rule delivers at each stage output: dfa/hybrid e @ B_l (e = dL/dlogits; plus the "
          "stage's own residual-penalty term when penalty > 0), fa/usf the gradient sent back through B, "
          "bp the true one")


def cosine(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """<a, b> / (||a|| ||b||) along `dim` (that dim is reduced). No eps clamp: where a norm is exactly
    0 the result is NaN, and callers report those entries as degenerate, never as a number."""
    na = torch.linalg.vector_norm(a, dim=dim)
    nb = torch.linalg.vector_norm(b, dim=dim)
    dot = (a * b).sum(dim=dim)
    defined = (na != 0) & (nb != 0)
    return torch.where(defined, dot / torch.where(defined, na * nb, torch.ones_like(na)),
                       torch.full_like(dot, math.nan))


def frobenius(t: Tensor) -> float:
    """||t|| over every entry (the tensor flattened, dim 0 explicit), reduced in float64."""
    return float(torch.linalg.vector_norm(t.detach().flatten().to(torch.float64), dim=0))


def row_norms(t: Tensor) -> Tensor:
    """Per-sample norms: row n is ||t[n]|| over dim 1 of the sample flattened, in float64."""
    return torch.linalg.vector_norm(t.detach().flatten(1).to(torch.float64), dim=1)


def tensor_cosine(a: Tensor, b: Tensor) -> float | None:
    """Cosine of two whole tensors, flattened; None when either norm is exactly 0."""
    a, b = a.detach().flatten().to(torch.float64), b.detach().flatten().to(torch.float64)
    if not torch.any(a != 0) or not torch.any(b != 0):
        return None
    return float(cosine(a, b, dim=0))


def _rebuild(model: nn.Module, rule: str, dtype: torch.dtype | None) -> nn.Module:
    """`model`'s architecture under `rule` with its weights (feedback buffers only when the rule is
    the model's own), on its device, in `dtype`, in its mode, the same parameters trainable."""
    reference = next(iter(model.parameters()))
    dtype = dtype or reference.dtype
    config = dict(model.config.to_dict(), rule=rule)
    with torch.random.fork_rng(devices=[]):          # building draws the init weights: not from the run's RNG
        net = model_from_config(config)
    net.to(device=reference.device, dtype=dtype)
    state = model.state_dict()
    if rule != model.config.rule:
        dropped = set(model.feedback_names())
        state = {k: v for k, v in state.items() if k not in dropped}
    net.load_state_dict(state, strict=True)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, p in net.named_parameters():
        p.requires_grad_(trainable[name])
    net.train(model.training)
    net.bp_step = False
    return net


def bp_twin(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """The same weights under rule "bp": rebuilt from `model.config` with rule "bp", loaded from
    `model.state_dict()` without the feedback buffers (strict on everything else). Same device;
    `dtype` defaults to the model's."""
    return _rebuild(model, "bp", dtype)


def weight_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module that owns a `weight` parameter, by module path (hidden_layers.0, blocks.1.fc2, head)."""
    return [(name, m) for name, m in net.named_modules() if name and m._parameters.get("weight") is not None]


def _feedback(net: nn.Module) -> dict[int, tuple[str, Tensor]]:
    """id(layer) -> (what B is, B) for the layers whose backward uses a feedback matrix (fa, usf)."""
    rule = net.config.rule
    if hasattr(net, "linears"):                                   # the MLP: the rule is the model's
        if rule == "fa":
            return {id(lin): ("fa: stored B", b) for lin, b in zip(net.linears(), net.feedback())}
        if rule == "usf":
            return {id(lin): ("usf: sign(W) * mean|W|", sign_feedback(lin.weight)) for lin in net.linears()}
        return {}
    found = {}
    for _, m in weight_layers(net):
        if getattr(m, "rule", None) == "fa":
            found[id(m)] = ("fa: stored B", m.feedback)
        elif getattr(m, "rule", None) == "usf":
            found[id(m)] = ("usf: sign(W) * mean|W|", sign_feedback(m.weight))
    return found


@contextlib.contextmanager
def _capture_stages(net: nn.Module, sink: list[tuple[str, Tensor]]):
    """Record each stage's output as the forward pass makes it (the tensor that carries the rule's
    signal: under DFA the next stage reads a detached copy, the projected error arrives here)."""
    if hasattr(net, "stages"):                                    # FeedbackNet
        handles = [stage.register_forward_hook(lambda _m, _i, out, name=name: sink.append((name, out)))
                   for name, stage in net.stages()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        return
    # the MLP applies `act` once per hidden layer, in order, whatever the rule: the hidden output
    act, names = net.act, iter(f"hidden_layers.{i}" for i in range(len(net.hidden_layers)))

    def recording(z: Tensor) -> Tensor:
        h = act(z)
        sink.append((next(names), h))
        return h

    net.act = recording                                            # our private copy only
    try:
        yield
    finally:
        net.act = act


@contextlib.contextmanager
def _capture_input_grad(net: nn.Module, sink: dict[str, bool]):
    """Record, per weight layer, whether its input needs a gradient: when it does not (the first
    layer, whose input is the data) the layer's feedback B carries nothing during training."""
    if hasattr(net, "linears"):        # the MLP calls fa_linear on the weights, not the modules
        names = [f"hidden_layers.{i}" for i in range(len(net.hidden_layers))] + ["head"]
        sink.update({name: i > 0 for i, name in enumerate(names)})
        yield
        return
    handles = [m.register_forward_pre_hook(
        lambda _m, args, name=name: sink.__setitem__(name, sink.get(name, False) or bool(args[0].requires_grad)))
        for name, m in weight_layers(net)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _gradients(net: nn.Module, X: Tensor, y: Tensor, penalty: float, inputs_need_grad: dict | None = None):
    """Loss, {layer: weight grad}, [(stage, h, dL/dh or None)] of one forward/backward of `net`."""
    stages: list[tuple[str, Tensor]] = []
    with _capture_stages(net, stages), _capture_input_grad(net, {} if inputs_need_grad is None else inputs_need_grad):
        logits = net(X)
    loss = F.cross_entropy(logits, y)
    if penalty and hasattr(net, "penalty"):
        loss = loss + penalty * net.penalty
    layers = [(name, m.weight) for name, m in weight_layers(net) if m.weight.requires_grad]
    live = [h for _, h in stages if h.requires_grad]
    grads = torch.autograd.grad(loss, [w for _, w in layers] + live, allow_unused=True)
    weight_grads = {name: (g if g is not None else torch.zeros_like(w))
                    for (name, w), g in zip(layers, grads[:len(layers)])}
    stage_grads = iter(grads[len(layers):])
    out = []
    for name, h in stages:
        g = next(stage_grads) if h.requires_grad else None
        out.append((name, h.detach(), torch.zeros_like(h) if g is None and h.requires_grad else g))
    return loss.detach(), weight_grads, out


def _num(x: Tensor | float) -> float:
    return float(x)


def _probe(model: nn.Module, X: Tensor, y: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    device = next(iter(model.parameters())).device
    return (X.to(device=device, dtype=dtype) if X.is_floating_point() else X.to(device)), y.to(device)


def bp_gradients(model: nn.Module, X: Tensor, y: Tensor, penalty: float = 0.0, dtype: torch.dtype = DTYPE):
    """True BP's weight and stage gradients on the probe batch (a BP twin in `dtype`). They depend
    on the weights alone, so models that differ only in their feedback matrices (the null draws of
    `edgefa diagnose`) share one: pass it to measure_alignment as `bp`."""
    X, y = _probe(model, X, y, dtype)
    was_training = model.training
    try:
        with torch.enable_grad():
            _, bp_w, bp_s = _gradients(bp_twin(model, dtype), X, y, penalty)
    finally:
        model.train(was_training)
    return bp_w, bp_s


def measure_alignment(model: nn.Module, X: Tensor, y: Tensor, penalty: float = 0.0,
                      dtype: torch.dtype = DTYPE, bp=None) -> dict:
    """Alignment of `model`'s rule with true BP on one probe batch, the copies in `dtype` (float64 by
    default; `edgefa diagnose` measures in the training precision); cosines reduced in float64.
    `bp`: bp_gradients of the same weights, batch, penalty and dtype, when already at hand.

    Under hybrid the DFA step is measured. Returns a JSON-ready dict: `layers`, `stages`,
    `aggregation` (how each number is reduced), the feedback convention and the probe's size."""
    bp_w, bp_s = bp if bp is not None else bp_gradients(model, X, y, penalty, dtype)
    was_training = model.training
    X, y = _probe(model, X, y, dtype)
    try:
        with torch.enable_grad():
            net = _rebuild(model, model.config.rule, dtype)     # the rule, as it is (hybrid: its DFA step)
            needs_grad: dict[str, bool] = {}
            loss, rule_w, rule_s = _gradients(net, X, y, penalty, needs_grad)
            feedback = _feedback(net)

            layers, frozen = {}, []
            for name, module in weight_layers(net):
                if name not in rule_w:
                    frozen.append(name)
                    continue
                a, b = rule_w[name], bp_w[name]
                row = {"kind": type(module).__name__, "shape": list(module.weight.shape),
                       "weight_grad_cosine": tensor_cosine(a, b),
                       "rule_grad_norm": frobenius(a),
                       "bp_grad_norm": frobenius(b)}
                if id(module) in feedback:
                    what, fb = feedback[id(module)]
                    w = module.weight.detach()
                    row.update({"feedback": what, "feedback_used": needs_grad.get(name, True),
                                "alignment_error": frobenius(w - fb),
                                "weight_feedback_cosine": tensor_cosine(w, fb),
                                "weight_norm": frobenius(w),
                                "feedback_norm": frobenius(fb)})
                layers[name] = row

            stages = {}
            n = len(y)
            for (name, _h, g_rule), (_, h, g_bp) in zip(rule_s, bp_s):
                row = {"h_norm_mean": _num(row_norms(h).mean())}
                row["grad_norm_mean"] = (None if g_bp is None else
                                         _num((n * row_norms(g_bp)).mean()))
                if g_rule is None or g_bp is None:
                    row.update({"signal_cosine": None, "signal_samples": 0, "excluded_samples": n,
                                "no_signal": "the rule sends no gradient to this stage"})
                else:
                    a, b = g_rule.flatten(1).to(torch.float64), g_bp.flatten(1).to(torch.float64)
                    per_sample = cosine(a, b, dim=1)
                    keep = (torch.linalg.vector_norm(a, dim=1) != 0) & (torch.linalg.vector_norm(b, dim=1) != 0)
                    used = int(keep.sum())
                    row.update({"signal_cosine": _num(per_sample[keep].mean()) if used else None,
                                "signal_samples": used, "excluded_samples": n - used})
                stages[name] = row
    finally:
        model.train(was_training)
    rule = model.config.rule
    return {
        "schema": SCHEMA,
        "rule": rule,
        "measured_step": "dfa" if rule == "hybrid" else rule,
        "dtype": str(dtype).removeprefix("torch."),
        "probe_samples": len(y),
        "probe_loss": _num(loss),
        "penalty": float(penalty),
        "aggregation": dict(AGGREGATION),
        "signal": SIGNAL,
        "feedback_convention": FEEDBACK_CONVENTION,
        "layers": layers,
        "frozen_layers": frozen,
        "stages": stages,
    }


def rule_stage_signals(model: nn.Module, X: Tensor, y: Tensor, dtype: torch.dtype = DTYPE) -> dict[str, Tensor | None]:
    """The gradient `model`'s rule delivers at each stage output for the batch-mean cross-entropy
    alone (no penalty), from a copy in `dtype`; None where the rule sends that stage nothing."""
    device = next(iter(model.parameters())).device
    X = X.to(device=device, dtype=dtype) if X.is_floating_point() else X.to(device)
    was_training = model.training
    try:
        with torch.enable_grad():
            net = _rebuild(model, model.config.rule, dtype)
            _, _, stages = _gradients(net, X, y.to(device), 0.0)
    finally:
        model.train(was_training)
    return {name: g for name, _h, g in stages}
