"""The shared skeleton of the residual MLP, CNN, ViT-Mini and causal transformer.

A network is a list of named *stages* (the stem, then the blocks) and a *readout* (terminal
LayerNorm, pooling, head). The learning rule decides how credit reaches each stage:

    bp      ordinary autograd through everything
    fa/usf  every FeedbackLinear / FeedbackConv sends its input gradient through B (layers.py)
    dfa     each stage's input is detached, and the output error e = dLoss/dy is injected at every
            stage output as e @ B_stage (B_stage: [outputs, numel of that stage's output per
            sample]); inside a stage, the stage's own local gradient. The readout trains on the
            true gradient of the loss.
    hybrid  dfa, except on the steps where the trainer sets `bp_step` (every k-th step)

`penalty` after a forward pass is sum over residual blocks of mean_samples ||f_l(h_l)||^2, the norm
over the feature dim (-1) and the mean over samples (and tokens): the residual-stream penalty that a
trainer adds as lambda * penalty. `freeze_blocks` keeps the blocks at their random initialization
(the frozen-random-blocks baseline: only the stem, the terminal LayerNorm and the head train).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .rules import RULES, dfa_feedback_std, dfa_output
from .layers import fa_feedback_std

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


@dataclass
class NetConfig:
    kind: str                      # resmlp | cnn | vit | transformer
    in_shape: list[int]            # one sample: [D], [C, L] or [C, H, W]; tokens: [T]
    n_outputs: int                 # classes, or 1 for a scorer
    rule: str = "dfa"
    feedback_seed: int = 1
    hybrid_every: int = 10
    width: int = 256               # model dim (resmlp, vit, transformer); base channels (cnn)
    depth: int = 4                 # residual blocks; conv stages (cnn)
    expansion: int = 1             # block MLP hidden = width * expansion
    activation: str = "relu"
    heads: int = 4                 # vit, transformer
    patch: int = 2                 # vit
    vocab: int = 0                 # transformer: token ids in [0, vocab); 0 = real-valued features
    pad_id: int = -1               # transformer: the padding id (scores read at the last other token)
    freeze_blocks: bool = False

    def __post_init__(self):
        self.in_shape = [int(s) for s in self.in_shape]
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; expected one of {', '.join(RULES)}")
        if self.hybrid_every < 1:
            raise ValueError(f"hybrid_every must be at least 1, got {self.hybrid_every}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {', '.join(ACTIVATIONS)}")
        for name in ("width", "depth", "expansion", "heads", "patch", "n_outputs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def layer_rule(self) -> str:
        """The rule of every FeedbackLinear/Conv: their own for fa/usf, true local gradients otherwise."""
        return self.rule if self.rule in ("fa", "usf") else "bp"


class FeedbackNet(nn.Module):
    """Subclasses build their layers, then call `self.finish()`; they define `stages`, `readout`
    and optionally `prepare` (reshape the flat input)."""

    def __init__(self, config: NetConfig):
        super().__init__()
        self.config = config
        self.bp_step = False
        self.penalty = torch.zeros(())

    @property
    def kind(self) -> str:
        """resmlp | cnn | vit | transformer, as a bundle's manifest names it (bundle.model_kind)."""
        return self.config.kind

    # --- what a subclass defines ------------------------------------------------------------
    def stages(self) -> list[tuple[str, nn.Module]]:
        """The residual models' stages: the stem `embed`, then each of `blocks` (the CNN has its own)."""
        return [("embed", self.embed)] + [(f"block{i}", b) for i, b in enumerate(self.blocks)]

    def readout(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    def prepare(self, x: Tensor) -> Tensor:
        return x

    # --- shared ---------------------------------------------------------------------------
    def stage_names(self) -> list[str]:
        return [name for name, _ in self.stages()]

    def residual_blocks(self) -> list[nn.Module]:
        return [m for _, m in self.stages() if getattr(m, "residual", False)]

    def finish(self) -> None:
        """Freeze the blocks if asked, and draw every feedback matrix from the run's seed (on the
        CPU, so every device gets the same ones); they are buffers, so checkpoints keep them."""
        cfg = self.config
        if cfg.freeze_blocks:
            for block in self.residual_blocks():
                block.requires_grad_(False)
        gen = torch.Generator().manual_seed(cfg.feedback_seed)
        if cfg.rule == "fa":
            for module in self.modules():
                if isinstance(getattr(module, "feedback", None), Tensor):
                    fb = module.feedback
                    fb.copy_(torch.randn(fb.shape, generator=gen) * fa_feedback_std(module.weight))
        if cfg.rule in ("dfa", "hybrid"):
            sizes = self._stage_sizes()
            for name in self.stage_names():
                b = torch.randn((cfg.n_outputs, sizes[name]), generator=gen) * dfa_feedback_std(cfg.n_outputs)
                self.register_buffer(f"feedback_{name}", b)

    @torch.no_grad()
    def _stage_sizes(self) -> dict[str, int]:
        dtype = torch.int64 if self.config.vocab else torch.float32
        h = self.prepare(torch.zeros((1, math.prod(self.config.in_shape)), dtype=dtype))
        sizes = {}
        for name, stage in self.stages():
            h = stage(h)
            sizes[name] = h[0].numel()
        return sizes

    def feedback_names(self) -> list[str]:
        """state_dict keys of every stored feedback matrix (none for bp and usf)."""
        return [k for k, _ in self.named_buffers() if k.startswith("feedback_") or k.endswith(".feedback")]

    def dfa_feedback(self) -> list[Tensor]:
        return [getattr(self, f"feedback_{name}") for name in self.stage_names()]

    def forward(self, x: Tensor) -> Tensor:
        rule = self.config.rule
        dfa = rule == "dfa" or (rule == "hybrid" and not self.bp_step)
        h = self.prepare(x)
        outputs, penalty = [], torch.zeros((), device=h.device)
        for _, stage in self.stages():
            h_in = h.detach() if dfa and outputs else h
            h = stage(h_in)
            if getattr(stage, "residual", False):
                penalty = penalty + (h - h_in).pow(2).sum(dim=-1).mean()
            outputs.append(h)
        self.penalty = penalty
        y = self.readout(h.detach() if dfa else h)
        if dfa:
            y = dfa_output(y, self.dfa_feedback(), [o.flatten(1) for o in outputs])
        return y
