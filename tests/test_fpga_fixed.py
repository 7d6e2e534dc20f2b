"""Property tests of edgefa.fpga_sim (fixed.py, ops.py) against references written here.

The references use plain Python integers and `fractions.Fraction` only; none of them calls the
code under test. Every hypothesis test is derandomized (the same examples on every run).

Rounding reference, on an exact rational x (the value in units of the target LSB):
    AP_TRN          floor(x)                AP_TRN_ZERO     trunc(x)
    AP_RND          floor(x + 1/2)          AP_RND_MIN_INF  ceil(x - 1/2)
    AP_RND_ZERO     ties toward zero        AP_RND_INF      ties away from zero
    AP_RND_CONV     round(x) (Python's round of a Fraction: ties to even)
Overflow reference, on the rounded integer v and a format of W bits:
    range [lo, hi] = [-2**(W-1), 2**(W-1) - 1] signed ([-hi, hi] for AP_SAT_SYM), [0, 2**W - 1] unsigned
    AP_WRAP v mod 2**W (into the signed range when signed); AP_SAT clamp; AP_SAT_ZERO 0 if outside
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edgefa.fpga_sim.fixed import (FixedFormat, FixedPointError, Overflow, Rounding, apply_overflow,
                                   parse_format, quantize, requantize, shift_round)
from edgefa.fpga_sim.ops import (FunctionTable, SoftmaxError, add, matmul, mul, product_format, relu)

I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
DETERMINISTIC = [r for r in Rounding if r is not Rounding.STOCHASTIC]
SATURATING = [Overflow.SAT, Overflow.SAT_ZERO, Overflow.SAT_SYM]

FAST = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MID = settings(max_examples=15, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(max_examples=15, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ============================================ reference ==========================================

def ref_round(x: Fraction, mode: Rounding) -> int:
    """x rounded to an integer by an ap_fixed rounding mode (deterministic modes)."""
    x = Fraction(x)
    if x.denominator == 1:
        return int(x)
    half = Fraction(1, 2)
    ties_up = math.floor(x + half)           # nearest, ties toward +inf
    ties_down = math.ceil(x - half)          # nearest, ties toward -inf
    return {
        Rounding.TRN: math.floor(x),
        Rounding.TRN_ZERO: math.trunc(x),
        Rounding.RND: ties_up,
        Rounding.RND_MIN_INF: ties_down,
        Rounding.RND_ZERO: ties_down if x > 0 else ties_up,
        Rounding.RND_INF: ties_up if x > 0 else ties_down,
        Rounding.RND_CONV: round(x),
    }[mode]


def ref_range(width: int, signed: bool, overflow: Overflow) -> tuple[int, int]:
    if not signed:
        return 0, (1 << width) - 1
    hi = (1 << (width - 1)) - 1
    return (-hi if overflow is Overflow.SAT_SYM else -hi - 1), hi


def ref_overflow(v: int, width: int, signed: bool, overflow: Overflow) -> tuple[int, bool]:
    """(v brought into the format, whether v was out of range)."""
    lo, hi = ref_range(width, signed, overflow)
    if lo <= v <= hi:
        return v, False
    if overflow is Overflow.WRAP:
        m = v % (1 << width)
        if signed and m >= 1 << (width - 1):
            m -= 1 << width
        return m, True
    if overflow is Overflow.SAT_ZERO:
        return 0, True
    return (hi if v > hi else lo), True


def ref_fmt(fmt: FixedFormat, v: int) -> tuple[int, bool]:
    return ref_overflow(v, fmt.width, fmt.signed, fmt.overflow)


def scale(frac_bits: int) -> Fraction:
    return Fraction(2) ** frac_bits


def ints(a) -> list:
    return [int(v) for v in np.asarray(a).ravel()]


# ============================================ strategies =========================================

BOUNDARIES = sorted({0, 1, -1, 2, -2, 3, -3, I64_MIN, I64_MIN + 1, I64_MAX, I64_MAX - 1,
                     *[s * (1 << k) + d for k in (8, 15, 16, 31, 32, 52, 53, 62) for s in (1, -1) for d in (-1, 0, 1)]})
int64s = st.one_of(st.integers(I64_MIN, I64_MAX), st.sampled_from(BOUNDARIES), st.integers(-1000, 1000))


@st.composite
def raws_for_shift(draw, shift: int):
    """int64 values, many of them exactly half an LSB (or one unit off) after a right shift."""
    def one():
        kind = draw(st.integers(0, 3))
        if kind == 0 or shift <= 0:
            return draw(int64s)
        q_lim = (1 << max(0, 62 - shift)) if shift < 63 else 0
        q = draw(st.integers(-q_lim - 1, q_lim))
        if shift >= 63:
            q = draw(st.sampled_from([-1, 0]))
        base = (q << shift) + (1 << (shift - 1))                 # exactly half
        v = base + draw(st.sampled_from([-1, 0, 0, 1])) if kind == 1 else base
        if kind == 3:
            v = q << shift if shift < 63 else q                  # exact (or as close as fits)
        return max(I64_MIN, min(I64_MAX, v))
    return [one() for _ in range(draw(st.integers(1, 24)))]


def formats(min_w=1, max_w=64, signed=None, overflow=None, rounding=None, int_lo=-8, int_hi_extra=8):
    @st.composite
    def build(draw):
        s = draw(st.booleans()) if signed is None else signed
        w = draw(st.integers(max(min_w, 2 if s else 1), max_w if s else min(max_w, 63)))
        i = draw(st.integers(int_lo, w + int_hi_extra))
        o = draw(st.sampled_from(list(Overflow))) if overflow is None else overflow
        r = draw(st.sampled_from(DETERMINISTIC)) if rounding is None else rounding
        return FixedFormat(w, i, signed=s, rounding=r, overflow=o)
    return build()


def raw_in(fmt: FixedFormat):
    lo, hi = ref_range(fmt.width, fmt.signed, Overflow.WRAP)
    return st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi, 0, min(hi, 1), max(lo, -1)]))


# ============================================ shift_round ========================================

@pytest.mark.parametrize("mode", DETERMINISTIC, ids=lambda m: m.value)
@FAST
@given(data=st.data(), shift=st.integers(0, 70))
def test_shift_round_right_matches_reference(mode, data, shift):
    raws = data.draw(raws_for_shift(shift))
    got = shift_round(np.array(raws, np.int64), shift, mode)
    assert got.dtype == np.int64 and got.shape == (len(raws),)
    expected = [ref_round(Fraction(v, 1 << shift), mode) for v in raws]
    assert ints(got) == expected


@pytest.mark.parametrize("mode", list(Rounding), ids=lambda m: m.value)
@settings(max_examples=10, deadline=None, derandomize=True)
@given(data=st.data(), shift=st.integers(-62, 0))
def test_shift_round_left_is_exact(mode, data, shift):
    lim = I64_MAX >> -shift
    raws = data.draw(st.lists(st.one_of(st.integers(-lim - 1, lim), st.sampled_from([-lim - 1, lim, 0, -1])),
                              min_size=1, max_size=16))
    got = shift_round(np.array(raws, np.int64), shift, mode, rng=np.random.default_rng(0))
    assert ints(got) == [v << -shift for v in raws]


def test_shift_round_scalar_and_shape():
    assert int(shift_round(np.int64(-5), 1, Rounding.RND_CONV)) == -2
    x = np.arange(-8, 8, dtype=np.int64).reshape(4, 4)
    assert shift_round(x, 2, Rounding.TRN).shape == (4, 4)
    with pytest.raises(FixedPointError):
        shift_round(np.array([1.5]), 1, Rounding.TRN)


# --- stochastic -----------------------------------------------------------------------------

STOCH_CASES = [(5, 3), (-5, 3), (7, 4), (-1, 1), (1 << 40 | 12345, 20), (-(1 << 50) - 777, 33),
               (I64_MAX, 62), (I64_MIN + 12345, 62), (I64_MAX, 63), (-(1 << 62) - 3, 64), (123456789, 70)]


@FAST
@given(data=st.data(), shift=st.integers(1, 70), seed=st.integers(0, 2**32 - 1))
def test_stochastic_is_seeded_and_floor_or_floor_plus_one(data, shift, seed):
    raws = data.draw(raws_for_shift(shift))
    x = np.array(raws, np.int64)
    first = shift_round(x, shift, Rounding.STOCHASTIC, np.random.default_rng(seed))
    again = shift_round(x, shift, Rounding.STOCHASTIC, np.random.default_rng(seed))
    assert np.array_equal(first, again)                          # a fixed seed: the same draws
    for v, r in zip(raws, ints(first)):
        fl = v >> shift
        assert r in (fl, fl + 1)
        if v % (1 << shift) == 0:                                # exact values never move
            assert r == fl


def test_stochastic_needs_a_generator():
    with pytest.raises(FixedPointError):
        shift_round(np.array([3]), 1, Rounding.STOCHASTIC)
    with pytest.raises(FixedPointError):
        quantize([0.3], FixedFormat(8, 4, rounding=Rounding.STOCHASTIC))


@pytest.mark.parametrize("value,shift", STOCH_CASES)
def test_stochastic_is_unbiased(value, shift):
    """E[round] = value / 2**shift: the mean of n draws is within 5 standard errors
    (sqrt(p (1 - p) / n), p the fractional part) plus 2**-50 of slack for the generator's
    resolution (62 random bits for shifts >= 63)."""
    n = 4000 if shift >= 63 else 40000                           # the >= 63 path is a Python loop
    rng = np.random.default_rng(1234)
    got = shift_round(np.full(n, value, np.int64), shift, Rounding.STOCHASTIC, rng)
    exact = Fraction(value, 1 << shift)
    p = float(exact - math.floor(exact))
    mean_up = float(np.mean(got - math.floor(exact)))
    assert set(np.unique(got - math.floor(exact))) <= {0, 1}
    assert abs(mean_up - p) <= 5 * math.sqrt(p * (1 - p) / n) + 2.0 ** -50, (mean_up, p)


def test_stochastic_requantize_and_quantize_unbiased():
    rng = np.random.default_rng(7)
    n = 40000
    fmt = FixedFormat(16, 8, rounding=Rounding.STOCHASTIC, overflow=Overflow.SAT)
    # raw 1000 with 12 fraction bits -> 8 fraction bits: 1000 / 16 = 62.5
    q = requantize(np.full(n, 1000, np.int64), 12, fmt, rng)
    assert set(np.unique(q.raw)) <= {62, 63} and abs(q.raw.mean() - 62.5) < 5 * 0.5 / math.sqrt(n)
    x = -1.0 / 3.0                                               # x * 2**8 = -85.333...
    q = quantize(np.full(n, x), fmt, rng)
    exact = Fraction(x) * 256
    p = float(exact - math.floor(exact))
    assert set(np.unique(q.raw)) <= {-86, -85}
    assert abs(q.raw.mean() - float(exact)) < 5 * math.sqrt(p * (1 - p) / n)
    # stochastic results still saturate
    q = requantize(np.full(10, (1 << 20) + 3, np.int64), 2, fmt, rng)
    assert ints(q.raw) == [fmt.raw_max] * 10 and q.overflows == 10


# ============================================ overflow ===========================================

@FAST
@given(fmt=formats(min_w=1, max_w=64), raws=st.lists(int64s, min_size=1, max_size=24))
def test_apply_overflow_matches_reference(fmt, raws):
    got = apply_overflow(np.array(raws, np.int64), fmt)
    assert ints(got) == [ref_fmt(fmt, v)[0] for v in raws]
    lo, hi = ref_range(fmt.width, fmt.signed, fmt.overflow)
    assert (fmt.raw_min, fmt.raw_max) == (lo, hi)


@pytest.mark.parametrize("overflow", list(Overflow), ids=lambda m: m.value)
@pytest.mark.parametrize("signed,width", [(True, 2), (True, 3), (True, 63), (True, 64), (False, 1), (False, 2), (False, 63)])
def test_apply_overflow_every_mode_at_the_edges(overflow, signed, width):
    fmt = FixedFormat(width, 0, signed=signed, overflow=overflow)
    lo, hi = ref_range(width, signed, Overflow.WRAP)
    probe = sorted({v for v in (lo - 1, lo, lo + 1, -1, 0, 1, hi - 1, hi, hi + 1, I64_MIN, I64_MAX)
                    if I64_MIN <= v <= I64_MAX})
    assert ints(apply_overflow(np.array(probe, np.int64), fmt)) == [ref_fmt(fmt, v)[0] for v in probe]


def test_wrap_signed_63_bits():
    fmt = FixedFormat(63, 63)                                     # ap_fixed<63,63>, AP_WRAP
    probe = [5, -5, (1 << 62), -(1 << 62) - 1, I64_MAX, I64_MIN]
    assert ints(apply_overflow(np.array(probe, np.int64), fmt)) == [ref_fmt(fmt, v)[0] for v in probe]


@pytest.mark.parametrize("mode", DETERMINISTIC, ids=lambda m: m.value)
@MID
@given(data=st.data(), src_frac=st.integers(-12, 80))
def test_requantize_matches_reference(mode, data, src_frac):
    fmt = data.draw(formats(min_w=1, max_w=64, rounding=mode))
    shift = src_frac - fmt.frac_bits
    raws = data.draw(raws_for_shift(shift)) if shift > 0 else data.draw(st.lists(int64s, min_size=1, max_size=24))
    q = requantize(np.array(raws, np.int64), src_frac, fmt)
    expected, n_over = [], 0
    for v in raws:
        r, over = ref_fmt(fmt, ref_round(Fraction(v) * scale(fmt.frac_bits - src_frac), mode))
        expected.append(r)
        n_over += over
    assert ints(q.raw) == expected
    assert q.overflows == n_over
    assert q.fmt == fmt


def test_requantize_left_shift_beyond_int64_saturates():
    fmt = FixedFormat(32, 2, overflow=Overflow.SAT)               # 30 fraction bits
    q = requantize(np.array([1 << 40], np.int64), 0, fmt)        # 2**40 needs 2**70 raw: saturate
    assert ints(q.raw) == [fmt.raw_max] and q.overflows == 1


# ============================================ quantize ===========================================

def float_values(frac_bits: int):
    """Finite floats whose x * 2**F stays finite (quantize refuses larger ones), many on or near
    the format's grid and its half-LSB points."""
    limit = min(1e300, 2.0 ** (1000 - max(frac_bits, 0)))
    lsb = 2.0 ** -frac_bits
    on_grid = st.integers(-(1 << 54), 1 << 54).map(lambda k: k * lsb)
    halves = st.integers(-(1 << 52), 1 << 52).map(lambda k: (k + 0.5) * lsb)
    near = st.tuples(st.integers(-(1 << 40), 1 << 40), st.sampled_from([-1, 1]), st.integers(1, 8)).map(
        lambda t: (t[0] + 0.5) * lsb + t[1] * 2.0 ** -t[2] * lsb * 2.0 ** -40)
    anyf = st.floats(-limit, limit, allow_nan=False, allow_infinity=False, allow_subnormal=frac_bits >= 0)
    return st.one_of(anyf, on_grid, halves, near, st.sampled_from([0.0, -0.0, 1.0, -1.0]))


