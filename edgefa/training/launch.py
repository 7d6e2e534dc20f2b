"""One training run from its settings: checked, its data loaded, then trained in this process or
data-parallel (`--nproc`, or a rank torchrun started). What `edgefa train` calls."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgefaError
from ..shared.datasets import Dataset, load_dataset
from .config import TrainConfig
from .distributed import OnEpoch, WorldEnv, check_launch, torchrun_env, train_distributed
from .trainer import build_model, save_run, train


@dataclass
class PreparedRun:
    """A run that passed every check that can be made before training (prepare_training)."""
    config: TrainConfig
    data: Dataset
    world: WorldEnv | None            # set when torchrun started this process as one rank

    @property
    def distributed(self) -> bool:
        return self.world is not None or self.config.nproc > 1

    @property
    def reports(self) -> bool:
        """Whether this process reports and writes the run (rank 0, or the only process)."""
        return self.world is None or self.world.rank == 0

    def run(self, out: str | os.PathLike, on_epoch: OnEpoch | None = None) -> tuple[dict, Path] | None:
        """Train and save the run into `out`: (metrics, checkpoint path); None on a rank that does
        not report (rank 0 writes the run)."""
        if self.distributed:
            return train_distributed(self.config, out, on_epoch, env=self.world, data=self.data)
        run = train(self.config, on_epoch, self.data)
        return run.metrics, save_run(run, out)


def prepare_training(config: TrainConfig) -> PreparedRun:
    """Check `config` against the world it runs in and its data, and load the data: every mistake
    is one line (EdgefaError) here, before any training."""
    config.check()
    world = torchrun_env()
    if world is not None or config.nproc > 1:
        check_launch(config, world)        # batch shares, GPUs for NCCL
    data = load_dataset(config.dataset)    # a bad data file
    try:                                   # a model that does not fit the data (patch, heads)
        build_model(config, data.X.shape[1], data.n_classes, data.image_shape)
    except ValueError as exc:
        raise EdgefaError(f"{config.model}: {exc}") from None
    return PreparedRun(config, data, world)
