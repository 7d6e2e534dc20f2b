"""Which samples make up training step k: a pure function of (seed, step), so a resumed run sees
exactly the batches an uninterrupted one would, and the host's reference run sees the same too."""

from __future__ import annotations

import numpy as np


def batch_indices(n_samples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of the batch for `step`: epochs are seeded permutations; the last short batch of an
    epoch is dropped so every step has the same batch size."""
    if n_samples <= 0:
        raise ValueError("no samples to draw batches from")
    batch_size = min(batch_size, n_samples)
    per_epoch = n_samples // batch_size
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_samples)
    return order[k * batch_size:(k + 1) * batch_size]