@pytest.mark.parametrize("mode", DETERMINISTIC, ids=lambda m: m.value)
@MID
@given(data=st.data())
def test_quantize_matches_reference(mode, data):
    fmt = data.draw(formats(min_w=1, max_w=52, rounding=mode))
    xs = data.draw(st.lists(float_values(fmt.frac_bits), min_size=1, max_size=10))
    q = quantize(np.array(xs), fmt)
    expected, n_over = [], 0
    for x in xs:
        r, over = ref_fmt(fmt, ref_round(Fraction(x) * scale(fmt.frac_bits), mode))
        expected.append(r)
        n_over += over
    assert ints(q.raw) == expected
    assert q.overflows == n_over
    assert q.raw.dtype == np.int64


def test_quantize_tiny_negative_with_negative_frac_bits():
    fmt = FixedFormat(8, 108)                                    # F = -100, AP_TRN
    assert ints(quantize([-1e-300], fmt).raw) == [-1]             # floor(-1e-300 * 2**-100) = -1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("mode", list(Rounding), ids=lambda m: m.value)
def test_quantize_refuses_nan_and_inf(bad, mode):
    fmt = FixedFormat(16, 8, rounding=mode, overflow=Overflow.SAT)
    with pytest.raises(FixedPointError, match="NaN or Inf"):
        quantize(np.array([0.5, bad]), fmt, rng=np.random.default_rng(0))


