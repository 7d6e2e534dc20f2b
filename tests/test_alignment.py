"""Alignment metrics (edgefa/training/alignment.py) against answers known in advance."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn import functional as F

from edgefa.training.alignment import bp_twin, cosine, measure_alignment, tensor_cosine
from edgefa.models import MLP, NETS, MLPConfig, NetConfig
from edgefa.training.trainer import TrainConfig, train

KINDS = ("mlp", "resmlp", "cnn", "vit", "transformer")
TOL = 1e-12


def tiny(kind: str, rule: str, **extra) -> torch.nn.Module:
    """A tiny model of each kind on 16 features, 3 classes (images 1 x 4 x 4)."""
    torch.manual_seed(0)
    if kind == "mlp":
        return MLP(MLPConfig(16, [12, 8], 3, rule=rule, **extra))
    shape = {"resmlp": [16], "cnn": [1, 4, 4], "vit": [1, 4, 4], "transformer": [16]}[kind]
    return NETS[kind](NetConfig(kind, shape, 3, rule=rule, width=8, depth=2, heads=2, patch=2, **extra))


def batch(n: int = 24, features: int = 16, classes: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def all_cosines(result: dict):
    for name, layer in result["layers"].items():
        yield f"layer {name}", layer["weight_grad_cosine"]
    for name, stage in result["stages"].items():
        yield f"stage {name}", stage["signal_cosine"]


# --------------------------------------------------------------------------------------------
# The cosine helper
# --------------------------------------------------------------------------------------------

def test_cosine_norms_per_row_not_over_the_whole_tensor():
    # rows of very different size: per-row cosines are 1 and 1/sqrt(2); normalizing each row's dot
    # product by the norms of the whole tensors would give 1/101-ish and 100/101-ish instead
    a = torch.tensor([[1.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 0.0], [10.0, 10.0]], dtype=torch.float64)
    rows = cosine(a, b, dim=1)
    assert rows.shape == (2,)
    assert rows[0].item() == pytest.approx(1.0, abs=TOL)
    assert rows[1].item() == pytest.approx(1 / math.sqrt(2), abs=TOL)
    whole = (a * b).sum(dim=1) / (a.norm() * b.norm())
    assert not torch.allclose(rows, whole)
    # dim is honoured: columns are different pairs
    cols = cosine(a, b, dim=0)
    assert cols[0].item() == pytest.approx(1 / math.sqrt(101), abs=TOL)
    assert cols[1].item() == pytest.approx(1.0, abs=TOL)


def test_cosine_has_no_eps_clamp_and_zero_norm_is_undefined():
    # norms of 1e-10, below F.cosine_similarity's eps of 1e-8: its clamp gets this cosine wrong
    a = torch.tensor([[1e-10, 0.0]], dtype=torch.float64)
    b = torch.tensor([[1e-10, 1e-10]], dtype=torch.float64)
    assert cosine(a, b, dim=1).item() == pytest.approx(1 / math.sqrt(2), abs=TOL)
    assert abs(F.cosine_similarity(a, b, dim=1).item() - 1 / math.sqrt(2)) > 1e-3   # the clamp, for the record
    zero = torch.zeros(1, 2, dtype=torch.float64)
    assert math.isnan(cosine(zero, b, dim=1).item())
    assert tensor_cosine(zero, b) is None and tensor_cosine(a, zero) is None
    assert tensor_cosine(a, b) == pytest.approx(1 / math.sqrt(2), abs=TOL)


# --------------------------------------------------------------------------------------------
# Known answers
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_bp_rule_aligns_perfectly(kind):
    X, y = batch()
    result = measure_alignment(tiny(kind, "bp"), X, y)
    values = dict(all_cosines(result))
    assert values and len(result["stages"]) >= 2
    for where, value in values.items():
        assert value is not None and abs(value - 1.0) < TOL, (where, value)
    json.dumps(result, allow_nan=False)


@pytest.mark.parametrize("kind", KINDS)
def test_fa_with_feedback_equal_to_weights_is_bp(kind):
    model = tiny(kind, "fa")
    with torch.no_grad():
        if kind == "mlp":
            for lin, fb in zip(model.linears(), model.feedback()):
                fb.copy_(lin.weight)
        else:
            for module in model.modules():
                if isinstance(getattr(module, "feedback", None), torch.Tensor):
                    module.feedback.copy_(module.weight)
    X, y = batch()
    result = measure_alignment(model, X, y)
    fa_layers = [e for e in result["layers"].values() if "alignment_error" in e]
    assert fa_layers
    for entry in fa_layers:
        assert entry["alignment_error"] == 0.0
        assert entry["weight_feedback_cosine"] == pytest.approx(1.0, abs=TOL)
    for where, value in all_cosines(result):
        assert value is not None and abs(value - 1.0) < TOL, (where, value)


@pytest.mark.parametrize("kind", ("mlp", "resmlp", "cnn"))
def test_fa_records_alignment_error_and_convention(kind):
    model = tiny(kind, "fa")
    result = measure_alignment(model, *batch())
    errors = {n: e["alignment_error"] for n, e in result["layers"].items() if "alignment_error" in e}
    assert "head" in errors and all(v > 0 for v in errors.values())
    head = model.head.weight.detach().double()
    fb = (model.feedback_head if kind == "mlp" else model.head.feedback).double()
    assert errors["head"] == pytest.approx(torch.linalg.vector_norm(head - fb).item(), rel=1e-12)
    assert "W^T" in result["feedback_convention"]
    # the first layer's input is the data: its B never carries a gradient, and the result says so
    first = {"mlp": "hidden_layers.0", "resmlp": "embed", "cnn": "convs.0.0"}[kind]
    used = {n: e["feedback_used"] for n, e in result["layers"].items() if "feedback_used" in e}
    assert used.pop(first) is False and used and all(used.values())


def test_usf_layers_point_along_the_gradient():
    result = measure_alignment(tiny("mlp", "usf"), *batch())
    for name in ("hidden_layers.0", "hidden_layers.1"):
        assert result["layers"][name]["weight_grad_cosine"] > 0
        assert result["layers"][name]["feedback"].startswith("usf")


def test_zero_gradient_is_degenerate_not_a_number():
    model = tiny("mlp", "bp")
    with torch.no_grad():
        model.head.weight.zero_()              # no error reaches the hidden layers: their gradients are 0
    X, y = batch()
    result = measure_alignment(model, X, y)
    for name in ("hidden_layers.0", "hidden_layers.1"):
        assert result["layers"][name]["weight_grad_cosine"] is None
        stage = result["stages"][name]
        assert stage["signal_cosine"] is None
        assert stage["excluded_samples"] == len(y) and stage["signal_samples"] == 0
    assert result["layers"]["head"]["weight_grad_cosine"] == pytest.approx(1.0, abs=TOL)
    text = json.dumps(result, allow_nan=False)
    assert '"weight_grad_cosine": null' in text


def test_dfa_against_a_hand_written_mlp():
    """DFA's weight gradient (e B_l * act') x h_{l-1} and its signal e B_l, written out by hand."""
    model = tiny("mlp", "dfa")
    X, y = batch(n=40)
    result = measure_alignment(model, X, y)

    W = [lin.weight.detach().double() for lin in model.linears()]
    b = [lin.bias.detach().double() for lin in model.linears()]
    B = [fb.double() for fb in model.feedback()]
    x = X.double()
    z1 = x @ W[0].T + b[0]
    h1 = z1.relu().requires_grad_()
    z2 = h1 @ W[1].T + b[1]
    h2 = z2.relu().requires_grad_()
    logits = (h2 @ W[2].T + b[2]).requires_grad_()
    loss = F.cross_entropy(logits, y)
    e, g1, g2 = torch.autograd.grad(loss, [logits, h1, h2], retain_graph=True)
    # true weight gradients, by hand: delta_l = dL/dz_l
    d2 = g2 * (z2 > 0)
    d1 = g1 * (z1 > 0)
    true = {"hidden_layers.0": d1.T @ x, "hidden_layers.1": d2.T @ h1.detach()}
    s1, s2 = e @ B[0], e @ B[1]
    dfa = {"hidden_layers.0": (s1 * (z1 > 0)).T @ x, "hidden_layers.1": (s2 * (z2 > 0)).T @ h1.detach()}
    for name in true:
        expected = (dfa[name] * true[name]).sum() / (dfa[name].norm() * true[name].norm())
        assert result["layers"][name]["weight_grad_cosine"] == pytest.approx(expected.item(), abs=1e-12)
    for name, s, g in (("hidden_layers.0", s1, g1), ("hidden_layers.1", s2, g2)):
        per = (s * g).sum(1) / (s.norm(dim=1) * g.norm(dim=1))
        keep = (s.norm(dim=1) != 0) & (g.norm(dim=1) != 0)
        stage = result["stages"][name]
        assert stage["signal_cosine"] == pytest.approx(per[keep].mean().item(), abs=1e-12)
        assert stage["excluded_samples"] == int((~keep).sum())
        assert stage["grad_norm_mean"] == pytest.approx((len(y) * g.norm(dim=1)).mean().item(), rel=1e-12)
    assert result["stages"]["hidden_layers.0"]["h_norm_mean"] == pytest.approx(h1.norm(dim=1).mean().item(), rel=1e-12)
    assert result["layers"]["head"]["weight_grad_cosine"] == pytest.approx(1.0, abs=TOL)


def test_hybrid_measures_its_dfa_step():
    hybrid, dfa = tiny("mlp", "hybrid", hybrid_every=1), tiny("mlp", "dfa")
    dfa.load_state_dict(hybrid.state_dict())
    hybrid.bp_step = True                       # as the trainer may leave it: the DFA step is measured anyway
    X, y = batch()
    a, b = measure_alignment(hybrid, X, y), measure_alignment(dfa, X, y)
    assert a["measured_step"] == "dfa" and a["rule"] == "hybrid"
    assert a["layers"] == b["layers"] and a["stages"] == b["stages"]
    assert hybrid.bp_step is True


def test_stages_and_integer_tokens():
    torch.manual_seed(0)
    model = NETS["transformer"](NetConfig("transformer", [6], 2, rule="dfa", width=8, depth=1, heads=2,
                                          vocab=5, pad_id=0))
    X = torch.randint(1, 5, (10, 6))
    y = torch.randint(0, 2, (10,))
    result = measure_alignment(model, X, y)
    assert list(result["stages"]) == model.stage_names()
    assert "embed.tokens" in result["layers"] and result["layers"]["embed.tokens"]["kind"] == "Embedding"


def test_frozen_blocks_are_listed_and_get_no_signal():
    model = tiny("resmlp", "dfa", freeze_blocks=True)
    result = measure_alignment(model, *batch())
    assert "blocks.0.fc1" in result["frozen_layers"] and "blocks.0.fc1" not in result["layers"]
    assert "head" in result["layers"] and "embed" in result["layers"]
    assert result["stages"]["block0"]["signal_cosine"] is None
    assert result["stages"]["block0"]["grad_norm_mean"] > 0
    assert result["stages"]["embed"]["signal_cosine"] is not None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rule", ("fa", "dfa", "usf", "hybrid"))
def test_every_model_and_rule(kind, rule):
    model = tiny(kind, rule)
    result = measure_alignment(model, *batch(), penalty=0.1 if kind in ("resmlp", "vit", "transformer") else 0.0)
    assert result["schema"] == "edgefa.alignment/1" and result["dtype"] == "float64"
    assert set(result["aggregation"]) >= {"weight_grad_cosine", "signal_cosine"}
    assert "head" in result["layers"]
    expected_stages = model.stage_names() if kind != "mlp" else ["hidden_layers.0", "hidden_layers.1"]
    assert list(result["stages"]) == expected_stages
    for where, value in all_cosines(result):
        assert value is None or -1 - TOL <= value <= 1 + TOL, (where, value)
    assert any(e.get("alignment_error") is not None for e in result["layers"].values()) == (rule in ("fa", "usf"))
    json.dumps(result, allow_nan=False)


# --------------------------------------------------------------------------------------------
# Leaving the model alone
# --------------------------------------------------------------------------------------------

def test_measurement_leaves_model_and_rng_untouched():
    model = tiny("resmlp", "fa")
    X, y = batch()
    F.cross_entropy(model(X), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    rng = torch.get_rng_state()
    with torch.no_grad():                         # works inside no_grad too
        measure_alignment(model, X, y)
    assert torch.equal(rng, torch.get_rng_state())
    assert not model.training
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    fresh = tiny("mlp", "dfa")
    measure_alignment(fresh, X, y)
    assert all(p.grad is None for p in fresh.parameters())


def test_bp_twin_has_the_same_weights_and_no_feedback():
    model = tiny("resmlp", "fa", freeze_blocks=True)
    rng = torch.get_rng_state()
    twin = bp_twin(model)
    assert torch.equal(rng, torch.get_rng_state())
    assert twin.config.rule == "bp" and not twin.feedback_names()
    ours = model.state_dict()
    theirs = twin.state_dict()
    assert set(theirs) == set(ours) - set(model.feedback_names())
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert [p.requires_grad for p in twin.parameters()] == [p.requires_grad for p in model.parameters()]


@pytest.mark.parametrize("overrides", [
    {"method": "hybrid", "hybrid_every": 3, "hidden": [16]},
    {"method": "fa", "model": "resmlp", "width": 16, "depth": 1, "penalty": 0.01},
])
def test_training_with_alignment_is_bit_identical(overrides):
    base = dict(epochs=2, lr=0.01, device="cpu", **overrides)
    on = train(TrainConfig(alignment=True, **base))
    off = train(TrainConfig(alignment=False, **base))
    a, b = on.model.state_dict(), off.model.state_dict()
    bits = lambda t: t.contiguous().view(torch.uint8) if t.is_floating_point() else t     # noqa: E731 (NaN-safe)
    assert set(a) == set(b) and all(torch.equal(bits(a[k]), bits(b[k])) for k in a)
    for row_on, row_off in zip(on.metrics["epochs"], off.metrics["epochs"]):
        assert "alignment" not in row_off
        found = row_on.pop("alignment")
        assert row_on == row_off
        assert found["probe_samples"] == 256 and found["layers"]
    json.dumps(on.metrics, allow_nan=False)
