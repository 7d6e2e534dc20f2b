"""matmul_requantize's fast route (float64 BLAS into scratch, rounded in place) against the integer
route (matmul into the accumulator, then requantize), bit for bit.

The two routes share no arithmetic: the integer one sums int64 products and shifts integers, the
fast one sums floats and rounds floats. Seeded random formats (widths, fraction bits, every
deterministic rounding mode, every overflow mode for the accumulator and the output), shapes,
data and biases; the test also counts how many cases took the fast route (by its documented
condition, computed here), so it cannot pass by never reaching it.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edgefa.fpga_sim.fixed import FixedFormat, Overflow, Rounding, requantize, round_scaled
from edgefa.fpga_sim.ops import SCRATCH_MAX_ELEMENTS, matmul, matmul_requantize

DETERMINISTIC = [r for r in Rounding if r is not Rounding.STOCHASTIC]


def two_step(a, a_fmt, b, b_fmt, acc, out, init=None):
    q = matmul(a, a_fmt, b, b_fmt, acc, init=init)
    return requantize(q.raw, acc.frac_bits, out), q.overflows


def takes_fast_route(a, a_fmt, b, b_fmt, acc, out, init) -> bool:
    """matmul_requantize's condition for the float64 route, written out here."""
    shift = a_fmt.frac_bits + b_fmt.frac_bits - acc.frac_bits
    start = np.zeros(b.shape[1], np.int64) if init is None else np.asarray(init, np.int64)
    bound = float(a.shape[1]) * np.abs(a).max() * np.abs(b).max() * 2.0 ** -shift + np.abs(start).max()
    return (shift <= 0 and out.width <= 52 and bound <= acc.raw_max and -bound >= acc.raw_min
            and bound < 2.0 ** 53)


def pick(rng, options):
    return options[int(rng.integers(len(options)))]


def random_case(rng: np.random.Generator):
    a_fmt = FixedFormat(int(rng.integers(2, 20)), int(rng.integers(-4, 12)))
    b_fmt = FixedFormat(int(rng.integers(2, 20)), int(rng.integers(-4, 12)))
    m, k, n = (int(v) for v in rng.integers(1, 24, 3))
    acc_frac = a_fmt.frac_bits + b_fmt.frac_bits + int(rng.integers(0, 4))        # shift <= 0
    acc_width = int(rng.integers(max(4, a_fmt.width + b_fmt.width - 8), 60))
    acc = FixedFormat(acc_width, acc_width - acc_frac, overflow=pick(rng, list(Overflow)))
    out_width = int(rng.integers(2, 53))
    out_frac = acc_frac + int(rng.integers(-acc_width, 6))                        # mostly narrower
    out = FixedFormat(out_width, out_width - out_frac, rounding=pick(rng, DETERMINISTIC),
                      overflow=pick(rng, list(Overflow)))
    # raw values over the full format, or a narrower range (fewer saturations, more fast routes)
    a_hi = a_fmt.raw_max >> int(rng.integers(0, a_fmt.width))
    b_hi = b_fmt.raw_max >> int(rng.integers(0, b_fmt.width))
    a = rng.integers(-a_hi - 1, a_hi + 1, (m, k), dtype=np.int64)
    b = rng.integers(-b_hi - 1, b_hi + 1, (k, n), dtype=np.int64)
    init = None
    if rng.random() < 0.3:
        init = rng.integers(-(1 << min(20, acc.width - 2)), 1 << min(20, acc.width - 2), n, dtype=np.int64)
    return a, a_fmt, b, b_fmt, acc, out, init


def test_fast_route_equals_integer_route_on_random_formats_and_modes():
    rng = np.random.default_rng(20)
    fast_cases, modes_seen = 0, set()
    for case in range(600):
        a, a_fmt, b, b_fmt, acc, out, init = random_case(rng)
        got, got_over = matmul_requantize(a, a_fmt, b, b_fmt, acc, out, init=init)
        want, want_over = two_step(a, a_fmt, b, b_fmt, acc, out, init)
        assert np.array_equal(got.raw, want.raw), (case, a_fmt, b_fmt, acc, out)
        assert got.overflows == want.overflows and got_over == want_over, (case, acc, out)
        if takes_fast_route(a, a_fmt, b, b_fmt, acc, out, init):
            fast_cases += 1
            modes_seen.add((out.rounding, out.overflow, want.overflows > 0))
    assert fast_cases >= 200, fast_cases
    # every rounding mode with every overflow mode, with and without saturated outputs
    assert len(modes_seen) >= 0.8 * len(DETERMINISTIC) * len(Overflow) * 2, sorted(modes_seen)


