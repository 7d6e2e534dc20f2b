"""`--trainable last:K`: a train_step graph that updates only the last K units from the head.

Frozen layers stay graph inputs (shared with infer.onnx) but get no momentum, no feedback, no next
weights and no update bound; the device leaves them bit-identical, trains the rest exactly as a
host DFA run that trains only those layers, keeps only what changes in its checkpoints, and the
budget stops counting optimizer memory for frozen layers."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.nn import functional as F

from conftest import assert_one_error_line, run_edgefa
from edgefa.bundle import (feedback_shapes, momentum_name, param_shapes, read_bundle, trainable_layers,
                           trainable_params, trainable_units)
from edgefa.shared.datasets import Standardizer
from edgefa.exporters.export import _param_name, export_bundle
from edgefa.models import MLP, MLPConfig, NetConfig, ResMLP
from edgefa.runtime.engine import OrtEngine
from edgefa.runtime.state import CHECKPOINT
from edgefa.training.trainer import Run, TrainConfig, make_optimizer, save_run

TOL = 1e-5
LR = 0.05


def mlp_run(widths=(20, 48, 24, 5), momentum=0.9, seed=0) -> Run:
    in_features, *hidden, classes = widths
    torch.manual_seed(seed)
    model = MLP(MLPConfig(in_features, list(hidden), classes, "relu", "dfa", feedback_seed=seed + 7))
    return Run(model, make_optimizer(model, LR, momentum),
               TrainConfig(method="dfa", hidden=list(hidden), lr=LR, momentum=momentum),
               Standardizer(0.0, 1.0), {"final_test_accuracy": None})


def resmlp_run(momentum=0.9, seed=0) -> Run:
    torch.manual_seed(seed)
    model = ResMLP(NetConfig("resmlp", [12], 4, "dfa", feedback_seed=seed + 7, width=16, depth=3, expansion=2,
                             activation="gelu"))
    return Run(model, make_optimizer(model, LR, momentum), TrainConfig(method="dfa", lr=LR, momentum=momentum),
               Standardizer(0.0, 1.0), {"final_test_accuracy": None})


def bundle_name(run: Run, key: str) -> str:
    return _param_name(key) if isinstance(run.model, MLP) else key


def freeze_all_but(run: Run, trained_layers: list[str]) -> None:
    """The host reference: only these layers train (the others get no gradient, so SGD skips them)."""
    for key, p in run.model.named_parameters():
        p.requires_grad_(bundle_name(run, key).rsplit(".", 1)[0] in trained_layers)


# --- the naming contract --------------------------------------------------------------------

def test_units_count_from_the_head():
    mlp = {"kind": "mlp", "in_features": 4, "n_classes": 2, "activation": "relu",
           "layers": [{"name": "fc0", "in": 4, "out": 3}, {"name": "fc1", "in": 3, "out": 3},
                      {"name": "head", "in": 3, "out": 2}]}
    assert trainable_units(mlp) == [["head"], ["fc1"], ["fc0"]]
    assert trainable_layers(dict(mlp, trainable="last:2")) == ["fc1", "head"]
    assert feedback_shapes(dict(mlp, trainable="last:2")) == {"fc1": (2, 3)}
    assert feedback_shapes(dict(mlp, trainable="last:1")) == {}
    res = {"kind": "resmlp", "in_features": 4, "n_classes": 2, "activation": "relu", "width": 8, "depth": 2,
           "expansion": 1, "ln_eps": 1e-5}
    assert trainable_units(res) == [["norm", "head"], ["blocks.1.norm", "blocks.1.fc1", "blocks.1.fc2"],
                                    ["blocks.0.norm", "blocks.0.fc1", "blocks.0.fc2"], ["embed"]]
    assert trainable_layers(dict(res, trainable="last:2")) == ["blocks.1.norm", "blocks.1.fc1", "blocks.1.fc2",
                                                                "norm", "head"]
    assert feedback_shapes(dict(res, trainable="last:2")) == {"block1": (2, 8)}
    assert list(trainable_params(dict(res, trainable="last:4"))) == list(param_shapes(res))


def test_graph_signature_of_a_last_1_bundle(tmp_path):
    bundle = read_bundle(export_bundle(mlp_run(), tmp_path / "b", trainable="last:1"))
    assert bundle.model["trainable"] == "last:1" and bundle.feedback == {}
    sess = ort.InferenceSession(str(tmp_path / "b" / "train_step.onnx"), providers=["CPUExecutionProvider"])
    inputs = {i.name for i in sess.get_inputs()}
    outputs = [o.name for o in sess.get_outputs()]
    assert set(param_shapes(bundle.model)) <= inputs                       # frozen weights: still inputs
    assert {n for n in inputs if n.endswith(".momentum")} == {"head.weight.momentum", "head.bias.momentum"}
    assert not [n for n in inputs if n.startswith("feedback.")]
    assert outputs == ["head.weight.next", "head.weight.momentum.next", "head.bias.next",
                       "head.bias.momentum.next", "update_bound", "loss", "logits"]
    assert sess.get_outputs()[4].shape == [1]


# --- device against host ----------------------------------------------------------------------

@pytest.mark.parametrize("which,spec", [("mlp", "last:1"), ("mlp", "last:2"), ("resmlp", "last:1"),
                                        ("resmlp", "last:2"), ("resmlp", "last:4")])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_frozen_layers_stay_bit_identical_and_trained_ones_match_the_host(tmp_path, which, spec, momentum):
    run = mlp_run(momentum=momentum) if which == "mlp" else resmlp_run(momentum=momentum)
    path = export_bundle(run, tmp_path / "b", trainable=spec)
    bundle = read_bundle(path)
    trained = trainable_layers(bundle.model)
    freeze_all_but(run, trained)
    engine = OrtEngine(bundle, threads=1)
    rng = np.random.default_rng(0)
    in_features, classes = bundle.model["in_features"], bundle.model["n_classes"]
    for batch in (7, 32, 1, 16, 7, 32):
        x = rng.normal(size=(batch, in_features)).astype(np.float32)
        y = rng.integers(0, classes, size=batch)
        loss = F.cross_entropy(run.model(torch.from_numpy(x)), torch.from_numpy(y))
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        result = engine.step(x, y, LR)
        assert result.accepted and abs(result.loss - loss.item()) <= TOL
    state = engine.state()
    assert set(state) == set(trainable_params(bundle.model)) | (
        {momentum_name(p) for p in trainable_params(bundle.model)} if momentum else set())
    host = {bundle_name(run, k): p.detach().numpy() for k, p in run.model.named_parameters()}
    worst = max(float(np.abs(host[n] - state[n]).max()) for n in trainable_params(bundle.model))
    assert worst <= TOL, worst
    initial = read_bundle(path).weights
    for name in param_shapes(bundle.model):
        if name in state:
            assert float(np.abs(state[name] - initial[name]).max()) > 100 * TOL, name   # really trained
        else:
            np.testing.assert_array_equal(host[name], initial[name])            # frozen on the host too
            np.testing.assert_array_equal(engine.frozen[name], initial[name])   # ... and on the device
    # the device's forward uses the frozen weights and the trained ones together
    x = rng.normal(size=(9, in_features)).astype(np.float32)
    with torch.no_grad():
        expected = run.model(torch.from_numpy(x)).numpy()
    assert float(np.abs(engine.predict_logits(x) - expected).max()) <= 1e-4


def test_checkpoint_holds_only_what_changes_and_resume_is_bit_identical(tmp_path, digits_npz):
    run = mlp_run(widths=(64, 32, 16, 10))
    path = export_bundle(run, tmp_path / "b", trainable="last:2")
    full = tmp_path / "full"
    shutil.copytree(path, full)
    # lr 0.01: the bundle's own 0.05 runs away on digits (loss 2.7 -> 35 by step 7) and is stopped
    first = run_edgefa("device", "finetune", path, "--data", digits_npz, "--steps", "10", "--lr", "0.01",
                       without_torch=True)
    assert first.returncode == 0, first.stderr
    with np.load(path / "state" / CHECKPOINT) as z:
        keys = set(z.files)
    assert keys == {"fc1.weight", "fc1.bias", "head.weight", "head.bias", "fc1.weight.momentum",
                    "fc1.bias.momentum", "head.weight.momentum", "head.bias.momentum",
                    "feedback/fc1", "step", "refused_steps"}
    procs = [run_edgefa("device", "finetune", b, "--data", digits_npz, "--steps", "25", "--lr", "0.01",
                        without_torch=True) for b in (path, full)]
    for p in procs:
        assert p.returncode == 0, p.stderr
    with np.load(path / "state" / CHECKPOINT) as a, np.load(full / "state" / CHECKPOINT) as b:
        assert set(a.files) == set(b.files)
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k])


# --- the budget -------------------------------------------------------------------------------

def test_budget_of_last_1_drops_by_the_frozen_layers_optimizer_memory(tmp_path):
    """784-1024-1024-10, momentum 0.9, batch 32: `last:1` trains the head only. Per frozen
    parameter it saves momentum (4 bytes), ping-pong side B of weight and momentum (8), the update
    temporary (4) and the checkpoint copy of weight and momentum (8): 24 bytes; plus the two
    feedback matrices B_fc0, B_fc1 [10, 1024] it no longer stores."""
    from edgefa.device_profiles import load_profile
    from edgefa.device_profiles.budget import budget

    run = mlp_run(widths=(784, 1024, 1024, 10))
    out = {spec: read_bundle(export_bundle(run, tmp_path / spec.replace(":", "-"), trainable=spec))
           for spec in ("all", "last:1")}
    profile = load_profile("jetson-orin-nano-8gb")
    b_all, b_last = (budget(out[s].manifest, profile, 32) for s in ("all", "last:1"))
    frozen = (784 * 1024 + 1024) + (1024 * 1024 + 1024)            # fc0 and fc1, weights and biases
    head = 1024 * 10 + 10
    feedback = 2 * 10 * 1024
    assert b_all.memory["weights"] == b_last.memory["weights"] == 4 * (frozen + head)
    assert b_last.memory["optimizer"] == 4 * head and b_last.memory["ping-pong"] == 8 * head
    assert b_last.memory["feedback"] == 0 and b_all.memory["feedback"] == 4 * feedback
    assert b_all.peak_bytes - b_last.peak_bytes == 24 * frozen + 4 * feedback == 44_564_480
    assert b_last.cost.flops < b_all.cost.flops and b_last.cost.bytes_moved < b_all.cost.bytes_moved
    # the CLI shows the same figures
    cli = {s: run_edgefa("budget", tmp_path / s.replace(":", "-"), "--profile", "jetson-orin-nano-8gb",
                         "--batch", "32", "--json", without_torch=True) for s in ("all", "last:1")}
    figures = {s: json.loads(p.stdout)["peak_bytes"] for s, p in cli.items()}
    assert figures == {"all": b_all.peak_bytes, "last:1": b_last.peak_bytes}
    print(f"budget 784-1024-1024-10 batch 32 on {profile.name}: all {b_all.peak_bytes} B, "
          f"last:1 {b_last.peak_bytes} B, saved {b_all.peak_bytes - b_last.peak_bytes} B; "
          f"memory all {b_all.memory}; last:1 {b_last.memory}")


# --- bad specs ----------------------------------------------------------------------------------

def _cli_in_process(capsys, *args) -> subprocess.CompletedProcess:
    from edgefa.cli import main

    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, info.value.code, captured.out, captured.err)


@pytest.mark.parametrize("spec,problem", [
    ("last:0", "K must be between 1 and 3"), ("last:99", "K must be between 1 and 3"),
    ("first:2", "expected 'all', 'head' or 'last:K'"), ("last:x", "K must be an integer")])
def test_bad_trainable_specs_are_one_line(tmp_path_factory, capsys, spec, problem):
    run_dir = tmp_path_factory.getbasetemp() / "trainable-run"
    if not (run_dir / "checkpoint.pt").exists():
        save_run(mlp_run(widths=(6, 5, 4, 3)), run_dir)
    out = tmp_path_factory.mktemp("bad") / "B"
    proc = _cli_in_process(capsys, "export", run_dir, "--out", out, "--trainable", spec)
    assert_one_error_line(proc, f"export: --trainable '{spec}'", problem)
    assert not out.exists()