@pytest.mark.filterwarnings("ignore:overflow encountered in ldexp:RuntimeWarning")
def test_quantize_width_and_magnitude_limits():
    with pytest.raises(FixedPointError, match="at most 52 bits"):
        quantize([1.0], FixedFormat(53, 10))
    with pytest.raises(FixedPointError, match="too large"):
        quantize([1e308], FixedFormat(32, -200, overflow=Overflow.SAT))


@FAST
@given(data=st.data())
def test_quantize_stochastic_brackets_the_value(data):
    fmt = data.draw(formats(min_w=2, max_w=52, rounding=Rounding.STOCHASTIC, int_lo=0))
    xs = data.draw(st.lists(float_values(fmt.frac_bits), min_size=1, max_size=16))
    seed = data.draw(st.integers(0, 1000))
    q = quantize(np.array(xs), fmt, np.random.default_rng(seed))
    assert np.array_equal(q.raw, quantize(np.array(xs), fmt, np.random.default_rng(seed)).raw)
    for x, r in zip(xs, ints(q.raw)):
        y = Fraction(x) * scale(fmt.frac_bits)
        fl = math.floor(y)
        options = {ref_fmt(fmt, fl)[0], ref_fmt(fmt, fl + (y != fl))[0]}
        assert r in options


# ============================================ add, mul, relu =====================================

