"""The fixed-point DFA step against the float32 runtime step (train_step.onnx in onnxruntime).

With 32-bit data formats and a 64-bit accumulator the only differences left are quantization
(weights hold 24 fraction bits: 6e-8) and float32's own rounding, so the two steps agree within
1e-6 on every new weight and momentum value, while the updates themselves are a thousand times
larger. With 16-bit parameters and few fraction bits, round-to-nearest loses small updates and
stochastic rounding keeps them (Gupta et al. 2015)."""

from __future__ import annotations

import numpy as np
import pytest

from edgefa.bundle import momentum_name, read_bundle
from edgefa.exporters.export import export_bundle
from edgefa.fpga_sim.config import FxpConfig, config_from_dict
from edgefa.fpga_sim.datapath import FixedPointDFA
from edgefa.fpga_sim.fixed import FixedFormat, parse_format
from edgefa.runtime.engine import OrtEngine
from test_parity import LR, make_run

WIDE = config_from_dict({
    "formats": {
        "weights": "ap_fixed<32,8,AP_RND_CONV,AP_SAT>",
        "activations": "ap_fixed<32,10,AP_RND_CONV,AP_SAT>",
        "errors": "ap_fixed<32,2,AP_RND_CONV,AP_SAT>",
        "feedback": "ap_fixed<32,4,AP_RND_CONV,AP_SAT>",
        "gradients": "ap_fixed<32,6,AP_RND_CONV,AP_SAT>",
        "optimizer_state": "ap_fixed<32,6,AP_RND_CONV,AP_SAT>",
        "accumulators": "ap_fixed<64,16,AP_RND_CONV,AP_SAT>",
    },
    "learning_rate": {"mode": "multiplier", "format": "ap_ufixed<24,0,AP_RND_CONV,AP_SAT>"},
    "tables": {"method": "pwl", "size": 16384, "input_range": 8.0, "exp_table_size": 1024,
               "softmax_frac_bits": 28},
})
PARITY_TOL = 1e-6


def batches(n_features: int, classes: int, sizes=(8, 5, 16, 8)):
    rng = np.random.default_rng(3)
    for size in sizes:
        yield rng.normal(size=(size, n_features)).astype(np.float32), rng.integers(0, classes, size)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_wide_fixed_point_step_matches_the_float32_runtime_step(tmp_path, activation, momentum):
    run = make_run([20, 48, 24, 5], activation, momentum)
    bundle = read_bundle(export_bundle(run, tmp_path / "b"))
    engine = OrtEngine(bundle, threads=1)
    fixed = FixedPointDFA(bundle, WIDE, lr=LR)
    start = {n: a.copy() for n, a in bundle.weights.items()}
    for x, y in batches(20, 5):
        engine.step(x, y, LR)
        fixed.step(x, y)
    device, mine = engine.state(), fixed.weights_float()
    for name, w0 in start.items():
        moved = np.abs(device[name] - w0).max()
        assert moved > 1e-3, f"{name} hardly moved ({moved}): the comparison would prove nothing"
        assert np.abs(mine[name] - device[name]).max() <= PARITY_TOL, name
        if momentum:
            v = fixed.velocity_float()[name]
            assert np.abs(v - device[momentum_name(name)]).max() <= PARITY_TOL, name
    c = fixed.counters
    assert sum(c.overflowed.values()) == 0
    assert c.updates > 0 and c.updates_rounded_to_zero < 0.01 * c.updates


def test_narrow_formats_differ_from_float_and_count_what_they_lose(tmp_path):
    run = make_run([20, 48, 24, 5], "relu", 0.9)
    bundle = read_bundle(export_bundle(run, tmp_path / "b"))
    coarse = FixedFormat(8, 2, rounding="AP_RND_CONV", overflow="AP_SAT")   # LSB 1/64
    fixed = FixedPointDFA(bundle, FxpConfig().with_formats(weights=coarse, optimizer_state=coarse), lr=LR)
    engine = OrtEngine(bundle, threads=1)
    for x, y in batches(20, 5):
        engine.step(x, y, LR)
        fixed.step(x, y)
    diff = max(np.abs(fixed.weights_float()[n] - engine.state()[n]).max() for n in bundle.weights)
    assert diff > 1e-3                                    # 8-bit weights cannot follow float32
    c = fixed.counters
    assert c.updates_rounded_to_zero > 0.5 * c.updates    # most updates are under half an LSB


