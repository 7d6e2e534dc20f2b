"""Training a scorer on preference pairs: it learns (BP and DFA), the two-pass DFA gradient equals
the hand-computed one, hybrid picks the trainer's BP steps, hinge against Bradley-Terry, runs
round-trip through save_run / load_run, and JSONL pairs train a transformer scorer from the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
import subprocess

import numpy as np
import pytest
import torch

from conftest import assert_one_error_line
from edgefa.cli import main
from edgefa.shared.datasets import Standardizer
from edgefa.shared.preference_pairs import PAD, VOCAB_SIZE, synthetic_pairs
from edgefa.errors import DataError
from edgefa.models import MLP, CausalTransformer, MLPConfig
from edgefa.training.preference import bradley_terry_loss
from edgefa.training.preference_train import (evaluate_pairs, load_pairs_spec, pair_loss, preference_steps, score,
                                              split_pairs, train_preference)
from edgefa.training.trainer import TrainConfig, load_run, make_optimizer, save_run, train_steps

# noise-free synthetic pairs: 750 to train on, 250 held out; a couple of seconds per run
N_PAIRS, HIDDEN, EPOCHS = 1000, [32, 32], 10


def scorer_config(method: str, loss: str = "bradley-terry", epochs: int = EPOCHS, **kw) -> TrainConfig:
    return TrainConfig(method=method, dataset=f"synthetic:{N_PAIRS}", hidden=HIDDEN, epochs=epochs, lr=0.01,
                       loss=loss, device="cpu", **kw)


@pytest.fixture(scope="module")
def clean_pairs():
    return synthetic_pairs(N_PAIRS, dim=16, sigma=0.0, seed=0)


@pytest.mark.parametrize("method, floor", [("bp", 0.90), ("dfa", 0.75)])
def test_a_scorer_learns_noise_free_pairs(clean_pairs, method, floor):
    run = train_preference(scorer_config(method), clean_pairs)
    m = run.metrics
    assert m["n_train"] == 750 and m["n_test"] == 250 and len(m["epochs"]) == EPOCHS
    assert m["heldout_ceiling"] == 1.0                      # no noise: every label is the true preference
    assert m["final_test_accuracy"] > floor, m["epochs"][-1]
    assert m["epochs"][-1]["train_loss"] < m["epochs"][0]["train_loss"]
    assert {"train_loss", "train_accuracy", "test_loss", "test_accuracy", "test_true_accuracy"} <= set(m["epochs"][0])
    # the standardizer is fitted on the training pairs (both items) and nothing else
    train_idx, _ = split_pairs(N_PAIRS, 0.25, 0)
    fitted = Standardizer.fit(np.concatenate([clean_pairs.chosen[train_idx], clean_pairs.rejected[train_idx]]))
    assert (run.standardizer.mean, run.standardizer.std) == (fitted.mean, fitted.std)
    assert isinstance(run.model, MLP) and run.model.config.n_classes == 1 and run.config.loss == "bradley-terry"


def _hand_dfa_grads(model: MLP, x_w: torch.Tensor, x_l: torch.Tensor) -> dict[str, torch.Tensor]:
    """The DFA update of a Bradley-Terry step written out: per pass, e_p B_l times f'(a_l), summed."""
    act, dact = ((torch.tanh, lambda a: 1 - torch.tanh(a) ** 2) if model.config.activation == "tanh"
                 else (torch.relu, lambda a: (a > 0).to(a.dtype)))
    lins = model.linears()

    def forward(x):
        hs, pre = [x], []
        for lin in lins[:-1]:
            pre.append(hs[-1] @ lin.weight.T + lin.bias)
            hs.append(act(pre[-1]))
        return hs, pre, hs[-1] @ lins[-1].weight.T + lins[-1].bias

    (hs_w, pre_w, s_w), (hs_l, pre_l, s_l) = forward(x_w), forward(x_l)
    n = len(x_w)
    e_w = -torch.sigmoid(-(s_w - s_l)) / n                 # dL/ds_w of mean softplus(-(s_w - s_l)), [n, 1]
    e_l = -e_w
    grads = {}
    for i, (name, b) in enumerate(zip(model.layer_names()[:-1], model.feedback())):
        d_w = (e_w @ b) * dact(pre_w[i])
        d_l = (e_l @ b) * dact(pre_l[i])
        grads[f"hidden_layers.{i}.weight"] = d_w.T @ hs_w[i] + d_l.T @ hs_l[i]
        grads[f"hidden_layers.{i}.bias"] = d_w.sum(0) + d_l.sum(0)
    grads["head.weight"] = e_w.T @ hs_w[-1] + e_l.T @ hs_l[-1]
    grads["head.bias"] = e_w.sum(0) + e_l.sum(0)
    return grads


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_two_pass_dfa_gradient_is_the_hand_computed_update(activation):
    torch.manual_seed(0)
    model = MLP(MLPConfig(5, [7, 4], 1, activation, "dfa", feedback_seed=3)).double()
    gen = torch.Generator().manual_seed(1)
    x_w = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    x_l = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    pair_loss(model, x_w, x_l, "bradley-terry").backward()
    expected = _hand_dfa_grads(model, x_w, x_l)
    assert set(expected) == {k for k, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float64
        torch.testing.assert_close(p.grad, expected[name], atol=1e-6, rtol=0, msg=name)
    # and it is not BP's gradient (so the comparison can tell them apart)
    bp = MLP(MLPConfig(5, [7, 4], 1, activation, "bp")).double()
    bp.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("feedback")})
    pair_loss(bp, x_w, x_l, "bradley-terry").backward()
    assert not torch.allclose(bp.hidden_layers[0].weight.grad, model.hidden_layers[0].weight.grad, atol=1e-6)
    torch.testing.assert_close(bp.head.weight.grad, model.head.weight.grad)      # the head is trained alike


