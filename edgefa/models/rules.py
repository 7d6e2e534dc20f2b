"""Learning rules as autograd functions, so torch optimizers, schedulers and DDP work unchanged.

- bp:  ordinary autograd.
- fa:  Feedback Alignment. Each layer sends its error back through a fixed random matrix B
       (the shape of W) instead of W itself: grad_input = grad_output @ B.
- dfa: Direct Feedback Alignment. The output error e = dLoss/dlogits reaches every hidden layer
       l directly as e @ B_l (B_l of shape [classes, width_l]); the true backward path between
       layers is cut, so autograd never computes an input gradient it would throw away.
- usf: sign-symmetric feedback (uSF, Liao, Leibo and Poggio 2016; Moskovitz et al. 2018): FA with
       B = sign(W) * mean|W|, taken from the current weights at every step (nothing random is
       stored). The scale keeps the backward signal at BP's size: a bare sign(W) multiplies it by
       about sqrt(fan_in) per layer, which left a 5-layer residual MLP at chance on digits.
- hybrid: DFA, with a true BP step every k-th optimizer step (k = `hybrid_every`); the trainer
       says which steps (`MLP.bp_step`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

RULES = ("bp", "fa", "dfa", "usf", "hybrid")


class _FALinear(torch.autograd.Function):
    """y = x W^T + b whose backward sends grad_output @ B to the input instead of grad_output @ W."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor) -> Tensor:
        ctx.save_for_backward(x, feedback)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, feedback = ctx.saved_tensors
        grad_x = grad_out @ feedback if ctx.needs_input_grad[0] else None
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_w = grad_2d.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        grad_b = grad_2d.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def fa_linear(x: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor) -> Tensor:
    return _FALinear.apply(x, weight, bias, feedback)


class _DFAOutput(torch.autograd.Function):
    """Identity on the logits whose backward also hands e @ B_l to every hidden output h_l.

    The hidden outputs are passed in only so autograd routes the projected error into them; the
    forward ignores them.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, n_hidden: int, *feedback_then_hidden: Tensor) -> Tensor:
        ctx.n_hidden = n_hidden
        ctx.save_for_backward(*feedback_then_hidden[:n_hidden])
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad_logits: Tensor):
        feedback = ctx.saved_tensors
        n = ctx.n_hidden
        wants = ctx.needs_input_grad[2 + n:]
        grads_hidden = [grad_logits @ b if want else None for b, want in zip(feedback, wants)]
        return (grad_logits, None, *([None] * n), *grads_hidden)


def dfa_output(logits: Tensor, feedback: list[Tensor], hidden: list[Tensor]) -> Tensor:
    """Attach DFA to a forward pass: `hidden[l]` receives dLoss/dlogits @ feedback[l]."""
    if len(feedback) != len(hidden):
        raise ValueError(f"{len(feedback)} feedback matrices for {len(hidden)} hidden outputs")
    return _DFAOutput.apply(logits, len(hidden), *feedback, *hidden)


def is_bp_step(model_config, step: int) -> bool:
    """Under `hybrid`, whether optimizer step `step` (0-based) is a true BP step: steps k, 2k, ...
    (1-based, k = hybrid_every). Never, under the other rules."""
    every = model_config.hybrid_every if model_config.rule == "hybrid" else 0
    return bool(every) and (step + 1) % every == 0


def sign_feedback(weight: Tensor) -> Tensor:
    """uSF's feedback: the sign of W at W's mean magnitude, detached (it is a backward path only)."""
    w = weight.detach()
    return torch.sign(w) * w.abs().mean()


def dfa_feedback_std(n_outputs: int) -> float:
    """DFA's B_l ~ N(0, 1/outputs): e @ B_l then has the scale of e's norm, whatever the number of
    classes (or outputs) e has."""
    return 1.0 / math.sqrt(n_outputs)


def draw_feedback(shapes: list[tuple[int, int]], seed: int, std: list[float]) -> list[Tensor]:
    """Fixed random feedback matrices, N(0, std^2), drawn on the CPU so every device gets the same."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * s for shape, s in zip(shapes, std)]