@FAST
@given(data=st.data())
def test_add_matches_reference(data):
    a_fmt = data.draw(formats(1, 24, int_lo=-4, int_hi_extra=4))
    b_fmt = data.draw(formats(1, 24, int_lo=-4, int_hi_extra=4))
    frac = max(a_fmt.frac_bits, b_fmt.frac_bits)
    need = max(a_fmt.width + frac - a_fmt.frac_bits, b_fmt.width + frac - b_fmt.frac_bits) + 1
    # the output's fraction bits: any coarser, and finer only while the exact sum still fits int64
    # after the left shift (beyond that, see test_add_into_a_very_fine_format, an xfail)
    out_frac = data.draw(st.integers(frac - 30, frac + 63 - need))
    signed = data.draw(st.booleans())
    w = data.draw(st.integers(2 if signed else 1, 64 if signed else 63))
    o = data.draw(st.sampled_from(list(Overflow)))
    out = FixedFormat(w, w - out_frac, signed=signed, rounding=data.draw(st.sampled_from(DETERMINISTIC)), overflow=o)
    n = data.draw(st.integers(1, 12))
    a = data.draw(st.lists(raw_in(a_fmt), min_size=n, max_size=n))
    b = data.draw(st.lists(raw_in(b_fmt), min_size=n, max_size=n))
    q = add(np.array(a, np.int64), a_fmt, np.array(b, np.int64), b_fmt, out)
    expected, n_over = [], 0
    for x, y in zip(a, b):
        exact = Fraction(x) / scale(a_fmt.frac_bits) + Fraction(y) / scale(b_fmt.frac_bits)
        r, over = ref_fmt(out, ref_round(exact * scale(out.frac_bits), out.rounding))
        expected.append(r)
        n_over += over
    assert ints(q.raw) == expected and q.overflows == n_over


def test_add_into_a_very_fine_format():
    half = FixedFormat(1, 0, signed=False)                        # ap_ufixed<1,0>: raw 1 is 0.5
    out = FixedFormat(55, -8, signed=False, overflow=Overflow.SAT)  # 63 fraction bits, max < 2**-8
    q = add(np.array([1]), half, np.array([1]), half, out)        # 0.5 + 0.5 = 1: saturates
    assert ints(q.raw) == [out.raw_max] and q.overflows == 1


def test_add_refuses_too_wide():
    with pytest.raises(FixedPointError, match="bits"):
        add(np.array([1]), FixedFormat(40, 40), np.array([1]), FixedFormat(40, 0), FixedFormat(32, 16))


@FAST
@given(data=st.data())
def test_mul_is_exact_full_width(data):
    a_fmt = data.draw(formats(1, 32, int_lo=-8, int_hi_extra=8))
    b_fmt = data.draw(formats(1, 64 - a_fmt.width, int_lo=-8, int_hi_extra=8))
    assume(a_fmt.signed or b_fmt.signed or a_fmt.width + b_fmt.width <= 63)
    a = data.draw(st.lists(raw_in(a_fmt), min_size=1, max_size=8))
    b = data.draw(st.lists(raw_in(b_fmt), min_size=1, max_size=8))
    q = mul(np.array(a, np.int64)[:, None], a_fmt, np.array(b, np.int64)[None, :], b_fmt)
    assert q.raw.shape == (len(a), len(b))
    assert [ints(row) for row in q.raw] == [[x * y for y in b] for x in a]
    pf = product_format(a_fmt, b_fmt)
    assert (q.fmt.width, q.fmt.int_bits, q.fmt.signed) == (pf.width, pf.int_bits, pf.signed) \
        == (a_fmt.width + b_fmt.width, a_fmt.int_bits + b_fmt.int_bits, a_fmt.signed or b_fmt.signed)
    assert q.fmt.frac_bits == a_fmt.frac_bits + b_fmt.frac_bits
    for x, y, p in zip(a, b, ints(q.raw.diagonal()) if len(a) == len(b) else []):
        lo, hi = ref_range(pf.width, pf.signed, Overflow.WRAP)
        assert lo <= p <= hi


def test_mul_refuses_too_wide():
    with pytest.raises(FixedPointError, match="needs 65 bits; at most 64"):
        mul(np.array([1]), FixedFormat(33, 1), np.array([1]), FixedFormat(32, 1))


def test_relu():
    x = np.array([I64_MIN, -1, 0, 1, I64_MAX], np.int64)
    assert ints(relu(x)) == [0, 0, 0, 1, I64_MAX]


# ============================================ matmul =============================================

def ref_matmul(a, a_fmt, b, b_fmt, acc: FixedFormat):
    """A sequential Python-int MAC: each product exact, rounded into the accumulator's fraction
    bits by its rounding where it has fewer (shifted left otherwise); AP_WRAP sums and wraps once,
    the saturating modes saturate at every addition, k = 0 .. K-1, from 0.
    Returns (raw rows, overflow count, exact sums before wrapping)."""
    shift = a_fmt.frac_bits + b_fmt.frac_bits - acc.frac_bits
    m, k = len(a), len(a[0]) if a else 0
    n = len(b[0]) if b else 0
    out, count, sums = [], 0, []
    for i in range(m):
        row = []
        for j in range(n):
            terms = [a[i][kk] * b[kk][j] for kk in range(k)]
            terms = [ref_round(Fraction(p, 1 << shift), acc.rounding) if shift > 0 else p << -shift for p in terms]
            if acc.overflow is Overflow.WRAP:
                s = sum(terms)
                sums.append(s)
                r, over = ref_fmt(acc, s)
                count += over
            else:
                r = 0
                for p in terms:
                    r, over = ref_fmt(acc, r + p)
                    count += over
            row.append(r)
        out.append(row)
    return out, count, sums


def check_matmul(a, a_fmt, b, b_fmt, acc, check_count=True):
    shift = a_fmt.frac_bits + b_fmt.frac_bits - acc.frac_bits
    max_a = max((abs(v) for row in a for v in row), default=0)
    max_b = max((abs(v) for row in b for v in row), default=0)
    A, B = np.array(a, np.int64).reshape(len(a), -1), np.array(b, np.int64).reshape(len(b), -1)
    if shift <= 0 and acc.overflow is not Overflow.WRAP and (max_a * max_b) << -shift >= 1 << 62:
        with pytest.raises(FixedPointError, match="62 bits"):      # the documented refusal
            matmul(A, a_fmt, B, b_fmt, acc)
        return None
    q = matmul(A, a_fmt, B, b_fmt, acc)
    expected, count, sums = ref_matmul(a, a_fmt, b, b_fmt, acc)
    assert [ints(row) for row in q.raw] == expected
    assert q.fmt == acc
    # AP_WRAP's count is only exact while every exact sum fits int64 (see the xfails below)
    if check_count and all(I64_MIN <= s <= I64_MAX for s in sums):
        assert q.overflows == count
    return expected


