"""The engine proves each step finite from the graph's per-layer update bounds instead of reading
the new weights again. These tests check that the bounds really bound, and that no non-finite
state is ever accepted."""

from __future__ import annotations

import numpy as np
import pytest

from edgefa.bundle import momentum_name, read_bundle
from edgefa.exporters.export import export_bundle
from edgefa.runtime.engine import OrtEngine
from test_parity import make_run


def _max_abs(side: dict, names: list[str]) -> float:
    return max(float(np.abs(side[n]).max()) for n in names)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_bounds_hold_after_every_step(tmp_path, momentum):
    engine = OrtEngine(read_bundle(export_bundle(make_run([30, 40, 20, 4], "relu", momentum), tmp_path / "b")))
    rng = np.random.default_rng(0)
    for _ in range(25):
        x = rng.normal(scale=3.0, size=(16, 30)).astype(np.float32)
        assert engine.step(x, rng.integers(0, 4, 16), 0.5).accepted
        side = engine.sides[engine.current]
        for i, layer in enumerate(engine.layers):
            params = [f"{layer}.weight", f"{layer}.bias"]
            assert _max_abs(side, params) <= engine.bounds.w[i]
            if momentum:
                assert _max_abs(side, [momentum_name(p) for p in params]) <= engine.bounds.v[i]
    tracked = engine.bounds.w.copy()
    engine.state()  # reading the state tightens the bounds to the exact maxima
    assert (engine.bounds.w <= tracked).all() and (engine.bounds.w < tracked).any()


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("lr", [1e38, float("inf"), float("nan")])
def test_a_step_that_would_overflow_is_refused_and_nothing_changes(tmp_path, momentum, lr):
    engine = OrtEngine(read_bundle(export_bundle(make_run([12, 8, 3], "tanh", momentum), tmp_path / "b")))
    before = engine.state()
    rng = np.random.default_rng(1)
    result = engine.step(rng.normal(size=(5, 12)).astype(np.float32), rng.integers(0, 3, 5), lr)
    # what the graph wrote for the refused step (ping-pong only; in place nothing is written)
    written = engine.sides[1 - engine.current] if len(engine.sides) == 2 else {}
    if not all(np.isfinite(a).all() for a in written.values()):
        assert not result.accepted  # the proof never lets a non-finite state through
    assert not result.accepted  # and these rates are all far past the overflow limit
    after = engine.state()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_nan_input_is_refused(tmp_path):
    engine = OrtEngine(read_bundle(export_bundle(make_run([6, 5, 2], "relu", 0.9), tmp_path / "b")))
    x = np.ones((3, 6), np.float32)
    x[1, 2] = np.nan
    assert not engine.step(x, np.array([0, 1, 0]), 0.01).accepted
    assert engine.step(np.ones((3, 6), np.float32), np.array([0, 1, 0]), 0.01).accepted
