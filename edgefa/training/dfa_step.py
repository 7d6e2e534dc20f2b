"""DFA's training step on an MLP written out by hand: no autograd graph, the update fused into the GEMM.

Autograd's DFA step (models/rules.py `_DFAOutput`) already skips every input gradient, but it
still records a graph, writes each weight gradient into `.grad`, and then torch.optim.SGD reads it
back for a second pass over every weight (v <- mu v + g; W <- W - lr v). Written out, one DFA step is

    forward:  h_l = f(h_{l-1} W_l^T + b_l),  logits = h_L W_head^T + b_head   (no graph kept)
    error:    e = (softmax(logits) - onehot(y)) / batch                        (= dLoss/dlogits)
    local:    delta_l = (e B_l) * f'(h_l)            delta_head = e
    update:   v_l <- mu v_l + delta_l^T h_{l-1}     one addmm_ with beta = mu
              W_l <- W_l - lr v_l                   (mu = 0: W_l.addmm_(delta_l^T, h_{l-1}, alpha=-lr))

which is the same arithmetic torch.optim.SGD does (dampening 0, no Nesterov, no weight decay),
so the optimizer stays the user's: its momentum buffers live in `optimizer.state[p]
["momentum_buffer"]` exactly as SGD keeps them, and checkpoints, resume and `export` see no
difference. `explicit_dfa_applies` says when this path is taken; anything else (other optimizers
or SGD options, a penalty, DDP, other models) keeps the autograd step.

Only the MLP gets it. In the other models (models/feedback_net.py) a DFA stage is a conv block,
a pre-LN residual block or a transformer block: the gradient *inside* the stage needs that
stage's own backward (conv, layer norm, attention), which autograd already does well; writing
them out by hand would copy autograd, not remove work.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from ..models import MLP

# f'(a) * grad, from f's *output* h: the same kernels autograd's relu / tanh backward run.
_ACTIVATION_BACKWARD = {
    "relu": lambda grad, h: torch.ops.aten.threshold_backward(grad, h, 0),
    "tanh": lambda grad, h: torch.ops.aten.tanh_backward(grad, h),
}


def explicit_dfa_applies(model: torch.nn.Module, optimizer, penalty: float = 0.0) -> bool:
    """Whether `explicit_dfa_step` computes exactly what autograd + `optimizer.step()` would:
    an MLP under dfa or hybrid (its DFA steps), trained alone (not a DDP wrapper), no penalty,
    and a plain torch.optim.SGD over exactly the model's parameters."""
    if type(model) is not MLP or model.config.rule not in ("dfa", "hybrid") or penalty:
        return False
    if type(optimizer) is not torch.optim.SGD:
        return False
    in_groups = [p for g in optimizer.param_groups for p in g["params"]]
    if {id(p) for p in in_groups} != {id(p) for p in model.parameters()} or len(in_groups) != len(set(map(id, in_groups))):
        return False
    return all(not isinstance(g["lr"], Tensor) and g["weight_decay"] == 0 and g["dampening"] == 0
               and not g["nesterov"] and not g["maximize"] and not g["differentiable"]
               for g in optimizer.param_groups)


@torch.no_grad()
def explicit_dfa_step(model: MLP, optimizer: torch.optim.SGD, x: Tensor, y: Tensor) -> float:
    """One DFA step of `model` on (x, y) with `optimizer`'s settings and state; returns the mean
    cross-entropy (of the weights before the step). A non-finite loss leaves weights and state
    untouched, as `train_steps` does with autograd. Call only where `explicit_dfa_applies`."""
    hidden: list[Tensor] = []
    logits = model(x, hidden_out=hidden)        # through __call__: forward hooks still see each step
    log_p = F.log_softmax(logits, dim=1)
    loss = F.nll_loss(log_p, y).item()
    if not math.isfinite(loss):
        return loss
    e = log_p.exp_()                            # softmax, in place of log_p (not needed any more)
    e[torch.arange(len(y), device=e.device), y] -= 1.0
    e.div_(len(y))

    backward = _ACTIVATION_BACKWARD[model.config.activation]
    inputs = [x.reshape(len(x), -1), *hidden]   # what each linear layer read
    deltas = [backward(e @ b, h) for b, h in zip(model.feedback(), hidden)] + [e]
    optimizer.zero_grad(set_to_none=True)       # no stale gradient (e.g. a hybrid BP step's) stays behind
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for lin, delta, h_in in zip(model.linears(), deltas, inputs):
        _sgd_update(optimizer, group_of[id(lin.weight)], lin.weight, lambda out, beta, alpha: (
            out.addmm_(delta.t(), h_in, beta=beta, alpha=alpha)), lambda: delta.t() @ h_in)
        if lin.bias is not None:
            bias_grad = delta.sum(dim=0)
            _sgd_update(optimizer, group_of[id(lin.bias)], lin.bias, lambda out, beta, alpha: (
                out.mul_(beta).add_(bias_grad, alpha=alpha)), lambda: bias_grad)
    return loss


def _sgd_update(optimizer, group: dict, param: Tensor, accumulate, gradient) -> None:
    """torch.optim.SGD's update of `param` (dampening 0): with momentum mu, v <- mu v + g (v = g on
    the first step) and p <- p - lr v; without, p <- p - lr g. `accumulate(out, beta, alpha)` does
    out <- beta * out + alpha * g in one fused op; `gradient()` returns g itself."""
    lr, mu = group["lr"], group["momentum"]
    if mu == 0:
        accumulate(param, 1.0, -lr)
        return
    state = optimizer.state[param]
    buf = state.get("momentum_buffer")
    if buf is None:
        state["momentum_buffer"] = buf = gradient()     # a fresh tensor: SGD's clone of g
    else:
        accumulate(buf, mu, 1.0)
    param.add_(buf, alpha=-lr)