@st.composite
def matmul_case(draw, overflow, acc_frac=None, operand_max_w=16, acc_w=None, rounding=None):
    a_fmt = draw(formats(2, operand_max_w, int_lo=-4, int_hi_extra=4, overflow=Overflow.WRAP))
    b_fmt = draw(formats(2, operand_max_w, int_lo=-4, int_hi_extra=4, overflow=Overflow.WRAP))
    m, k, n = draw(st.integers(1, 6)), draw(st.integers(1, 9)), draw(st.integers(1, 5))
    prod_frac = a_fmt.frac_bits + b_fmt.frac_bits
    prod_w = a_fmt.width + b_fmt.width
    if acc_frac == "fewer":
        f = prod_frac - draw(st.integers(1, 12))
    elif acc_frac == "more":
        f = prod_frac + draw(st.integers(0, 10))
    else:
        f = prod_frac + draw(st.integers(-10, 10))
    w = acc_w if acc_w is not None else draw(st.integers(max(2, prod_w - 10), 64))
    signed = draw(st.booleans()) if w <= 63 else True
    r = rounding if rounding is not None else draw(st.sampled_from(DETERMINISTIC))
    acc = FixedFormat(w, w - f, signed=signed, rounding=r, overflow=overflow)
    # operands: per row / column a random magnitude, so that some outputs saturate and others not
    def matrix(fmt, rows, cols, by_row):
        lo, hi = ref_range(fmt.width, fmt.signed, Overflow.WRAP)
        out = [[0] * cols for _ in range(rows)]
        for i in range(rows if by_row else cols):
            bits = draw(st.integers(0, fmt.width))
            lim_hi, lim_lo = min(hi, (1 << bits) - 1), max(lo, -(1 << bits))
            vals = draw(st.lists(st.one_of(st.integers(lim_lo, lim_hi), st.sampled_from([lim_lo, lim_hi])),
                                 min_size=cols if by_row else rows, max_size=cols if by_row else rows))
            for j, v in enumerate(vals):
                if by_row:
                    out[i][j] = v
                else:
                    out[j][i] = v
        return out
    return matrix(a_fmt, m, k, True), a_fmt, matrix(b_fmt, k, n, False), b_fmt, acc


@pytest.mark.parametrize("overflow", list(Overflow), ids=lambda m: m.value)
@SLOW
@given(data=st.data())
def test_matmul_matches_mac_reference(overflow, data):
    check_matmul(*data.draw(matmul_case(overflow)))


