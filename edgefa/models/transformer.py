"""Pre-LN transformer blocks, and a small causal transformer that scores token sequences.

    block     h <- h + proj(attention(LN(h)));  h <- h + fc2(act(fc1(LN(h))))
    causal    embed tokens (ids, or one real feature per position) + learned positions,
              causal blocks, terminal LN, head read at the last non-pad position

Attention is written out (q k^T / sqrt(d_head), mask, softmax, @ v) so that its projections are
FeedbackLinear layers and follow the rule; softmax and LayerNorm pass their true local gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .feedback_net import ACTIVATIONS, FeedbackNet, NetConfig
from .layers import FeedbackLinear


class TransformerBlock(nn.Module):
    residual = True

    def __init__(self, width: int, heads: int, expansion: int, activation: str, rule: str, causal: bool):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads, self.causal = heads, causal
        self.norm1 = nn.LayerNorm(width)
        self.qkv = FeedbackLinear(width, 3 * width, rule)
        self.proj = FeedbackLinear(width, width, rule)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = FeedbackLinear(width, width * expansion, rule)
        self.act = ACTIVATIONS[activation]()
        self.fc2 = FeedbackLinear(width * expansion, width, rule)

    def attention(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
        if self.causal:
            future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        out = scores.softmax(dim=-1) @ v                       # [n, heads, t, d_head]
        return self.proj(out.transpose(1, 2).reshape(n, t, d))

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attention(self.norm1(h))
        return h + self.fc2(self.act(self.fc1(self.norm2(h))))


class TokenEmbedding(nn.Module):
    """Token ids -> vectors (vocab > 0), or one real feature per position -> vectors; + positions."""

    def __init__(self, length: int, width: int, vocab: int, rule: str):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width) if vocab else FeedbackLinear(1, width, rule)
        self.positions = nn.Parameter(torch.randn(length, width) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.tokens(x) if isinstance(self.tokens, nn.Embedding) else self.tokens(x.unsqueeze(-1))
        return tokens + self.positions


class CausalTransformer(FeedbackNet):
    def __init__(self, config: NetConfig):
        super().__init__(config)
        if len(config.in_shape) != 1:
            raise ValueError(f"transformer needs sequences shaped [T], got {config.in_shape}")
        d, r = config.width, config.layer_rule
        self.embed = TokenEmbedding(config.in_shape[0], d, config.vocab, r)
        self.blocks = nn.ModuleList(TransformerBlock(d, config.heads, config.expansion, config.activation, r,
                                                      causal=True) for _ in range(config.depth))
        self.norm = nn.LayerNorm(d)
        self.head = FeedbackLinear(d, config.n_outputs, r)
        self._last = None
        self.finish()

    def prepare(self, x: Tensor) -> Tensor:
        # the score is read at the last real token; with right padding the causal mask keeps
        # every real token from seeing the padding
        if self.config.pad_id >= 0:
            self._last = ((x != self.config.pad_id).sum(dim=1) - 1).clamp(min=0)
        else:
            self._last = torch.full((x.shape[0],), x.shape[1] - 1, device=x.device)
        return x

    def readout(self, h: Tensor) -> Tensor:
        h = self.norm(h)
        return self.head(h[torch.arange(h.shape[0], device=h.device), self._last])
