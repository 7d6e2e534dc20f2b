"""What every experiment grid parses, runs and reduces the same way: comma lists, seeds, a pool of
worker processes, mean and std."""

from __future__ import annotations

from typing import Callable, Sequence

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


def pool_map(fn: Callable, tasks: list, jobs: int, on_done: Callable[[object], None] | None = None,
             initializer: Callable | None = None, initargs: tuple = ()) -> list:
    """[fn(task) for task in tasks], in task order, over up to `jobs` spawned worker processes
    (spawn: no fork after torch or CUDA is initialized); `on_done(result)` as each one finishes.
    With one job everything runs here, after `initializer(*initargs)`."""
    if jobs <= 1 or len(tasks) <= 1:
        if initializer:
            initializer(*initargs)
        results = []
        for task in tasks:
            results.append(fn(task))
            if on_done:
                on_done(results[-1])
        return results
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    results = [None] * len(tasks)
    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=mp.get_context("spawn"),
                             initializer=initializer, initargs=initargs) as pool:
        index = {pool.submit(fn, task): i for i, task in enumerate(tasks)}
        for future in as_completed(index):
            results[index[future]] = future.result()
            if on_done:
                on_done(results[index[future]])
    return results
