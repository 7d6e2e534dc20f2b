"""A small CNN for 1-D signals [C, L] or images [C, H, W].

    conv stage i   conv3 (padding 1, channels width * 2^i) -> act -> max-pool 2   (i < depth)
    fc             flatten -> Linear(.., 8 * width) -> act
    readout        head Linear

Under DFA every stage (each conv stage and fc) receives e @ B at its output.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from .feedback_net import ACTIVATIONS, FeedbackNet, NetConfig
from .layers import FeedbackConv, FeedbackLinear


class CNN(FeedbackNet):
    def __init__(self, config: NetConfig):
        super().__init__(config)
        if len(config.in_shape) not in (2, 3):
            raise ValueError(f"cnn needs inputs shaped [C, L] or [C, H, W], got {config.in_shape}")
        dims, r = len(config.in_shape) - 1, config.layer_rule
        pool = nn.MaxPool1d if dims == 1 else nn.MaxPool2d
        channels, spatial = config.in_shape[0], list(config.in_shape[1:])
        convs = []
        for i in range(config.depth):
            out = config.width * 2 ** i
            shrink = min(spatial) >= 2
            convs.append(nn.Sequential(FeedbackConv(dims, channels, out, 3, r, padding=1),
                                       ACTIVATIONS[config.activation](),
                                       *([pool(2)] if shrink else [])))
            channels, spatial = out, [s // 2 for s in spatial] if shrink else spatial
        self.convs = nn.ModuleList(convs)
        hidden = 8 * config.width
        self.fc = nn.Sequential(nn.Flatten(1), FeedbackLinear(channels * math.prod(spatial), hidden, r),
                                ACTIVATIONS[config.activation]())
        self.head = FeedbackLinear(hidden, config.n_outputs, r)
        self.finish()

    def prepare(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.config.in_shape)

    def stages(self):
        return [(f"conv{i}", c) for i, c in enumerate(self.convs)] + [("fc", self.fc)]

    def readout(self, h: Tensor) -> Tensor:
        return self.head(h)
