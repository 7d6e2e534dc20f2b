"""Pre-LN residual MLP: embedding, blocks h <- h + f(LN(h)), a terminal LayerNorm, a head.

    embed     x [N, D] -> h_0 [N, width]                  (Linear)
    block l   h_{l+1} = h_l + fc2(act(fc1(LN(h_l))))     (fc1: width -> width*expansion)
    readout   y = head(LN(h_L))

The standard setting (4 blocks, d = 256) is `NetConfig("resmlp", [D], classes)` with its defaults.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from .feedback_net import ACTIVATIONS, FeedbackNet, NetConfig
from .layers import FeedbackLinear


class ResidualMLPBlock(nn.Module):
    residual = True

    def __init__(self, width: int, hidden: int, activation: str, rule: str):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = FeedbackLinear(width, hidden, rule)
        self.act = ACTIVATIONS[activation]()
        self.fc2 = FeedbackLinear(hidden, width, rule)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.fc2(self.act(self.fc1(self.norm(h))))


class ResMLP(FeedbackNet):
    def __init__(self, config: NetConfig):
        super().__init__(config)
        d, r = config.width, config.layer_rule
        self.embed = FeedbackLinear(math.prod(config.in_shape), d, r)
        self.blocks = nn.ModuleList(ResidualMLPBlock(d, d * config.expansion, config.activation, r)
                                     for _ in range(config.depth))
        self.norm = nn.LayerNorm(d)
        self.head = FeedbackLinear(d, config.n_outputs, r)
        self.finish()

    def readout(self, h: Tensor) -> Tensor:
        return self.head(self.norm(h))
