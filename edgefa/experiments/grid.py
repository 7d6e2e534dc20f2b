"""What every experiment grid parses and reduces the same way: comma lists, seeds, mean and std."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import EdgefaError


def comma_items(text: str, what: str) -> list[str]:
    items = [t.strip() for t in str(text).split(",")]
    if not items or any(not t for t in items):
        raise EdgefaError(f"{what}: expected a comma-separated list, got {text!r}")
    duplicates = sorted({t for t in items if items.count(t) > 1})
    if duplicates:
        raise EdgefaError(f"{what}: {', '.join(duplicates)} given more than once")
    return items


def parse_seeds(text: str) -> list[int]:
    seeds = []
    for item in comma_items(text, "--seeds"):
        try:
            seed = int(item)
        except ValueError:
            raise EdgefaError(f"--seeds: {item!r} is not a whole number") from None
        if seed < 0:
            raise EdgefaError(f"--seeds: seeds must be >= 0, got {seed}")
        seeds.append(seed)
    return seeds


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, sample std with ddof=1); the std is None for fewer than two values."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    arr = np.asarray(values)
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(arr) > 1 else None)
