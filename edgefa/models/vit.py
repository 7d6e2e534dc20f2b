"""ViT-Mini: patch embedding, pre-LN attention blocks, terminal LN, mean over tokens, head.

Images [C, H, W] are cut into p x p patches; 1-D signals [C, L] into runs of p.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .feedback_net import FeedbackNet, NetConfig
from .layers import FeedbackLinear
from .transformer import TransformerBlock


class PatchEmbedding(nn.Module):
    def __init__(self, in_shape: list[int], patch: int, width: int, rule: str):
        super().__init__()
        channels, spatial = in_shape[0], in_shape[1:]
        if any(s % patch for s in spatial):
            raise ValueError(f"patch {patch} does not divide the input's spatial shape {spatial}")
        self.in_shape, self.patch = in_shape, patch
        self.tokens = math.prod(s // patch for s in spatial)
        self.proj = FeedbackLinear(channels * patch ** len(spatial), width, rule)
        self.positions = nn.Parameter(torch.randn(self.tokens, width) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        n, p, (c, *spatial) = x.shape[0], self.patch, self.in_shape
        x = x.reshape(n, *self.in_shape)
        if len(spatial) == 1:                                     # [n, c, L] -> [n, L/p, c*p]
            patches = x.reshape(n, c, spatial[0] // p, p).permute(0, 2, 1, 3)
        else:                                                     # [n, c, H, W] -> [n, HW/p^2, c*p*p]
            h, w = spatial
            patches = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return self.proj(patches.reshape(n, self.tokens, -1)) + self.positions


class ViTMini(FeedbackNet):
    def __init__(self, config: NetConfig):
        super().__init__(config)
        if len(config.in_shape) not in (2, 3):
            raise ValueError(f"vit needs inputs shaped [C, L] or [C, H, W], got {config.in_shape}")
        d, r = config.width, config.layer_rule
        self.embed = PatchEmbedding(config.in_shape, config.patch, d, r)
        self.blocks = nn.ModuleList(TransformerBlock(d, config.heads, config.expansion, config.activation, r,
                                                      causal=False) for _ in range(config.depth))
        self.norm = nn.LayerNorm(d)
        self.head = FeedbackLinear(d, config.n_outputs, r)
        self.finish()

    def readout(self, h: Tensor) -> Tensor:
        return self.head(self.norm(h).mean(dim=1))