@pytest.mark.parametrize("rounding", DETERMINISTIC, ids=lambda m: m.value)
@pytest.mark.parametrize("overflow", list(Overflow), ids=lambda m: m.value)
@settings(max_examples=5, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_matmul_narrow_accumulator_rounds_each_product(overflow, rounding, data):
    check_matmul(*data.draw(matmul_case(overflow, acc_frac="fewer", rounding=rounding)))


@pytest.mark.parametrize("overflow", list(Overflow), ids=lambda m: m.value)
@SLOW
@given(data=st.data())
def test_matmul_wide_accumulator_shifts_left(overflow, data):
    check_matmul(*data.draw(matmul_case(overflow, acc_frac="more")))


@pytest.mark.parametrize("overflow", list(Overflow), ids=lambda m: m.value)
@SLOW
@given(data=st.data())
def test_matmul_64bit_accumulator_32bit_operands(overflow, data):
    """The int64 route: 32-bit operands make K * max|a| * max|b| >= 2**53."""
    a_fmt, b_fmt = FixedFormat(32, 16), FixedFormat(32, 12)
    m, k, n = data.draw(st.integers(1, 6)), data.draw(st.integers(2, 9)), data.draw(st.integers(1, 5))
    big = st.one_of(st.integers(-(1 << 31), (1 << 31) - 1),
                    st.sampled_from([-(1 << 31), (1 << 31) - 1, -(1 << 31) + 1, 0]),
                    st.integers(-(1 << 31) + 1, (1 << 31) - 1))
    a = [data.draw(st.lists(big, min_size=k, max_size=k)) for _ in range(m)]
    b = [data.draw(st.lists(big, min_size=n, max_size=n)) for _ in range(k)]
    a[0][0] = (1 << 31) - 1                           # at least one large product: the int64 route
    b[0][0] = -(1 << 31) + 1
    f = a_fmt.frac_bits + b_fmt.frac_bits + data.draw(st.integers(-6, 0))
    acc = FixedFormat(64, 64 - f, rounding=data.draw(st.sampled_from(DETERMINISTIC)), overflow=overflow)
    assert k * max(abs(v) for r in a for v in r) * max(abs(v) for r in b for v in r) >= 2 ** 53
    check_matmul(a, a_fmt, b, b_fmt, acc)


@pytest.mark.parametrize("overflow", SATURATING, ids=lambda m: m.value)
@pytest.mark.parametrize("fewer", [False, True], ids=["exact-products", "rounded-products"])
def test_matmul_saturation_mixed_outputs(overflow, fewer):
    """Seeded cases where some outputs saturate (some only part-way through the sum, then come
    back) and others do not, checked output by output against the MAC reference."""
    rng = np.random.default_rng(11)
    a_fmt, b_fmt = FixedFormat(8, 4), FixedFormat(8, 2)          # products: 16 bits, 10 fraction
    mixed = 0
    for trial in range(15):
        m, k, n = 6, 9, 5
        a = rng.integers(-128, 128, (m, k)) >> rng.integers(0, 7, (m, 1))   # rows of mixed scale
        b = rng.integers(-128, 128, (k, n)) >> rng.integers(0, 7, (1, n))
        f = 10 - 3 if fewer else 10 + 1
        w = int(rng.integers(9, 15))
        acc = FixedFormat(w, w - f, rounding=Rounding.RND_CONV if fewer else Rounding.TRN, overflow=overflow)
        expected = check_matmul(a.tolist(), a_fmt, b.tolist(), b_fmt, acc)
        # saturated anywhere vs never: from the reference, output by output
        shift = 10 - f
        sat_any = np.zeros((m, n), bool)
        for i in range(m):
            for j in range(n):
                r = 0
                for kk in range(k):
                    p = int(a[i, kk]) * int(b[kk, j])
                    p = ref_round(Fraction(p, 1 << shift), acc.rounding) if shift > 0 else p << -shift
                    r, over = ref_fmt(acc, r + p)
                    sat_any[i, j] |= over
        mixed += bool(sat_any.any() and not sat_any.all())
        assert expected is not None
    assert mixed >= 3                                            # the cases really are mixed


def test_matmul_shape_mismatch():
    with pytest.raises(FixedPointError, match="shapes"):
        matmul(np.zeros((2, 3), np.int64), FixedFormat(8, 4), np.zeros((2, 3), np.int64), FixedFormat(8, 4),
               FixedFormat(32, 16))


def test_matmul_wrap_count_at_int64_edge():
    fmt = FixedFormat(32, 16)
    acc = FixedFormat(64, 32)                                     # 32 fraction bits: shift 0
    a = np.array([[-(1 << 31), -(1 << 31), 1]])
    b = np.array([[-(1 << 31)], [-(1 << 31)], [1]])              # exact sum 2**63 + 1: wraps
    q = matmul(a, fmt, b, fmt, acc)
    assert ints(q.raw) == [-(1 << 63) + 1]                        # (this part is right)
    assert q.overflows == 1


def test_matmul_wrap_count_rounded_products_64bit():
    fmt = FixedFormat(32, 16)
    acc = FixedFormat(64, 33)                                     # 31 fraction bits: shift 1
    a = np.array([[-(1 << 31)] * 6])
    b = np.array([[-(1 << 31)]] * 6)                              # sum 6 * 2**61 = 1.5 * 2**63
    q = matmul(a, fmt, b, fmt, acc)
    assert ints(q.raw) == [ref_fmt(acc, 6 << 61)[0]]
    assert q.overflows == 1


@pytest.mark.parametrize("overflow", list(Overflow), ids=lambda m: m.value)
def test_matmul_refuses_unsigned_32bit_products(overflow):
    """(2**32 - 1)**2 does not fit int64: refused, never wrapped silently (it once was)."""
    u = FixedFormat(32, 16, signed=False)
    acc = FixedFormat(64, 40, overflow=overflow)
    a = np.array([[(1 << 32) - 1]])
    with pytest.raises(FixedPointError, match="needs 64 bits unsigned; at most 63"):
        matmul(a, u, a, u, acc)
    q = matmul(a >> 1, FixedFormat(32, 16), a, u, acc)            # signed x unsigned 32 bits fits
    assert ints(q.raw) == [((1 << 31) - 1) * ((1 << 32) - 1) >> 8]


# ============================================ FunctionTable ======================================

def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


FUNCS = {  # f, max |f'|, max |f''|, sup f
    "tanh": (math.tanh, 1.0, 4 / (3 * math.sqrt(3)), 1.0),
    "sigmoid": (_sigmoid, 0.25, math.sqrt(3) / 18, 1.0),
}
IN_FMT = FixedFormat(12, 4)                                       # 12 bits, 8 fraction: [-8, 8)


@pytest.mark.parametrize("function", ["tanh", "sigmoid"])
@pytest.mark.parametrize("method", ["lut", "pwl"])
@pytest.mark.parametrize("size,input_range", [(16, 4.0), (64, 4.0), (256, 8.0), (32, 8.0)])
@pytest.mark.parametrize("rounding", [Rounding.TRN, Rounding.RND_CONV], ids=lambda m: m.value)
def test_function_table_error_and_monotone(function, method, size, input_range, rounding):
    """Error bound, with seg = 2 R / size the segment width and L the output LSB:
      lut: |f(x) - f(centre)| <= max|f'| seg / 2 inside the range, f_sup - f(R - seg/2) outside
           (the end entries are f at the end segments' centres; tanh and sigmoid are symmetric
           about their centre, so one bound serves both ends), + L/2 for the entry's rounding;
      pwl: linear interpolation error <= max|f''| seg**2 / 8 inside, f_sup - f(R) outside,
           + L/2 for the knots' rounding + 1 L for rounding slope * offset (any mode).
    One more L is allowed as margin."""
    f, d1, d2, sup = FUNCS[function]
    out_fmt = FixedFormat(16, 2, rounding=rounding)               # 14 fraction bits
    lsb = out_fmt.lsb
    table = FunctionTable(function, method, size, input_range, IN_FMT, out_fmt)
    seg = 2 * input_range / size
    if method == "lut":
        bound = max(d1 * seg / 2, sup - f(input_range - seg / 2)) + 0.5 * lsb + lsb
    else:
        bound = max(d2 * seg ** 2 / 8, sup - f(input_range)) + 1.5 * lsb + lsb
    raw = np.arange(-(1 << 11), 1 << 11, dtype=np.int64)          # every input of the 12-bit format
    out = table(raw)
    assert out.shape == raw.shape
    got = out_fmt.to_float(out)
    want = np.array([f(v * IN_FMT.lsb) for v in range(-(1 << 11), 1 << 11)])
    err = np.abs(got - want).max()
    assert err <= bound, (err, bound)
    assert np.all(np.diff(out) >= 0)                              # monotone non-decreasing
    assert out.min() >= out_fmt.raw_min and out.max() <= out_fmt.raw_max


def test_function_table_bad_config():
    out = FixedFormat(16, 2)
    with pytest.raises(FixedPointError, match="unknown table function"):
        FunctionTable("relu", "lut", 16, 4.0, IN_FMT, out)
    with pytest.raises(FixedPointError, match="unknown table method"):
        FunctionTable("tanh", "spline", 16, 4.0, IN_FMT, out)
    with pytest.raises(FixedPointError, match="power of two"):
        FunctionTable("tanh", "lut", 24, 4.0, IN_FMT, out)
    with pytest.raises(FixedPointError, match="finer than"):
        FunctionTable("tanh", "lut", 8192, 4.0, IN_FMT, out)


# ============================================ SoftmaxError =======================================

# Probability bound (p the hardware value, q the float softmax of the same inputs), derived:
# every exp term is 2**t times (1 - d) with d in [0, 1 - 2**(-1/64)) from the table index
# dropping the fraction's low bits, so p / q lies in [2**(-1/64), 2**(1/64)]: |p - q| <= (2**(1/64) - 1) q.
# log2(e) in 16 fraction bits (error <= 2**-17, times |z - max z| <= 16 here), t rounded to 16
# fraction bits and the table's own rounding add under 3e-4 relative. Truncating each term to
# 16 fraction bits moves each p by at most 2**-16 and the row sum by K 2**-16; the final
# division rounds by 2**-17. So |p - q| <= (2**(1/64) - 1 + 3e-4) q + (K + 2) 2**-16.
REL = 2 ** (1 / 64) - 1 + 3e-4


@st.composite
def softmax_case(draw):
    batch = draw(st.sampled_from([1, 2, 4, 8]))
    k = draw(st.integers(2, 12))
    in_fmt = FixedFormat(16, 8)                                    # Q8.8 logits
    spread = draw(st.sampled_from([0.5, 2.0, 8.0]))
    lim = int(spread * 256)
    logits = [draw(st.lists(st.integers(-lim, lim), min_size=k, max_size=k)) for _ in range(batch)]
    labels = draw(st.lists(st.integers(0, k - 1), min_size=batch, max_size=batch))
    rounding = draw(st.sampled_from([Rounding.TRN, Rounding.RND_CONV, Rounding.RND_ZERO]))
    out_fmt = FixedFormat(16, 1, rounding=rounding, overflow=Overflow.SAT)   # 15 fraction bits
    return np.array(logits, np.int64), np.array(labels), in_fmt, out_fmt


@FAST
@given(case=softmax_case())
def test_softmax_error_against_float(case):
    logits, labels, in_fmt, out_fmt = case
    batch, k = logits.shape
    sm = SoftmaxError(in_fmt, out_fmt)
    p_raw = sm.probabilities(logits)
    z = logits / 256.0
    q = np.exp(z - z.max(axis=1, keepdims=True))
    q /= q.sum(axis=1, keepdims=True)
    p = p_raw / 2.0 ** 16
    assert np.all(np.abs(p - q) <= REL * q + (k + 2) * 2.0 ** -16), np.abs(p - q).max()
    assert np.all(np.abs(p_raw.sum(axis=1) - (1 << 16)) <= k)     # each p rounded to nearest: K/2 at most
    assert np.all(p_raw >= 0) and np.all(p_raw <= 1 << 16)
    e = sm(logits, labels)
    onehot = np.zeros_like(q)
    onehot[np.arange(batch), labels] = 1.0
    e_float = (q - onehot) / batch
    e_q = out_fmt.to_float(e.raw)
    tol = (REL * q + (k + 2) * 2.0 ** -16) / batch + 2 * out_fmt.lsb
    assert np.all(np.abs(e_q - e_float) <= tol)
    # the sign pattern: a nonzero error has the float error's sign; one beyond the tolerance is nonzero
    nonzero = e.raw != 0
    assert np.all(np.sign(e.raw[nonzero]) == np.sign(e_float[nonzero]))
    clear = np.abs(e_float) > tol
    assert np.all(np.sign(e.raw[clear]) == np.sign(e_float[clear]))
    assert e.raw.shape == (batch, k) and e.fmt == out_fmt


def test_softmax_uniform_and_dominant():
    sm = SoftmaxError(FixedFormat(16, 8), FixedFormat(16, 1))
    p = sm.probabilities(np.zeros((1, 4), np.int64))
    assert ints(p) == [1 << 14] * 4
    p = sm.probabilities(np.array([[127 * 256, -128 * 256]], np.int64))
    assert ints(p) == [1 << 16, 0]
    with pytest.raises(FixedPointError, match="power of two"):
        SoftmaxError(FixedFormat(16, 8), FixedFormat(16, 1), exp_table_size=48)


# ============================================ parse_format =======================================

@pytest.mark.parametrize("text,width,int_bits,signed,rounding,overflow", [
    ("ap_fixed<16,8>", 16, 8, True, Rounding.TRN, Overflow.WRAP),
    ("ap_ufixed<8,0,AP_RND,AP_SAT>", 8, 0, False, Rounding.RND, Overflow.SAT),
    ("ap_fixed< 32 , -2 , AP_RND_CONV , AP_SAT_SYM >", 32, -2, True, Rounding.RND_CONV, Overflow.SAT_SYM),
    ("ap_fixed<8,12,AP_TRN_ZERO>", 8, 12, True, Rounding.TRN_ZERO, Overflow.WRAP),
    ("AP_FIXED<64,32,ap_rnd_min_inf,ap_sat_zero>", 64, 32, True, Rounding.RND_MIN_INF, Overflow.SAT_ZERO),
    ("ap_fixed<24,8,AP_RND_INF,AP_WRAP>", 24, 8, True, Rounding.RND_INF, Overflow.WRAP),
    ("ap_fixed<24,8,RND_ZERO,SAT>", 24, 8, True, Rounding.RND_ZERO, Overflow.SAT),
    ("ap_ufixed<63,63>", 63, 63, False, Rounding.TRN, Overflow.WRAP),
    ("Q8.8", 16, 8, True, Rounding.TRN, Overflow.WRAP),
    ("q1.15", 16, 1, True, Rounding.TRN, Overflow.WRAP),
    ("UQ4.12", 16, 4, False, Rounding.TRN, Overflow.WRAP),
    ("uq0.8", 8, 0, False, Rounding.TRN, Overflow.WRAP),
    ("  Q16.16  ", 32, 16, True, Rounding.TRN, Overflow.WRAP),
])
def test_parse_format(text, width, int_bits, signed, rounding, overflow):
    fmt = parse_format(text)
    assert (fmt.width, fmt.int_bits, fmt.signed, fmt.rounding, fmt.overflow) == \
        (width, int_bits, signed, rounding, overflow)
    assert fmt.frac_bits == width - int_bits
    assert parse_format(str(fmt)) == fmt                            # str round-trips


def test_parse_format_defaults_and_equivalence():
    assert parse_format("Q8.8") == parse_format("ap_fixed<16,8>")
    assert parse_format("UQ4.12") == parse_format("ap_ufixed<16,4>")
    fmt = parse_format("Q8.8", rounding="AP_RND_CONV", overflow="AP_SAT")
    assert (fmt.rounding, fmt.overflow) == (Rounding.RND_CONV, Overflow.SAT)
    fmt = parse_format("ap_fixed<16,8,AP_RND>", rounding="AP_RND_CONV", overflow="AP_SAT")
    assert (fmt.rounding, fmt.overflow) == (Rounding.RND, Overflow.SAT)   # the text wins


@pytest.mark.parametrize("text,fragment", [
    ("ap_fixed<16>", "cannot read the fixed-point format 'ap_fixed<16>'"),
    ("fixed<16,8>", "cannot read"),
    ("Q8", "cannot read"),
    ("Q8.8.8", "cannot read"),
    ("", "cannot read"),
    ("ap_fixed<16,8,AP_RND,AP_SAT,extra>", "cannot read"),
    ("ap_fixed<16,8,AP_ROUND>", "unknown rounding mode 'AP_ROUND'"),
    ("ap_fixed<16,8,AP_RND,AP_CLAMP>", "unknown overflow mode 'AP_CLAMP'"),
    ("ap_fixed<16,8,AP_SAT>", "AP_SAT is an overflow mode; the rounding mode comes first"),        # the rounding comes first
    ("ap_fixed<0,0>", "word length 0 is out of range"),
    ("ap_fixed<65,8>", "word length 65 is out of range"),
    ("ap_fixed<-4,2>", "word length -4 is out of range"),
    ("ap_ufixed<64,8>", "unsigned format holds at most 63 bits"),
    ("ap_fixed<1,1>", "signed format needs at least 2 bits"),
    ("Q1.0", "signed format needs at least 2 bits"),
    ("ap_fixed<16,300>", "integer bits 300 are out of range"),
])
def test_parse_format_errors(text, fragment):
    with pytest.raises(FixedPointError) as info:
        parse_format(text)
    assert fragment in str(info.value), str(info.value)


def test_parse_format_bad_mode_argument():
    with pytest.raises(FixedPointError, match="unknown rounding mode 'nearest'"):
        parse_format("Q8.8", rounding="nearest")
    with pytest.raises(FixedPointError, match="unknown overflow mode 'clip'"):
        parse_format("Q8.8", overflow="clip")
    with pytest.raises(FixedPointError, match="width must be an integer"):
        FixedFormat(16.0, 8)


# ====================================== the half-LSB boundary ====================================
# round_scaled once took its decisions on rem = y - floor(y), which is inexact for y in (-1/2, 0):
# the float just above -1/2 read as an exact tie, so AP_RND_INF and AP_RND_MIN_INF rounded it to
# -1 instead of 0, and matmul_requantize (which rounds float64 sums) disagreed with matmul +
# requantize (which round integers).

def half_lsb_neighbours() -> list[float]:
    """The float64 values at and on both sides of +-1/2 and +-3/2 LSB, and around 0 and -1."""
    values = []
    for centre in (0.5, -0.5, 1.5, -1.5, -1.0, 0.0):
        below, above = np.nextafter(centre, -np.inf), np.nextafter(centre, np.inf)
        values += [centre, below, above, np.nextafter(below, -np.inf), np.nextafter(above, np.inf)]
    return values + [-5e-324, 5e-324, -1e-300]


@pytest.mark.parametrize("mode", DETERMINISTIC, ids=lambda m: m.value)
def test_round_scaled_exact_at_the_half_lsb_boundaries(mode):
    from edgefa.fpga_sim.fixed import round_scaled

    fmt = FixedFormat(16, 8, rounding=mode, overflow=Overflow.SAT)
    ys = half_lsb_neighbours()
    got = ints(round_scaled(np.array(ys), fmt).raw)
    assert got == [ref_round(Fraction(y), mode) for y in ys], list(zip(ys, got))
    # quantize is the same rounding on x * 2**F (the LSB of ap_fixed<16,8> is 2**-8), for the
    # values whose x = y * 2**-8 does not underflow
    normal = [i for i, y in enumerate(ys) if abs(y) >= 1e-300 or y == 0]
    xs = np.ldexp(np.array([ys[i] for i in normal]), -8)
    assert ints(quantize(xs, fmt).raw) == [got[i] for i in normal]


def test_stochastic_round_scaled_just_above_minus_half():
    """P(up) is y - floor(y) exactly: with y = -1/2 + 2**-54 the draw u = 1/2 must round up
    (u < 1/2 + 2**-54), which a rounded remainder (exactly 1/2) refused."""
    from edgefa.fpga_sim.fixed import round_scaled

    class Half:                                              # a generator whose every draw is 1/2
        def random(self, shape):
            return np.full(shape, 0.5)

    fmt = FixedFormat(16, 8, rounding=Rounding.STOCHASTIC, overflow=Overflow.SAT)
    y = np.array([np.nextafter(-0.5, 0.0), -0.5, np.nextafter(0.5, 1.0), 0.5, -1.0, 2.0])
    assert ints(round_scaled(y, fmt, Half()).raw) == [0, -1, 1, 0, -1, 2]


@pytest.mark.parametrize("mode", DETERMINISTIC, ids=lambda m: m.value)
def test_matmul_requantize_agrees_with_the_two_step_route_at_minus_half(mode):
    """a @ b = -(2**53 - 1) product LSBs = -1/2 + 2**-54 output LSBs (the float above -1/2)."""
    from edgefa.fpga_sim.ops import matmul_requantize

    a_fmt = b_fmt = FixedFormat(32, 5)                      # 27 fraction bits each
    acc = FixedFormat(64, 10, rounding=mode, overflow=Overflow.SAT)      # 54: no shift into it
    out = FixedFormat(16, 16, rounding=mode, overflow=Overflow.SAT)      # integers: 54 bits below
    a = np.array([[-6361 * 69431], [6361 * 69431]], np.int64)           # (2**53 - 1) factored
    b = np.array([[20394401, -20394401 + 1]], np.int64)
    fast, overflows = matmul_requantize(a, a_fmt, b, b_fmt, acc, out)
    q = matmul(a, a_fmt, b, b_fmt, acc)
    two_step = requantize(q.raw, acc.frac_bits, out)
    assert overflows == q.overflows == 0
    assert ints(fast.raw) == ints(two_step.raw)
    exact = [Fraction(int(x) * int(y), 1 << 54) for x in a[:, 0] for y in b[0]]
    assert ints(fast.raw) == [ref_round(v, mode) for v in exact]
