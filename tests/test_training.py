"""Host training: the learning rules compute what they claim, runs are deterministic, and
checkpoints carry their feedback matrices."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import cli_in_process, run_edgefa
from edgefa.shared.datasets import Dataset, save_npz
from edgefa.errors import CheckpointError
from edgefa.models import MLP, MLPConfig
from edgefa.training.trainer import CHECKPOINT, TrainConfig, load_run, train


def _tiny(rule: str, activation: str = "tanh") -> tuple[MLP, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = MLP(MLPConfig(6, [5, 4], 3, activation, rule, feedback_seed=2))
    x = torch.randn(8, 6, dtype=torch.float32)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    return model, x, y


def _manual_forward(model: MLP, x: torch.Tensor):
    """Pre-activations and activations, computed without autograd."""
    a_s, h_s, h = [], [x], x
    for lin in model.hidden_layers:
        a = h @ lin.weight.T + lin.bias
        h = model.act(a)
        a_s.append(a)
        h_s.append(h)
    return a_s, h_s, h @ model.head.weight.T + model.head.bias


@torch.no_grad()
def _expected_grads(model: MLP, x, y, rule: str) -> list[torch.Tensor]:
    a_s, h_s, logits = _manual_forward(model, x)
    e = (torch.softmax(logits, dim=1) - F.one_hot(y, 3).float()) / len(y)
    act_grad = [1 - torch.tanh(a) ** 2 for a in a_s]
    grads = [None] * len(a_s) + [e.T @ h_s[-1]]
    if rule == "dfa":
        for l, b in enumerate(model.feedback()):
            grads[l] = ((e @ b) * act_grad[l]).T @ h_s[l]
    else:  # fa: the error walks back layer by layer through B instead of W
        delta, fb = e, model.feedback()
        for l in reversed(range(len(a_s))):
            delta = (delta @ fb[l + 1]) * act_grad[l]
            grads[l] = delta.T @ h_s[l]
    return grads


@pytest.mark.parametrize("rule", ["dfa", "fa"])
def test_rule_gradients_match_their_definition(rule):
    model, x, y = _tiny(rule)
    F.cross_entropy(model(x), y).backward()
    expected = _expected_grads(model, x, y, rule)
    for lin, g in zip(model.linears(), expected):
        torch.testing.assert_close(lin.weight.grad, g, rtol=1e-5, atol=1e-6)
    # and they are not the BP gradients (the rule changed something)
    bp, _, _ = _tiny("bp")
    bp.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("feedback_")})
    F.cross_entropy(bp(x), y).backward()
    assert not torch.allclose(bp.hidden_layers[0].weight.grad, model.hidden_layers[0].weight.grad)


def test_feedback_matrices_are_buffers_not_parameters():
    model, _, _ = _tiny("dfa")
    assert [n for n, _ in model.named_buffers()] == ["feedback_fc0", "feedback_fc1"]
    assert all(not n.startswith("feedback") for n, _ in model.named_parameters())
    assert tuple(model.feedback_fc0.shape) == (3, 5)


def test_training_is_deterministic():
    cfg = TrainConfig(method="dfa", hidden=[16], epochs=2, device="cpu")
    a, b = train(cfg).model.state_dict(), train(cfg).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dfa_learns_digits(tiny_run):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 3
    assert metrics["final_test_accuracy"] > 0.75
    assert metrics["epochs"][-1]["train_loss"] < metrics["epochs"][0]["batch_loss_mean"]


def test_checkpoint_roundtrip_keeps_feedback(tiny_run):
    run = load_run(tiny_run)
    saved = torch.load(tiny_run / CHECKPOINT, weights_only=True)["state_dict"]
    for name in run.model.feedback_names():
        assert torch.equal(getattr(run.model, name), saved[name])


def test_checkpoint_without_feedback_is_an_error(tiny_run, tmp_path):
    payload = torch.load(tiny_run / CHECKPOINT, weights_only=True)
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if not k.startswith("feedback_")}
    torch.save(payload, tmp_path / CHECKPOINT)
    with pytest.raises(CheckpointError, match="feedback matrices missing"):
        load_run(tmp_path)
    proc = run_edgefa("export", tmp_path, "--out", tmp_path / "bundle")
    assert proc.returncode == 2
    assert "feedback matrices missing" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bundle").exists()


def test_train_cli_on_user_npz(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 10)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)  # learnable: the sign of the first feature
    save_npz(tmp_path / "mine.npz", Dataset(X, y, 2, "mine"))
    proc = cli_in_process("train", "--method", "fa", "--dataset", f"npz:{tmp_path / 'mine.npz'}", "--hidden", "16",
                          "--epochs", "4", "--batch-size", "8", "--lr", "0.05", "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert "final test accuracy" in proc.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["epochs"]] == [1, 2, 3, 4]
    assert metrics["final_test_accuracy"] >= 0.8
    assert load_run(tmp_path / "run").model.config.rule == "fa"