@pytest.mark.parametrize("rounding", DETERMINISTIC, ids=lambda m: m.value)
@pytest.mark.parametrize("overflow", list(Overflow), ids=lambda m: m.value)
def test_fast_route_q8_8_benchmark_shape(rounding, overflow):
    """The benchmark's case (Q8.8 x Q8.8 into ap_fixed<40,24>, out Q8.8), at 64x64x64, with ties
    and saturation in every mode."""
    rng = np.random.default_rng(5)
    data, acc = FixedFormat(16, 8), FixedFormat(40, 24)
    out = FixedFormat(16, 8, rounding=rounding, overflow=overflow)
    a = rng.integers(-1024, 1024, (64, 64), dtype=np.int64)
    b = rng.integers(-1024, 1024, (64, 64), dtype=np.int64)
    got, _ = matmul_requantize(a, data, b, data, acc, out)
    want, _ = two_step(a, data, b, data, acc, out)
    assert want.overflows > 0 and np.array_equal(got.raw, want.raw) and got.overflows == want.overflows


def test_results_do_not_share_the_scratch():
    """A result stays as it was when later calls of other shapes reuse (and grow) the scratch."""
    rng = np.random.default_rng(1)
    data, acc, out = FixedFormat(16, 8), FixedFormat(40, 24), FixedFormat(16, 8, overflow=Overflow.SAT)
    results = []
    for m, k, n in [(8, 8, 8), (30, 5, 17), (3, 40, 2), (64, 64, 64), (8, 8, 8)]:
        a = rng.integers(-512, 512, (m, k), dtype=np.int64)
        b = rng.integers(-512, 512, (k, n), dtype=np.int64)
        results.append((matmul_requantize(a, data, b, data, acc, out)[0].raw,
                        two_step(a, data, b, data, acc, out)[0].raw.copy()))
    for got, want in results:
        assert np.array_equal(got, want)


def test_threads_get_their_own_scratch():
    rng = np.random.default_rng(2)
    data, acc, out = FixedFormat(16, 8), FixedFormat(40, 24), FixedFormat(16, 8, overflow=Overflow.SAT)
    cases = [(rng.integers(-512, 512, (40, 40), dtype=np.int64), rng.integers(-512, 512, (40, 40), dtype=np.int64))
             for _ in range(4)]
    want = [two_step(a, data, b, data, acc, out)[0].raw for a, b in cases]
    got = [None] * len(cases)

    def work(i):
        for _ in range(30):
            got[i] = matmul_requantize(cases[i][0], data, cases[i][1], data, acc, out)[0].raw

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(g, w) for g, w in zip(got, want))


def test_fast_route_beyond_the_scratch_cap():
    """A call larger than SCRATCH_MAX_ELEMENTS allocates its own arrays: same bits."""
    rng = np.random.default_rng(3)
    k = 1024
    m = SCRATCH_MAX_ELEMENTS // k + 1                  # m * k alone is over the cap
    data, acc, out = FixedFormat(16, 8), FixedFormat(40, 24), FixedFormat(16, 8, rounding=Rounding.RND_CONV)
    a = rng.integers(-64, 64, (m, k), dtype=np.int64)
    b = rng.integers(-64, 64, (k, 1), dtype=np.int64)
    got, _ = matmul_requantize(a, data, b, data, acc, out)
    assert np.array_equal(got.raw, two_step(a, data, b, data, acc, out)[0].raw)


@pytest.mark.parametrize("rounding", DETERMINISTIC, ids=lambda m: m.value)
@pytest.mark.parametrize("overflow", list(Overflow), ids=lambda m: m.value)
def test_round_scaled_overwrite_gives_the_same_bits(rounding, overflow):
    rng = np.random.default_rng(4)
    fmt = FixedFormat(12, 6, rounding=rounding, overflow=overflow)
    y = np.concatenate([rng.integers(-8000, 8000, 500) / 4.0, rng.standard_normal(500) * 3000])
    kept = y.copy()
    plain = round_scaled(y, fmt)
    assert np.array_equal(y, kept)                     # overwrite=False leaves y alone
    scratch = y.copy()
    in_place = round_scaled(scratch, fmt, overwrite=True)
    assert np.array_equal(plain.raw, in_place.raw) and plain.overflows == in_place.overflows > 0