def _bp_flags(model, run_steps) -> list[bool]:
    flags = []
    model.register_forward_pre_hook(lambda m, args: flags.append(m.bp_step))
    run_steps()
    return flags


def test_hybrid_takes_its_bp_steps_where_train_steps_does():
    k, steps = 3, 7
    torch.manual_seed(0)
    clf = MLP(MLPConfig(4, [5], 3, "relu", "hybrid", hybrid_every=k))
    X, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    trainer_flags = _bp_flags(clf, lambda: train_steps(clf, make_optimizer(clf, 0.01, 0.9), X, y, steps, 8, 0))
    scorer = MLP(MLPConfig(4, [5], 1, "relu", "hybrid", hybrid_every=k))
    xw, xl = torch.randn(40, 4), torch.randn(40, 4)
    pair_flags = _bp_flags(scorer, lambda: preference_steps(scorer, make_optimizer(scorer, 0.01, 0.9), xw, xl, steps,
                                                            8, 0, "bradley-terry"))
    assert trainer_flags == [False, False, True, False, False, True, False]
    assert pair_flags == [f for f in trainer_flags for _ in range(2)]       # both passes of a step alike
    assert scorer.bp_step is False


def test_hinge_with_a_big_margin_against_bradley_terry(clean_pairs):
    torch.manual_seed(0)
    model = MLP(MLPConfig(16, [8], 1, "relu", "bp")).double()
    x_w = torch.from_numpy(clean_pairs.chosen[:64]).double()
    x_l = torch.from_numpy(clean_pairs.rejected[:64]).double()
    s_w = model(x_w).squeeze(-1).detach().requires_grad_()
    s_l = model(x_l).squeeze(-1).detach()
    # a margin far above every score gap: every pair is inside it, so the hinge is m - mean gap and
    # pushes every pair equally (1/N), where Bradley-Terry weighs pair i by sigmoid(-(gap_i)) < 1
    from edgefa.training.preference import preference_loss
    big = 1e3
    hinge = preference_loss("hinge", s_w, s_l, big)
    torch.testing.assert_close(hinge, big - (s_w - s_l).mean())
    hinge.backward()
    torch.testing.assert_close(s_w.grad, torch.full_like(s_w, -1 / 64))
    s_w.grad = None
    bradley_terry_loss(s_w, s_l).backward()
    torch.testing.assert_close(s_w.grad, -torch.sigmoid(-(s_w - s_l)).detach() / 64)
    assert (s_w.grad.abs() < 1 / 64).all()
    # both learn the preference: BP with the hinge (m = 1) and with Bradley-Terry
    accs = {loss: train_preference(scorer_config("bp", loss, epochs=5), clean_pairs, margin=1.0).metrics
            for loss in ("hinge", "bradley-terry")}
    for loss, m in accs.items():
        assert m["final_test_accuracy"] > 0.85, (loss, m["epochs"][-1])
        assert m["loss"] == loss and m["margin"] == 1.0
    # hinge with a big margin scores every held-out pair as a loss of about m
    m_big = train_preference(scorer_config("bp", "hinge", epochs=1), clean_pairs, margin=big).metrics
    assert m_big["epochs"][-1]["test_loss"] > big / 2


def test_a_scorer_run_round_trips_through_save_and_load(clean_pairs, tmp_path):
    run = train_preference(scorer_config("dfa", epochs=1), clean_pairs)
    save_run(run, tmp_path / "run")
    back = load_run(tmp_path / "run")
    assert back.config == run.config and back.config.loss == "bradley-terry"
    assert (back.standardizer.mean, back.standardizer.std) == (run.standardizer.mean, run.standardizer.std)
    assert back.metrics["final_test_accuracy"] == run.metrics["final_test_accuracy"]
    x = torch.from_numpy(back.standardizer.apply(clean_pairs.chosen[:50]))
    torch.testing.assert_close(score(back.model, x), score(run.model, x), atol=0, rtol=0)
    for key, value in run.model.state_dict().items():
        assert torch.equal(back.model.state_dict()[key], value), key


