"""Cross-check of edgefa.fpga_sim against apytypes (a dev dependency), bit for bit on raw values.

apytypes' fixed-point numbers are signed two's complement with arbitrary precision; its
quantization modes are named by tie rule (TO_NEG, TIES_EVEN, ...) and it has only WRAP and SAT
overflow, so the cross-check covers the seven deterministic roundings x {AP_WRAP, AP_SAT} for
signed formats. Inputs are random, from fixed seeds.
"""

from __future__ import annotations

import apytypes as apy
import numpy as np
import pytest

from edgefa.fpga_sim.fixed import FixedFormat, Overflow, Rounding, quantize, requantize
from edgefa.fpga_sim.ops import matmul

QM, OM = apy.QuantizationMode, apy.OverflowMode
A = apy.APyFixedArray

ROUNDING = {
    Rounding.TRN: QM.TO_NEG,              # toward -inf
    Rounding.TRN_ZERO: QM.TO_ZERO,        # toward zero
    Rounding.RND: QM.TIES_POS,            # nearest, ties toward +inf
    Rounding.RND_ZERO: QM.TIES_ZERO,      # nearest, ties toward zero
    Rounding.RND_MIN_INF: QM.TIES_NEG,    # nearest, ties toward -inf
    Rounding.RND_INF: QM.TIES_AWAY,       # nearest, ties away from zero
    Rounding.RND_CONV: QM.TIES_EVEN,      # nearest, ties to even
}
OVERFLOW = {Overflow.WRAP: OM.WRAP, Overflow.SAT: OM.SAT}
MODES = [(r, o) for r in ROUNDING for o in OVERFLOW]
MODE_IDS = [f"{r.value}-{o.value}" for r, o in MODES]


def signed_bits(arr: "apy.APyFixedArray") -> np.ndarray:
    """apytypes' bit patterns (unsigned words) -> signed raw integers."""
    w = arr.bits
    bits = [int(v) for v in np.asarray(arr.to_bits(), dtype=object).ravel()]
    return np.array([v - (1 << w) if v >= 1 << (w - 1) else v for v in bits], dtype=object).reshape(arr.shape)


def as_apy(raw: np.ndarray, fmt: FixedFormat) -> "apy.APyFixedArray":
    return A(np.asarray(raw).tolist(), int_bits=fmt.int_bits, frac_bits=fmt.frac_bits)


def apy_cast(x: "apy.APyFixedArray", int_bits: int, frac_bits: int, rounding: Rounding,
             overflow: Overflow) -> "apy.APyFixedArray":
    """Round, then overflow, as apytypes casts through a wide (> 128-bit) intermediate.

    apytypes 0.5.1 gets a rounding carry wrong when a 64-bit word rounds up past bit 63 into a
    narrower result: APyFixedArray([2**63 - 1], int_bits=59, frac_bits=5) cast to int_bits=60,
    frac_bits=-5 with TIES_NEG (or TIES_POS, TO_POS) gives 27021597764222976 where 2**53 is right
    (it is right with int_bits=70); one-step with SAT into int_bits=37 it gives -2**31, not 2**31 - 1.
    Widening first, and rounding into a result of over 128 bits, avoids it."""
    wide = x.cast(int_bits=x.int_bits + 64, frac_bits=x.frac_bits)            # exact
    rounded = wide.cast(int_bits=max(wide.int_bits + 1, 130 - frac_bits), frac_bits=frac_bits,
                        quantization=ROUNDING[rounding], overflow=OM.WRAP)     # cannot overflow
    return rounded.cast(int_bits=int_bits, frac_bits=frac_bits, overflow=OVERFLOW[overflow])