def test_stochastic_rounding_keeps_learning_where_round_to_nearest_stalls(tiny_bundle):
    """The Gupta et al. effect on a real bundle fine-tuned to a shifted sensor (as in the demo):
    6-bit parameters with 4 fraction bits, lr 0.01."""
    from edgefa.shared.datasets import load_digits
    from edgefa.shared.shift import SensorShift
    from edgefa.fpga_sim.simulate import SimulateConfig, simulate

    data = SensorShift(dx=1, gain=0.7, noise_std=1.5, clip=(0.0, 16.0)).apply(load_digits(), seed=1)
    bundle = read_bundle(tiny_bundle)
    results = {}
    for mode in ("AP_RND_CONV", "STOCHASTIC"):
        fmt = FixedFormat(6, 2, rounding=mode, overflow="AP_SAT")
        config = FxpConfig().with_formats(weights=fmt, optimizer_state=fmt)
        results[mode] = simulate(bundle, data, SimulateConfig(steps=40, lr=0.01, float_reference=False), config)
    gain = {m: r["accuracy_after"]["fixed"] - r["accuracy_before"]["fixed"] for m, r in results.items()}
    zeroed = {m: r["updates_rounded_to_zero"] / r["updates"] for m, r in results.items()}
    assert zeroed["AP_RND_CONV"] > 0.99 and abs(gain["AP_RND_CONV"]) < 0.02    # stalled
    assert zeroed["STOCHASTIC"] < zeroed["AP_RND_CONV"]
    assert gain["STOCHASTIC"] > 0.2, gain                                       # still learning


def test_stochastic_rounding_is_seeded(tiny_bundle, digits_npz):
    from edgefa.shared.datasets import load_npz

    data = load_npz(digits_npz)
    bundle = read_bundle(tiny_bundle)
    fmt = parse_format("ap_fixed<8,2,STOCHASTIC,AP_SAT>")
    weights = []
    for seed in (0, 0, 1):
        fixed = FixedPointDFA(bundle, FxpConfig(seed=seed).with_formats(weights=fmt), lr=0.05)
        X = ((data.X[:32] - 8.0) / 6.0).astype(np.float32)
        fixed.step(X, data.y[:32])
        weights.append(fixed.params["fc0.weight"].copy())
    assert np.array_equal(weights[0], weights[1]) and not np.array_equal(weights[0], weights[2])


def test_a_power_of_two_learning_rate_as_a_shift_equals_it_as_a_multiplier(tmp_path):
    """lr = 2**-5: the shift datapath (no multiplier) and the multiplier datapath round the same
    exact update, so they agree bit for bit; a shift of None takes the nearest power of two."""
    run = make_run([20, 48, 24, 5], "relu", 0.9)
    bundle = read_bundle(export_bundle(run, tmp_path / "b"))
    shift = FixedPointDFA(bundle, FxpConfig(lr_mode="shift"), lr=2.0 ** -5)
    multiplier = FixedPointDFA(bundle, FxpConfig(lr_mode="multiplier"), lr=2.0 ** -5)
    assert (shift.lr_shift, shift.effective_lr, multiplier.effective_lr) == (5, 2.0 ** -5, 2.0 ** -5)
    for x, y in batches(20, 5):
        shift.step(x, y)
        multiplier.step(x, y)
    assert all(np.array_equal(shift.params[n], multiplier.params[n]) for n in shift.params)
    assert FixedPointDFA(bundle, FxpConfig(lr_mode="shift"), lr=0.003).effective_lr == 2.0 ** -8
    assert FixedPointDFA(bundle, FxpConfig(lr_mode="shift", lr_shift=3), lr=0.003).effective_lr == 2.0 ** -3
