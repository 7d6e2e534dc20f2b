"""Preference losses against their definitions, synthetic pairs against their noise model, and
JSONL preference files through the byte-level tokenizer (files the tests write)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from edgefa.shared.preference_pairs import (PAD, SEP, encode_pair_text, hidden_utility, load_preference_jsonl,
                                    synthetic_pairs)
from edgefa.errors import DataError
from edgefa.training.preference import (bradley_terry_loss, hinge_loss, preference_accuracy,
                                        preference_loss)


def test_bradley_terry_is_minus_log_sigmoid_and_finite_for_any_margin():
    s_w = torch.tensor([2.0, -1.0, 0.0, 80.0, -80.0], dtype=torch.float64)
    s_l = torch.tensor([0.5, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    by_hand = [-math.log(1 / (1 + math.exp(-d))) for d in (1.5, -2.0, 0.0)] + [0.0, 80.0]
    torch.testing.assert_close(bradley_terry_loss(s_w, s_l), torch.tensor(by_hand, dtype=torch.float64).mean(),
                               atol=1e-12, rtol=1e-12)
    big = torch.tensor([-1000.0], requires_grad=True)
    loss = bradley_terry_loss(big, torch.zeros(1))        # -log sigmoid(-1000) = 1000, not inf
    loss.backward()
    assert loss.item() == pytest.approx(1000.0) and big.grad.item() == pytest.approx(-1.0)


def test_hinge_is_zero_past_the_margin_and_linear_before_it():
    s_w, s_l = torch.tensor([3.0, 1.0, 0.0]), torch.tensor([1.0, 0.5, 1.0])
    assert hinge_loss(s_w, s_l, margin=1.0).item() == pytest.approx((0 + 0.5 + 2.0) / 3)
    assert preference_loss("hinge", s_w, s_l, 0.25).item() == pytest.approx((0 + 0 + 1.25) / 3)
    assert preference_accuracy(s_w, s_l) == pytest.approx(2 / 3)
    assert preference_accuracy(torch.zeros(2), torch.zeros(2)) == 0.0          # a tie is not a win
    with pytest.raises(ValueError, match="unknown preference loss 'dpo'"):
        preference_loss("dpo", s_w, s_l)


def test_synthetic_labels_follow_the_noise_model():
    clean = synthetic_pairs(4000, sigma=0.0, seed=1)
    assert (clean.true_margin > 0).all()                  # no noise: the chosen one is truly better
    u = hidden_utility(16, 1234)
    np.testing.assert_allclose(u(clean.chosen) - u(clean.rejected), clean.true_margin, rtol=1e-5, atol=1e-6)
    # with noise, a pair is flipped with probability Phi(-|d| / sigma): compare the count
    sigma = 0.3
    noisy = synthetic_pairs(20000, sigma=sigma, seed=2)
    flipped = (noisy.true_margin < 0).mean()
    d = np.abs(noisy.true_margin)
    expected = np.mean(0.5 * (1 + np.vectorize(math.erf)(-d / (sigma * math.sqrt(2)))))
    assert abs(flipped - expected) < 4 * math.sqrt(expected * (1 - expected) / len(d))
    assert 0.05 < flipped < 0.45
    assert np.array_equal(synthetic_pairs(10, sigma=0.5, seed=3).chosen, synthetic_pairs(10, sigma=0.5, seed=3).chosen)
    with pytest.raises(DataError, match="sigma"):
        synthetic_pairs(10, sigma=-1.0)


def test_jsonl_pairs_become_byte_tokens(tmp_path):
    path = tmp_path / "prefs.jsonl"
    rows = [{"prompt": "2+2=", "chosen": "4", "rejected": "5"},
            {"prompt": "café?", "chosen": "oui", "rejected": "non merci"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    pairs = load_preference_jsonl(path, max_len=12)
    assert pairs.chosen.shape == pairs.rejected.shape == (2, 12) and pairs.chosen.dtype == np.int64
    assert list(pairs.chosen[0][:6]) == [ord("2"), ord("+"), ord("2"), ord("="), SEP, ord("4")]
    assert all(t == PAD for t in pairs.chosen[0][6:])
    assert bytes(pairs.chosen[1][:5].tolist()) == "café".encode("utf-8")        # é is two bytes
    # too long: cut from the left, so the end of the response (where pairs differ) is kept
    cut = encode_pair_text("abcdef", "xyz", 5)
    assert list(cut) == [ord("f"), SEP, ord("x"), ord("y"), ord("z")]


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "a", "chosen": "b"}\n', "prefs.jsonl:1: 'rejected' must be a string, got NoneType"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\nnot json\n', "prefs.jsonl:2: not JSON"),
    ('["a", "b", "c"]\n', "prefs.jsonl:1: expected an object"),
    ('\n\n', "prefs.jsonl: no preference pairs"),
])
def test_a_bad_jsonl_line_is_named(tmp_path, text, message):
    path = tmp_path / "prefs.jsonl"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        load_preference_jsonl(path)
    assert message in str(info.value)
