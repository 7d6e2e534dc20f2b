"""Pairwise preference losses for a scorer s(x): the chosen item should score higher.

    Bradley-Terry   -log sigmoid(s_w - s_l)       = softplus(-(s_w - s_l)): finite for any margin
    hinge           max(0, m - (s_w - s_l))
    accuracy        the share of pairs with s_w > s_l (a tie counts as wrong)

Each is the mean over the pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

LOSSES = ("bradley-terry", "hinge")


def bradley_terry_loss(s_chosen: Tensor, s_rejected: Tensor) -> Tensor:
    return F.softplus(-(s_chosen - s_rejected)).mean()


def hinge_loss(s_chosen: Tensor, s_rejected: Tensor, margin: float = 1.0) -> Tensor:
    return torch.relu(margin - (s_chosen - s_rejected)).mean()


def preference_loss(name: str, s_chosen: Tensor, s_rejected: Tensor, margin: float = 1.0) -> Tensor:
    if name == "bradley-terry":
        return bradley_terry_loss(s_chosen, s_rejected)
    if name == "hinge":
        return hinge_loss(s_chosen, s_rejected, margin)
    raise ValueError(f"unknown preference loss {name!r}; expected one of {', '.join(LOSSES)}")


def preference_accuracy(s_chosen: Tensor, s_rejected: Tensor) -> float:
    return (s_chosen > s_rejected).float().mean().item()
