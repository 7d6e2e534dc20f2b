"""A multilayer perceptron trainable with bp, fa or dfa (see rules.py)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .rules import RULES, dfa_feedback_std, dfa_output, draw_feedback, fa_linear, sign_feedback

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}


@dataclass
class MLPConfig:
    in_features: int
    hidden: list[int]
    n_classes: int
    activation: str = "relu"
    rule: str = "dfa"
    feedback_seed: int = 1
    hybrid_every: int = 10          # rule "hybrid": every k-th step is a true BP step

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; expected one of {', '.join(RULES)}")
        if self.hybrid_every < 1:
            raise ValueError(f"hybrid_every must be at least 1, got {self.hybrid_every}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected relu or tanh")
        if not self.hidden:
            raise ValueError("an MLP needs at least one hidden layer")

    def to_dict(self) -> dict:
        return asdict(self)


class MLP(nn.Module):
    """Hidden layers `fc0..fc{L-1}` (Linear + activation) and a linear `head`.

    Feedback matrices are registered buffers, so they live in state_dict and in every checkpoint:
      dfa, hybrid: `feedback_fc{l}`  [n_classes, width_l]   (output error -> hidden layer l)
      fa:  `feedback_fc{l}`, `feedback_head`  with each layer's weight shape (W^T's stand-in)
      usf: none; sign(W) * mean|W| of the current weights
    Under `hybrid`, `bp_step` (set by the trainer before each step) makes the forward pass plain BP.
    """

    kind = "mlp"            # as a bundle's manifest names it (bundle.model_kind)

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        widths = [config.in_features, *config.hidden]
        self.hidden_layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(widths[-1], config.n_classes)
        self.act = ACTIVATIONS[config.activation]

        self.bp_step = False
        if config.rule in ("dfa", "hybrid"):
            shapes = [(config.n_classes, w) for w in config.hidden]
            stds = [dfa_feedback_std(config.n_classes)] * len(shapes)
        elif config.rule == "fa":
            shapes = [tuple(lin.weight.shape) for lin in self.linears()]
            stds = [1.0 / math.sqrt(s[1]) for s in shapes]  # the scale of the default W init
        else:
            shapes, stds = [], []
        for name, b in zip(self.feedback_names(), draw_feedback(shapes, config.feedback_seed, stds)):
            self.register_buffer(name, b)

    def linears(self) -> list[nn.Linear]:
        return [*self.hidden_layers, self.head]

    def layer_names(self) -> list[str]:
        return [f"fc{i}" for i in range(len(self.hidden_layers))] + ["head"]

    def feedback_names(self) -> list[str]:
        if self.config.rule in ("dfa", "hybrid"):
            return [f"feedback_{n}" for n in self.layer_names()[:-1]]
        if self.config.rule == "fa":
            return [f"feedback_{n}" for n in self.layer_names()]
        return []

    def feedback(self) -> list[Tensor]:
        return [getattr(self, n) for n in self.feedback_names()]

    def forward(self, x: Tensor, hidden_out: list[Tensor] | None = None) -> Tensor:
        """The logits. Under dfa, `hidden_out` (a list) also receives every hidden output h_l:
        training/dfa_step.py's explicit step reads them."""
        rule = self.config.rule
        if rule == "hybrid":
            rule = "bp" if self.bp_step else "dfa"
        if rule == "dfa":
            hidden, h = [] if hidden_out is None else hidden_out, x
            for lin in self.hidden_layers:
                h = self.act(lin(h.detach()))  # cut: no input gradient is ever computed
                hidden.append(h)
            return dfa_output(self.head(h.detach()), self.feedback(), hidden)
        h = x
        if rule in ("fa", "usf"):
            feedback = self.feedback() if rule == "fa" else [sign_feedback(lin.weight) for lin in self.linears()]
            for lin, b in zip(self.hidden_layers, feedback):
                h = self.act(fa_linear(h, lin.weight, lin.bias, b))
            return fa_linear(h, self.head.weight, self.head.bias, feedback[-1])
        for lin in self.hidden_layers:
            h = self.act(lin(h))
        return self.head(h)
