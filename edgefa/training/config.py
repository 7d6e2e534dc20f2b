"""A training run's settings (`edgefa train`, `edgefa train-preference`), and the checks they
must pass before any work: standard library only, so a bad combination is one line before torch is
imported."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import EdgefaError


@dataclass
class TrainConfig:
    method: str = "dfa"
    dataset: str = "digits"
    hidden: list[int] = field(default_factory=lambda: [256, 256])
    activation: str = "relu"
    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.003
    momentum: float = 0.9
    seed: int = 0
    feedback_seed: int = 1
    test_fraction: float = 0.25
    hybrid_every: int = 10           # method "hybrid": a true BP step every k-th step
    device: str = "auto"
    model: str = "mlp"               # mlp | resmlp | cnn | vit | transformer
    width: int | None = None         # None: the model's default (MODEL_DEFAULTS)
    depth: int | None = None
    expansion: int = 1
    heads: int = 4
    patch: int | None = None         # vit; None: 4 when it divides every spatial dim >= 16, else 2
    penalty: float = 0.0             # lambda of the residual-stream penalty lambda * sum_l ||f_l(h_l)||^2
    freeze_blocks: bool = False      # the frozen-random-blocks baseline
    loss: str = "cross_entropy"      # cross_entropy | bradley-terry | hinge (a preference scorer's run)
    alignment: bool = True           # log alignment with true BP per epoch (training/alignment.py)
    nproc: int = 1                   # data-parallel processes (training/distributed.py); batch_size is global

    def check(self) -> None:
        """Refuse a combination of settings no run can take, as one line (EdgefaError)."""
        if self.batch_size % self.nproc:
            raise EdgefaError(f"--batch-size {self.batch_size} is not divisible by --nproc {self.nproc}: "
                              "each process takes an equal share of the global batch")
        if self.model == "mlp" and self.activation == "gelu":
            raise EdgefaError("--activation gelu is for resmlp, cnn, vit and transformer; the mlp takes relu or tanh")
        if self.model == "mlp" and (self.penalty or self.freeze_blocks):
            raise EdgefaError("--penalty and --freeze-blocks need residual blocks (resmlp, vit, transformer)")