def same(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    assert [int(v) for v in ours.ravel()] == [int(v) for v in theirs.ravel()]


# --- the mode mapping, checked against apytypes itself --------------------------------------------

@pytest.mark.parametrize("ours,theirs", list(ROUNDING.items()), ids=lambda m: getattr(m, "value", str(m)))
def test_apytypes_ap_named_mode_agrees(ours, theirs):
    """apytypes also has ap_fixed-named modes (TRN, RND_CONV, ...): they behave as the tie-named
    ones we map to, on every value with 4 fraction bits in [-4, 4) cast to 1 fraction bit."""
    ap_named = getattr(QM, ours.value.removeprefix("AP_"))
    probe = A(list(range(-64, 64)), int_bits=3, frac_bits=4)
    one = signed_bits(probe.cast(int_bits=4, frac_bits=1, quantization=ap_named))
    two = signed_bits(probe.cast(int_bits=4, frac_bits=1, quantization=theirs))
    same(one, two)


@pytest.mark.parametrize("ours,theirs", list(ROUNDING.items()), ids=lambda m: getattr(m, "value", str(m)))
def test_apytypes_rounding_on_halves(ours, theirs):
    """Behaviour, not just names: +-0.5, +-1.5, +-2.5, +-0.75, +-0.25 to integers."""
    xs = [0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.75, -0.75, 0.25, -0.25]
    expected = {
        Rounding.TRN: [0, -1, 1, -2, 2, -3, 0, -1, 0, -1],
        Rounding.TRN_ZERO: [0, 0, 1, -1, 2, -2, 0, 0, 0, 0],
        Rounding.RND: [1, 0, 2, -1, 3, -2, 1, -1, 0, 0],
        Rounding.RND_ZERO: [0, 0, 1, -1, 2, -2, 1, -1, 0, 0],
        Rounding.RND_MIN_INF: [0, -1, 1, -2, 2, -3, 1, -1, 0, 0],
        Rounding.RND_INF: [1, -1, 2, -2, 3, -3, 1, -1, 0, 0],
        Rounding.RND_CONV: [0, 0, 2, -2, 2, -2, 1, -1, 0, 0],
    }[ours]
    exact = A.from_float(xs, int_bits=8, frac_bits=4)
    same(signed_bits(exact.cast(int_bits=8, frac_bits=0, quantization=theirs, overflow=OM.WRAP)),
         np.array(expected, dtype=object))
    same(quantize(xs, FixedFormat(8, 8, rounding=ours)).raw, np.array(expected))


# --- quantization from floats -----------------------------------------------------------------

def random_format(rng, max_w=32) -> tuple[int, int]:
    w = int(rng.integers(2, max_w + 1))
    return w, w - int(rng.integers(-6, w + 7))        # (width, int_bits); F = W - I in -6 .. W + 6


def exact_floats(rng, frac_bits: int, n: int) -> tuple[np.ndarray, int]:
    """Floats exactly representable with frac_bits + 24 fraction bits (so apytypes' from_float
    holds them exactly), a quarter of them exactly half an LSB of the target format."""
    extra = 24
    mant = rng.integers(-(1 << 50), 1 << 50, n)
    mant >>= rng.integers(0, 48, n)                    # a spread of magnitudes
    x = np.ldexp(mant.astype(np.float64), -(frac_bits + extra))
    halves = rng.integers(-(1 << 20), 1 << 20, n // 4) * 2 + 1
    x[: n // 4] = np.ldexp(halves.astype(np.float64), -(frac_bits + 1))
    return x, frac_bits + extra


@pytest.mark.parametrize("rounding,overflow", MODES, ids=MODE_IDS)
def test_quantize_from_float_matches_apytypes(rounding, overflow):
    rng = np.random.default_rng(list(ROUNDING).index(rounding) * 10 + list(OVERFLOW).index(overflow))
    for _ in range(25):
        w, i = random_format(rng)
        fmt = FixedFormat(w, i, rounding=rounding, overflow=overflow)
        x, src_frac = exact_floats(rng, fmt.frac_bits, 64)
        src = A.from_float(x, int_bits=80, frac_bits=src_frac)   # exact (checked next)
        assert [float(v) for v in src.to_numpy()] == list(x)
        theirs = apy_cast(src, i, w - i, rounding, overflow)
        same(quantize(x, fmt).raw, signed_bits(theirs))


# --- requantization between formats -----------------------------------------------------------

@pytest.mark.parametrize("rounding,overflow", MODES, ids=MODE_IDS)
def test_requantize_matches_apytypes(rounding, overflow):
    rng = np.random.default_rng(100 + list(ROUNDING).index(rounding) * 10 + list(OVERFLOW).index(overflow))
    for _ in range(25):
        src_w, src_i = random_format(rng, max_w=64)
        src = FixedFormat(src_w, src_i)
        w, i = random_format(rng, max_w=64)
        fmt = FixedFormat(w, i, rounding=rounding, overflow=overflow)
        lo, hi = -(1 << (src_w - 1)), (1 << (src_w - 1)) - 1
        raw = np.concatenate([rng.integers(lo, hi, 60, endpoint=True), [lo, hi, 0, -1, 1]]).astype(np.int64)
        mask = (1 << min(62, max(1, src.frac_bits - fmt.frac_bits))) - 1
        raw[:10] = (raw[:10] & ~np.int64(mask)) | np.int64((mask + 1) // 2)   # exact halves
        raw = np.clip(raw, lo, hi)
        theirs = apy_cast(as_apy(raw, src), i, w - i, rounding, overflow)
        same(requantize(raw, src.frac_bits, fmt).raw, signed_bits(theirs))


# --- matmul -----------------------------------------------------------------------------------

def apy_mac(a, a_fmt, b, b_fmt, acc: FixedFormat) -> "apy.APyFixedArray":
    """The sequential MAC in apytypes: acc = 0; for k: acc = cast(acc + cast(a[:,k] outer b[k,:]))
    (each product rounded into the accumulator's fraction bits, the sum saturated every step)."""
    A_, B_ = as_apy(a, a_fmt), as_apy(b, b_fmt)
    total = A.zeros((a.shape[0], b.shape[1]), int_bits=acc.int_bits, frac_bits=acc.frac_bits)
    for kk in range(a.shape[1]):
        p = apy_cast(A_[:, kk].outer(B_[kk, :]), 200, acc.frac_bits, acc.rounding, Overflow.WRAP)
        total = (total + p).cast(int_bits=acc.int_bits, frac_bits=acc.frac_bits, overflow=OM.SAT)
    return total


def random_operands(rng, a_fmt, b_fmt, m, k, n):
    def draw(fmt, shape):
        lo, hi = -(1 << (fmt.width - 1)), (1 << (fmt.width - 1)) - 1
        x = rng.integers(lo, hi, shape, endpoint=True)
        return x >> rng.integers(0, fmt.width - 1, (shape[0], 1))   # rows of mixed magnitude
    return draw(a_fmt, (m, k)), draw(b_fmt, (n, k)).T.copy()


@pytest.mark.parametrize("rounding", list(ROUNDING), ids=lambda m: m.value)
def test_matmul_wrap_matches_apytypes(rounding):
    """AP_WRAP: apytypes' full-precision A @ B, cast (wrapped) into the accumulator; with fewer
    fraction bits in the accumulator, the products are rounded one by one before the sum."""
    rng = np.random.default_rng(200 + list(ROUNDING).index(rounding))
    for trial in range(12):
        wa, wb = (32, 32) if trial % 3 == 0 else (int(rng.integers(4, 17)), int(rng.integers(4, 17)))
        a_fmt, b_fmt = FixedFormat(wa, int(rng.integers(0, wa))), FixedFormat(wb, int(rng.integers(0, wb)))
        m, k, n = (int(v) for v in rng.integers(1, 10, 3))
        a, b = random_operands(rng, a_fmt, b_fmt, m, k, n)
        prod_frac = a_fmt.frac_bits + b_fmt.frac_bits
        f = prod_frac + int(rng.integers(-8, 6))
        w = 64 if trial % 2 else int(rng.integers(8, 63))
        acc = FixedFormat(w, w - f, rounding=rounding, overflow=Overflow.WRAP)
        ours = matmul(a, a_fmt, b, b_fmt, acc)
        if f >= prod_frac:
            full = as_apy(a, a_fmt) @ as_apy(b, b_fmt)
            theirs = full.cast(int_bits=acc.int_bits, frac_bits=acc.frac_bits, overflow=OM.WRAP)
        else:                                             # per-product rounding, then one wrap
            A_, B_ = as_apy(a, a_fmt), as_apy(b, b_fmt)
            total = None
            for kk in range(k):
                p = apy_cast(A_[:, kk].outer(B_[kk, :]), 200, f, rounding, Overflow.WRAP)
                total = p if total is None else total + p
            theirs = total.cast(int_bits=acc.int_bits, frac_bits=f, overflow=OM.WRAP)
        same(ours.raw, signed_bits(theirs))


@pytest.mark.parametrize("rounding", list(ROUNDING), ids=lambda m: m.value)
def test_matmul_sat_matches_apytypes(rounding):
    """AP_SAT: saturating at every addition, k = 0 .. K-1 (the apytypes MAC above); where no
    partial sum saturates, this is also apytypes' full-precision A @ B cast with SAT."""
    rng = np.random.default_rng(300 + list(ROUNDING).index(rounding))
    saturated = unsaturated = 0
    for trial in range(12):
        wa, wb = (31, 31) if trial % 4 == 0 else (int(rng.integers(4, 17)), int(rng.integers(4, 17)))
        a_fmt, b_fmt = FixedFormat(wa, int(rng.integers(0, wa))), FixedFormat(wb, int(rng.integers(0, wb)))
        m, k, n = (int(v) for v in rng.integers(1, 10, 3))
        a, b = random_operands(rng, a_fmt, b_fmt, m, k, n)
        prod_frac = a_fmt.frac_bits + b_fmt.frac_bits
        f = prod_frac + int(rng.integers(-8, 2))
        # integer bits: from a few fewer than the products' (saturating often) to a few more
        i_acc = a_fmt.int_bits + b_fmt.int_bits + int(rng.integers(-6, 4))
        w = 64 if trial % 4 == 0 else int(np.clip(f + i_acc, 4, 64))
        acc = FixedFormat(w, w - f, rounding=rounding, overflow=Overflow.SAT)
        ours = matmul(a, a_fmt, b, b_fmt, acc)
        same(ours.raw, signed_bits(apy_mac(a, a_fmt, b, b_fmt, acc)))
        if ours.overflows == 0 and f >= prod_frac:
            full = (as_apy(a, a_fmt) @ as_apy(b, b_fmt)).cast(int_bits=acc.int_bits, frac_bits=f, overflow=OM.SAT)
            same(ours.raw, signed_bits(full))
        saturated += ours.overflows > 0
        unsaturated += ours.overflows == 0
    assert saturated and unsaturated                      # both kinds of case were exercised


@pytest.mark.parametrize("rounding,overflow", MODES, ids=MODE_IDS)
def test_q88_matmul_then_requantize_matches_apytypes(rounding, overflow):
    """The issue's workload in small: Q8.8 x Q8.8 into a 32-bit accumulator, then back to Q8.8."""
    rng = np.random.default_rng(400 + list(ROUNDING).index(rounding) * 10 + list(OVERFLOW).index(overflow))
    q88 = FixedFormat(16, 8)
    acc = FixedFormat(40, 24, overflow=overflow)                   # 16 fraction bits: exact products
    out = FixedFormat(16, 8, rounding=rounding, overflow=overflow)
    x = rng.standard_normal((8, 24)) * 4
    y = rng.standard_normal((24, 6)) * 4
    a = quantize(x, q88.with_(rounding=rounding, overflow=overflow)).raw
    b = quantize(y, q88.with_(rounding=rounding, overflow=overflow)).raw
    same(a, signed_bits(apy_cast(A.from_float(x, int_bits=20, frac_bits=100), 8, 8, rounding, overflow)))
    s = matmul(a, q88, b, q88, acc)
    full = as_apy(a, q88) @ as_apy(b, q88)
    theirs_acc = full.cast(int_bits=24, frac_bits=16, overflow=OVERFLOW[overflow])
    same(s.raw, signed_bits(theirs_acc))
    r = requantize(s.raw, acc.frac_bits, out)
    theirs = apy_cast(theirs_acc, 8, 8, rounding, overflow)
    same(r.raw, signed_bits(theirs))
