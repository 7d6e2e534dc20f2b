"""Linear and convolution layers whose backward pass follows a learning rule.

A layer's rule is fixed when it is built:
    bp   ordinary autograd (also used inside DFA blocks: a block's own local gradient)
    fa   the input gradient goes through a fixed random matrix B of the weight's shape
         (stored as the buffer `feedback`, so it is in every state_dict and checkpoint)
    usf  sign-symmetric feedback: B = sign(W) * mean|W| of the current weights, nothing stored

Only the weight transposes change; LayerNorm, attention's softmax and the activations always pass
their true local derivative, as in the FA literature on transformers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .rules import fa_linear, sign_feedback

LAYER_RULES = ("bp", "fa", "usf")


def fan_in(weight: Tensor) -> int:
    return int(weight[0].numel())


class FeedbackLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, rule: str = "bp", bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        if rule not in LAYER_RULES:
            raise ValueError(f"unknown layer rule {rule!r}; expected one of {', '.join(LAYER_RULES)}")
        self.rule = rule
        if rule == "fa":  # filled by FeedbackNet.draw_feedback from the run's seed
            self.register_buffer("feedback", torch.zeros_like(self.weight))

    def forward(self, x: Tensor) -> Tensor:
        if self.rule == "bp":
            return F.linear(x, self.weight, self.bias)
        b = self.feedback if self.rule == "fa" else sign_feedback(self.weight)
        return fa_linear(x, self.weight, self.bias, b)


class _FAConv(torch.autograd.Function):
    """conv(x, W) + b whose input gradient is the transposed convolution with B instead of W."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback, stride, padding):
        ctx.save_for_backward(x, feedback)
        ctx.conf = (weight.shape, stride, padding, bias is not None)
        conv = F.conv1d if x.dim() == 3 else F.conv2d
        return conv(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad_out):
        x, feedback = ctx.saved_tensors
        w_shape, stride, padding, has_bias = ctx.conf
        nd = x.dim() - 2
        conv_input = torch.nn.grad.conv1d_input if nd == 1 else torch.nn.grad.conv2d_input
        conv_weight = torch.nn.grad.conv1d_weight if nd == 1 else torch.nn.grad.conv2d_weight
        grad_x = conv_input(x.shape, feedback, grad_out, stride, padding) if ctx.needs_input_grad[0] else None
        grad_w = conv_weight(x, w_shape, grad_out, stride, padding) if ctx.needs_input_grad[1] else None
        grad_b = grad_out.sum(dim=[0, *range(2, grad_out.dim())]) if has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None


class FeedbackConv(nn.Module):
    """A 1-D or 2-D convolution (`dims`) with the same rules as FeedbackLinear."""

    def __init__(self, dims: int, in_channels: int, out_channels: int, kernel_size: int, rule: str = "bp",
                 stride: int = 1, padding: int = 0):
        super().__init__()
        if rule not in LAYER_RULES:
            raise ValueError(f"unknown layer rule {rule!r}; expected one of {', '.join(LAYER_RULES)}")
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        ref = conv(in_channels, out_channels, kernel_size, stride=stride, padding=padding)  # torch's init
        self.weight, self.bias = ref.weight, ref.bias
        self.rule, self.stride, self.padding, self.dims = rule, ref.stride, ref.padding, dims
        if rule == "fa":
            self.register_buffer("feedback", torch.zeros_like(self.weight))

    def forward(self, x: Tensor) -> Tensor:
        if self.rule == "bp":
            conv = F.conv1d if self.dims == 1 else F.conv2d
            return conv(x, self.weight, self.bias, self.stride, self.padding)
        b = self.feedback if self.rule == "fa" else sign_feedback(self.weight)
        return _FAConv.apply(x, self.weight, self.bias, b, self.stride, self.padding)


def fa_feedback_std(weight: Tensor) -> float:
    """FA's B has the scale of the default weight init: N(0, 1/fan_in)."""
    return 1.0 / math.sqrt(fan_in(weight))