def test_pair_specs_and_splits():
    assert len(load_pairs_spec("synthetic:10", sigma=0.5, seed=1)) == 10
    assert load_pairs_spec("synthetic", dim=3).chosen.shape == (2000, 3)
    with pytest.raises(DataError, match="synthetic:N"):
        load_pairs_spec("synthetic:many")
    with pytest.raises(DataError, match="expected synthetic"):
        load_pairs_spec("digits")
    train, test = split_pairs(10, 0.25, 0)
    assert len(test) == 2 and sorted([*train, *test]) == list(range(10))
    assert np.array_equal(split_pairs(10, 0.25, 0)[1], test) and not np.array_equal(split_pairs(10, 0.25, 1)[1], test)
    assert [len(s) for s in split_pairs(2, 0.9, 0)] == [1, 1]       # always one pair on each side


def write_marker_jsonl(path, n: int = 64) -> None:
    """Chosen responses end in ' :)', rejected ones in ' :(' (the score is read at the last token)."""
    rng = np.random.default_rng(0)
    words = ["apple", "river", "stone", "cloud", "lamp", "tiger", "bread", "glass"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            a, b, c = rng.choice(words, 3)
            f.write(json.dumps({"prompt": f"q{i} {a}?", "chosen": f"{b} :)", "rejected": f"{c} :("}) + "\n")


def run_cli(capsys, *args) -> subprocess.CompletedProcess:
    """`edgefa ARGS` through the real entry point, in this process (torch is imported once per
    test session rather than once per command: on a loaded 2-core machine that is most of a minute)."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["edgefa", *map(str, args)], code, out, err)


def test_jsonl_pairs_train_a_transformer_scorer_from_the_cli(tmp_path, capsys):
    data = tmp_path / "prefs.jsonl"
    write_marker_jsonl(data)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3, "rejected": "c"}\n')
    out = tmp_path / "run"
    ok = run_cli(capsys, "train-preference", "--data", f"jsonl:{data}", "--method", "dfa", "--epochs", "2",
                 "--width", "16", "--depth", "1", "--heads", "2", "--max-len", "24", "--batch-size", "8",
                 "--lr", "0.01", "--seed", "1", "--device", "cpu", "--out", out)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "held-out preference accuracy" in ok.stdout and "transformer dfa" in ok.stdout
    assert_one_error_line(run_cli(capsys, "train-preference", "--data", f"jsonl:{bad}", "--out", tmp_path / "never"),
                          "bad.jsonl:2", "'chosen' must be a string")
    assert_one_error_line(run_cli(capsys, "train-preference", "--data", "digits", "--out", tmp_path / "never"),
                          "--data 'digits'", "jsonl:FILE")
    assert_one_error_line(run_cli(capsys, "train-preference", "--data", f"jsonl:{data}", "--model", "mlp",
                                  "--out", tmp_path / "never"), "token pairs need --model transformer")
    assert not (tmp_path / "never").exists()

    run = load_run(out)
    assert isinstance(run.model, CausalTransformer)
    cfg = run.model.config
    assert (cfg.vocab, cfg.pad_id, cfg.in_shape, cfg.n_outputs, cfg.rule) == (VOCAB_SIZE, PAD, [24], 1, "dfa")
    assert run.config.loss == "bradley-terry" and run.config.model == "transformer"
    m = run.metrics
    assert len(m["epochs"]) == 2 and m["n_train"] + m["n_test"] == 64 and m["dataset"] == "prefs.jsonl"
    assert "heldout_ceiling" not in m                       # text pairs have no known utility
    # the loaded scorer scores token ids; its held-out accuracy is what the run recorded
    pairs = load_pairs_spec(f"jsonl:{data}", max_len=24)
    chosen, rejected = torch.from_numpy(pairs.chosen), torch.from_numpy(pairs.rejected)
    test = torch.from_numpy(split_pairs(64, 0.25, 1)[1])
    _, acc, _ = evaluate_pairs(run.model, chosen[test], rejected[test], "bradley-terry")
    assert acc == pytest.approx(m["final_test_accuracy"])
    # it learnt the marker: the same scorer untrained (seed 1) ranks every pair the wrong way round
    untrained = train_preference(replace(run.config, epochs=0), pairs).model
    assert evaluate_pairs(untrained, chosen, rejected, "bradley-terry")[1] == 0.0
    assert m["final_test_accuracy"] == 1.0 and m["epochs"][-1]["train_accuracy"] == 1.0
