"""Sign-symmetric feedback (usf) and hybrid DFA with a true BP step every k steps, on the MLP."""

from __future__ import annotations

import json

import torch
from torch.nn import functional as F

from conftest import assert_one_error_line, cli_in_process, run_edgefa
from edgefa.models import MLP, MLPConfig
from edgefa.training.trainer import make_optimizer, train_steps


def make(rule: str, k: int = 10, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(MLPConfig(12, [16, 8], 4, "tanh", rule, feedback_seed=3, hybrid_every=k))


def data(n: int = 40):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 12, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_usf_sends_the_error_back_through_the_sign_of_the_weights():
    model = make("usf")
    x, y = data(6)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    # by hand: the forward, then each layer's error through sign(W) * mean|W| of the layer above
    w = [lin.weight.detach() for lin in model.linears()]
    b = [lin.bias.detach() for lin in model.linears()]
    h1 = torch.tanh(x @ w[0].T + b[0])
    h2 = torch.tanh(h1 @ w[1].T + b[1])
    e = (torch.softmax(h2 @ w[2].T + b[2], dim=1) - F.one_hot(y, 4)) / len(y)
    d2 = (e @ (torch.sign(w[2]) * w[2].abs().mean())) * (1 - h2 ** 2)
    d1 = (d2 @ (torch.sign(w[1]) * w[1].abs().mean())) * (1 - h1 ** 2)
    for lin, expected in zip(model.linears(), (d1.T @ x, d2.T @ h1, e.T @ h2)):
        torch.testing.assert_close(lin.weight.grad, expected, rtol=1e-5, atol=1e-6)
    assert model.feedback() == []                       # nothing random is stored for usf


def train(rule: str, k: int, steps: int) -> tuple[MLP, list[bool]]:
    model = make(rule, k)
    x, y = data()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(m.bp_step))
    train_steps(model, make_optimizer(model, 0.1, 0.9), x, y, steps, 8, seed=0)
    return model, seen


def weights(model: MLP) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_hybrid_takes_a_true_bp_step_every_kth_step_and_is_dfa_otherwise():
    _, pattern = train("hybrid", 3, 7)
    assert pattern == [False, False, True, False, False, True, False]
    every, _ = train("hybrid", 1, 5)                       # k = 1: every step BP
    bp, _ = train("bp", 1, 5)
    never, _ = train("hybrid", 100, 5)                     # k beyond the run: DFA throughout
    dfa, _ = train("dfa", 1, 5)
    for a, b in zip(weights(every), weights(bp)):
        torch.testing.assert_close(a, b)
    for a, b in zip(weights(never), weights(dfa)):
        torch.testing.assert_close(a, b)
    mixed, _ = train("hybrid", 2, 5)
    assert any(not torch.allclose(a, b) for a, b in zip(weights(mixed), weights(dfa)))
    assert any(not torch.allclose(a, b) for a, b in zip(weights(mixed), weights(bp)))
    assert mixed.bp_step is False                         # never left on after training


def test_the_cli_trains_and_exports_usf_and_hybrid(tmp_path):
    methods = ("usf", "hybrid")
    trained = [cli_in_process("train", "--method", m, "--hybrid-every", "5", "--hidden", "32", "--epochs", "2",
                              "--device", "cpu", "--out", tmp_path / m) for m in methods]
    for proc in trained:
        assert proc.returncode == 0, proc.stderr
    exported = [cli_in_process("export", tmp_path / m, "--out", tmp_path / f"{m}-bundle") for m in methods]
    for method, proc in zip(methods, exported):
        assert proc.returncode == 0, proc.stderr
        metrics = json.loads((tmp_path / method / "metrics.json").read_text())
        assert metrics["method"] == method and metrics["final_test_accuracy"] > 0.5
        manifest = json.loads((tmp_path / f"{method}-bundle" / "manifest.json").read_text())
        assert manifest["feedback"]["source"] == {"usf": "drawn at export (host run used usf)",
                                                  "hybrid": "trained with (host hybrid run)"}[method]


def test_a_bad_hybrid_interval_is_one_line(tmp_path):
    assert_one_error_line(run_edgefa("train", "--method", "hybrid", "--hybrid-every", "0", "--out", tmp_path / "r"),
                          "'--hybrid-every': 0 is not in the range 1<=x<=1000000000")
