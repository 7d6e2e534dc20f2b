"""The explicit host DFA step (training/dfa_step.py) against today's autograd DFA step.

The reference is the step `train_steps` took before: forward through `_DFAOutput`, cross-entropy,
zero_grad, backward, torch.optim.SGD.step(). New weights and momentum buffers agree within 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from edgefa.models import MLP, MLPConfig
from edgefa.models.rules import is_bp_step
from edgefa.shared.batches import batch_indices
from edgefa.training.dfa_step import explicit_dfa_applies, explicit_dfa_step
from edgefa.training.trainer import make_optimizer, train_steps

N_IN, HIDDEN, CLASSES = 20, [32, 24, 16], 5


def make(activation: str, rule: str = "dfa", hybrid_every: int = 10) -> MLP:
    torch.manual_seed(0)
    return MLP(MLPConfig(N_IN, list(HIDDEN), CLASSES, activation, rule, feedback_seed=3, hybrid_every=hybrid_every))


def twins(activation: str, momentum: float, rule: str = "dfa", hybrid_every: int = 10):
    """Two identical models with their own optimizers (lr 0.05)."""
    a, b = make(activation, rule, hybrid_every), make(activation, rule, hybrid_every)
    return (a, make_optimizer(a, 0.05, momentum)), (b, make_optimizer(b, 0.05, momentum))


def data(n: int = 96):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, N_IN, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def autograd_steps(model, opt, X, y, steps, batch_size) -> list[float]:
    """The autograd step, written as train_steps ran it before the explicit step existed."""
    losses = []
    for step in range(steps):
        model.bp_step = is_bp_step(model.config, step)
        idx = torch.from_numpy(batch_indices(len(y), batch_size, 0, step))
        loss = F.cross_entropy(model(X[idx]), y[idx])
        losses.append(loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.bp_step = False
    return losses


def assert_same_state(ours, reference, momentum: float) -> None:
    (m1, o1), (m2, o2) = ours, reference
    for (name, p), q in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=f"weights {name}")
        if momentum:
            torch.testing.assert_close(o1.state[p]["momentum_buffer"], o2.state[q]["momentum_buffer"],
                                       rtol=1e-5, atol=1e-5, msg=f"momentum {name}")
        else:
            assert p not in o1.state and q not in o2.state       # plain SGD keeps no state
    s1, s2 = o1.state_dict(), o2.state_dict()
    assert s1["param_groups"] == s2["param_groups"] and s1["state"].keys() == s2["state"].keys()


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("batch_size", [1, 7, 32])
def test_train_steps_match_the_autograd_dfa_step(activation, momentum, batch_size):
    ours, reference = twins(activation, momentum)
    X, y = data()
    assert explicit_dfa_applies(*ours)
    got = train_steps(*ours, X, y, 6, batch_size, seed=0)
    want = autograd_steps(*reference, X, y, 6, batch_size)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
    assert_same_state(ours, reference, momentum)
    # the weights moved: parity is not two copies of the initial weights
    assert not torch.allclose(ours[0].head.weight, make(activation).head.weight)
    # the explicit path ran: autograd would have left gradients behind
    assert all(p.grad is None for p in ours[0].parameters())


def test_hybrid_mixes_explicit_dfa_steps_with_true_bp_steps():
    ours, reference = twins("tanh", 0.9, rule="hybrid", hybrid_every=3)
    X, y = data()
    train_steps(*ours, X, y, 7, 16, seed=0)
    autograd_steps(*reference, X, y, 7, 16)
    assert_same_state(ours, reference, 0.9)


def test_a_resumed_optimizer_continues_the_same_momentum():
    """Checkpoint and resume: the state_dict round trip keeps the buffers the explicit step uses."""
    ours, reference = twins("relu", 0.9)
    X, y = data()
    train_steps(*ours, X, y, 3, 16, seed=0)
    resumed = make("relu")
    resumed.load_state_dict(ours[0].state_dict())
    opt = make_optimizer(resumed, 0.05, 0.9)
    opt.load_state_dict(ours[1].state_dict())
    train_steps(resumed, opt, X, y, 3, 16, seed=0, first_step=3)
    autograd_steps(*reference, X, y, 6, 16)
    assert_same_state((resumed, opt), reference, 0.9)


def test_a_non_finite_loss_leaves_weights_and_momentum_alone():
    (model, opt), _ = twins("relu", 0.9)
    X, y = data()
    train_steps(model, opt, X, y, 2, 16, seed=0)
    before = [p.clone() for p in model.parameters()]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    X_bad = X.clone()
    X_bad[:] = float("inf")
    losses = train_steps(model, opt, X_bad, y, 3, 16, seed=0, first_step=2)
    assert len(losses) == 1 and not torch.isfinite(torch.tensor(losses[0]))
    for p, w, v in zip(model.parameters(), before, buffers):
        assert torch.equal(p, w) and torch.equal(opt.state[p]["momentum_buffer"], v)


def test_only_plain_sgd_on_a_dfa_mlp_takes_the_explicit_step():
    model = make("relu")
    assert explicit_dfa_applies(model, make_optimizer(model, 0.1, 0.9))
    assert not explicit_dfa_applies(model, make_optimizer(model, 0.1, 0.9), penalty=0.1)
    for options in ({"weight_decay": 1e-4}, {"nesterov": True, "momentum": 0.9}, {"dampening": 0.1},
                    {"maximize": True}):
        assert not explicit_dfa_applies(model, torch.optim.SGD(model.parameters(), lr=0.1, **options)), options
    assert not explicit_dfa_applies(model, torch.optim.Adam(model.parameters()))
    assert not explicit_dfa_applies(model, torch.optim.SGD(list(model.parameters())[:-1], lr=0.1))
    bp = make("relu", rule="bp")
    assert not explicit_dfa_applies(bp, make_optimizer(bp, 0.1, 0.9))


def test_an_unsupported_optimizer_still_trains_through_autograd():
    model = make("relu")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    ref_model = make("relu")
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    X, y = data()
    train_steps(model, opt, X, y, 3, 16, seed=0)
    autograd_steps(ref_model, ref_opt, X, y, 3, 16)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    assert all(p.grad is not None for p in model.parameters())


def test_forward_hooks_see_every_explicit_step():
    (model, opt), _ = twins("relu", 0.0)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    X, y = data()
    explicit_dfa_step(model, opt, X[:9], y[:9])
    assert seen == [9]
