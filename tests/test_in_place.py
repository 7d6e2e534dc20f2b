"""The CPU engine's in-place step (step_factors.onnx + runtime/in_place.py) against the ping-pong
step of the same bundle's train_step.onnx, for every bundle kind; and a bundle written before the
step-factors graph existed (no such entry in its manifest) still trains, by ping-pong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from test_device_preference import scorer_run
from test_trainable import mlp_run, resmlp_run
from edgefa.bundle import HEAD_FACTORS_GRAPH, STEP_FACTORS_GRAPH, read_bundle
from edgefa.exporters.export import export_bundle
from edgefa.models import CNN, NetConfig
from edgefa.runtime.engine import OrtEngine
from edgefa.shared.datasets import Standardizer
from edgefa.training.trainer import Run, TrainConfig, make_optimizer

STEPS, LR = 6, 0.05


def cnn_run(momentum: float = 0.9) -> Run:
    torch.manual_seed(0)
    model = CNN(NetConfig("cnn", [1, 8, 8], 10, rule="dfa", width=4, depth=2))
    return Run(model, make_optimizer(model, LR, momentum), TrainConfig(method="dfa", model="cnn", lr=LR, momentum=momentum),
               Standardizer(0.5, 2.0), {"final_test_accuracy": None})


KINDS = {  # name -> (run, export keywords)
    "mlp-momentum": (lambda: mlp_run(momentum=0.9), {}),
    "mlp-plain": (lambda: mlp_run(momentum=0.0), {}),
    "mlp-last2": (lambda: mlp_run(momentum=0.9), {"trainable": "last:2"}),
    "resmlp": (lambda: resmlp_run(momentum=0.9), {}),          # LayerNorm gamma/beta trained too
    "cnn": (lambda: cnn_run(0.9), {}),
    "cnn-trunk": (lambda: cnn_run(0.9), {"trainable": "last:2"}),   # frozen trunk: head_step too
    "preference": (lambda: scorer_run(momentum=0.9), {}),
}


def as_old_bundle(path: Path, out: Path) -> Path:
    """A copy of the bundle as edgefa wrote it before step_factors.onnx: no such graphs listed."""
    shutil.copytree(path, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for key, name in (("step_factors", STEP_FACTORS_GRAPH), ("head_factors", HEAD_FACTORS_GRAPH)):
        manifest["graphs"].pop(key, None)
        manifest["files"].pop(name, None)
        (out / name).unlink(missing_ok=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def train(engine: OrtEngine, seed: int = 0) -> list[float]:
    rng, losses = np.random.default_rng(seed), []
    inputs = {i.name: i.shape for i in engine.train_session.get_inputs()}
    for k in range(STEPS):
        if engine.preference:
            shape = [4, *inputs["x_chosen"][1:]]
            r = engine.step_pairs(rng.standard_normal(shape).astype(np.float32),
                                  rng.standard_normal(shape).astype(np.float32), LR)
        else:
            x = rng.standard_normal([8, *inputs["x"][1:]]).astype(np.float32)
            y = rng.integers(0, engine.bundle.model["n_classes"], 8)
            # a trunk bundle: every other step on cached features, as the fine-tuner does
            r = (engine.step_features(engine.features(x), y, LR) if engine.caches_features and k % 2
                 else engine.step(x, y, LR))
        assert r.accepted
        losses.append(r.loss)
    return losses


@pytest.mark.parametrize("kind", list(KINDS))
def test_in_place_matches_ping_pong_and_holds_the_state_once(tmp_path, kind):
    make_run, keywords = KINDS[kind]
    path = export_bundle(make_run(), tmp_path / "new", **keywords)
    new = OrtEngine(read_bundle(path), threads=1)
    old = OrtEngine(read_bundle(as_old_bundle(path, tmp_path / "old")), threads=1)
    assert new.in_place and len(new.sides) == 1
    assert not old.in_place and len(old.sides) == 2
    np.testing.assert_allclose(train(new), train(old), rtol=1e-5, atol=1e-6)
    a, b = new.state(), old.state()
    assert a.keys() == b.keys()
    moved = 0
    for n in a:
        np.testing.assert_allclose(a[n], b[n], rtol=1e-5, atol=1e-6, err_msg=n)
        moved += not np.array_equal(a[n], read_bundle(path).weights.get(n, np.zeros_like(a[n])))
    assert moved == len(a)          # every trainable tensor (and its momentum) was updated


def test_a_refused_in_place_step_leaves_the_state_bit_identical_and_training_goes_on(tmp_path):
    engine = OrtEngine(read_bundle(export_bundle(mlp_run(momentum=0.9), tmp_path / "b")), threads=1)
    assert engine.in_place
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((8, 20)).astype(np.float32), rng.integers(0, 5, 8)
    assert engine.step(x, y, LR).accepted
    before = engine.state()
    assert not engine.step(x, y, 1e38).accepted
    after = engine.state()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert engine.step(x, y, LR).accepted
