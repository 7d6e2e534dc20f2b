"""Fixed-point formats and quantization with `ap_fixed` semantics, on raw integers.

A value is held as its raw bit pattern: an int64 array `raw` and a format; the real value is
raw * 2**-frac_bits. Nothing is ever a float rounded after the fact: every conversion between
formats is an integer shift, a rounding decision from the bits shifted out, and an overflow rule.

Vocabulary (Vivado HLS / hls4ml):
    ap_fixed<W,I[,Q[,O]]>   signed, W bits in all, I of them integer bits (the sign included)
    ap_ufixed<W,I[,Q[,O]]>  unsigned
    Qm.n / UQm.n            the same as ap_fixed<m+n,m> / ap_ufixed<m+n,m> (ARM's convention:
                            m counts the sign bit, so Q8.8 is a 16-bit word with 8 fraction bits)
I may be negative or larger than W (ap_fixed allows both); the fraction bits are F = W - I.

Rounding (what the bits shifted out decide; "half" means exactly half an LSB):
    AP_TRN          toward minus infinity (drop the bits; the hardware default)
    AP_TRN_ZERO     toward zero
    AP_RND          to nearest, half toward plus infinity
    AP_RND_ZERO     to nearest, half toward zero
    AP_RND_MIN_INF  to nearest, half toward minus infinity
    AP_RND_INF      to nearest, half away from zero
    AP_RND_CONV     to nearest, half to even (convergent)
    STOCHASTIC      up with probability (bits shifted out) / 2**shift, from a seeded generator
                    (Gupta et al., ICML 2015); exact in integers: up iff u < remainder, with u
                    drawn uniformly from 0 .. 2**shift - 1
Overflow (after rounding):
    AP_WRAP         keep the low W bits (two's complement); the default
    AP_SAT          clamp to [min, max]
    AP_SAT_ZERO     out of range becomes 0
    AP_SAT_SYM      clamp to [-max, max] for signed formats: the most negative code is not used
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from enum import Enum

import numpy as np

from ..errors import EdgefaError

MAX_WIDTH = 64          # raw values live in int64
MAX_FLOAT_WIDTH = 52    # float64 holds every integer of this many bits (and a sign) exactly


class FixedPointError(EdgefaError):
    """A format or mode that does not exist or is not supported (a bad config, say)."""


class Rounding(str, Enum):
    TRN = "AP_TRN"
    TRN_ZERO = "AP_TRN_ZERO"
    RND = "AP_RND"
    RND_ZERO = "AP_RND_ZERO"
    RND_MIN_INF = "AP_RND_MIN_INF"
    RND_INF = "AP_RND_INF"
    RND_CONV = "AP_RND_CONV"
    STOCHASTIC = "STOCHASTIC"


class Overflow(str, Enum):
    WRAP = "AP_WRAP"
    SAT = "AP_SAT"
    SAT_ZERO = "AP_SAT_ZERO"
    SAT_SYM = "AP_SAT_SYM"


def _enum(kind, text: str):
    key = text.strip().upper()
    for member in kind:
        if key in (member.value, member.name, member.value.removeprefix("AP_")):
            return member
    names = ", ".join(m.value for m in kind)
    raise FixedPointError(f"unknown {kind.__name__.lower()} mode {text!r} (one of {names})")


def rounding_mode(text: str | Rounding) -> Rounding:
    return text if isinstance(text, Rounding) else _enum(Rounding, text)


def overflow_mode(text: str | Overflow) -> Overflow:
    return text if isinstance(text, Overflow) else _enum(Overflow, text)


@dataclass(frozen=True)
class FixedFormat:
    width: int                      # W: bits in all
    int_bits: int                   # I: integer bits, the sign bit included for signed formats
    signed: bool = True
    rounding: Rounding = Rounding.TRN
    overflow: Overflow = Overflow.WRAP

    def __post_init__(self):
        for name in ("width", "int_bits"):
            if not isinstance(getattr(self, name), (int, np.integer)) or isinstance(getattr(self, name), bool):
                raise FixedPointError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if not 1 <= self.width <= MAX_WIDTH:
            raise FixedPointError(f"word length {self.width} is out of range: 1 to {MAX_WIDTH} bits")
        if self.signed and self.width < 2:
            raise FixedPointError("a signed format needs at least 2 bits")
        if not self.signed and self.width > MAX_WIDTH - 1:
            raise FixedPointError(f"an unsigned format holds at most {MAX_WIDTH - 1} bits here (int64 raw values)")
        if abs(self.int_bits) > 4 * MAX_WIDTH:
            raise FixedPointError(f"integer bits {self.int_bits} are out of range")
        object.__setattr__(self, "rounding", rounding_mode(self.rounding))
        object.__setattr__(self, "overflow", overflow_mode(self.overflow))

    # --- what the format can hold ------------------------------------------------------------
    @property
    def frac_bits(self) -> int:
        return self.width - self.int_bits

    @property
    def raw_min(self) -> int:
        if not self.signed:
            return 0
        low = -(1 << (self.width - 1))
        return low + 1 if self.overflow is Overflow.SAT_SYM else low

    @property
    def raw_max(self) -> int:
        return (1 << (self.width - 1)) - 1 if self.signed else (1 << self.width) - 1

    @property
    def lsb(self) -> float:
        return 2.0 ** -self.frac_bits

    @property
    def max_abs_raw(self) -> int:
        return max(abs(self.raw_min), self.raw_max)

    def with_(self, **changes) -> "FixedFormat":
        return replace(self, **changes)

    def __str__(self) -> str:
        kind = "ap_fixed" if self.signed else "ap_ufixed"
        return f"{kind}<{self.width},{self.int_bits},{self.rounding.value},{self.overflow.value}>"

    # --- conversions -------------------------------------------------------------------------
    def to_float(self, raw: np.ndarray) -> np.ndarray:
        """The real values, in float64 (exact for W <= 53)."""
        return np.ldexp(np.asarray(raw, dtype=np.float64), -self.frac_bits)


_AP = re.compile(r"^ap_(u?)fixed\s*<\s*(-?\d+)\s*,\s*(-?\d+)\s*(?:,\s*(\w+)\s*)?(?:,\s*(\w+)\s*)?>$", re.I)
_Q = re.compile(r"^(u?)q(-?\d+)\.(\d+)$", re.I)


def parse_format(text: str, rounding: str | Rounding | None = None,
                 overflow: str | Overflow | None = None) -> FixedFormat:
    """`ap_fixed<16,8>`, `ap_ufixed<8,0,AP_RND,AP_SAT>`, `Q8.8` or `UQ4.12` -> FixedFormat.
    `rounding`/`overflow` apply where the text names none."""
    s = str(text).strip()
    if m := _AP.match(s):
        unsigned, w, i, q, o = m.groups()
        width, int_bits = int(w), int(i)
    elif m := _Q.match(s):
        unsigned, i, f = m.groups()
        q = o = None
        int_bits, width = int(i), int(i) + int(f)
    else:
        raise FixedPointError(f"cannot read the fixed-point format {text!r} "
                              "(write ap_fixed<W,I>, ap_ufixed<W,I,AP_RND,AP_SAT> or Q8.8)")
    if q and not o and q.upper() in {m.value for m in Overflow} | {m.value.removeprefix("AP_") for m in Overflow}:
        raise FixedPointError(f"{text!r}: {q} is an overflow mode; the rounding mode comes first "
                              f"(ap_fixed<{width},{int_bits},AP_TRN,{q}>)")
    return FixedFormat(width, int_bits, signed=not unsigned,
                       rounding=q or rounding or Rounding.TRN, overflow=o or overflow or Overflow.WRAP)


# --- the two primitives: shift with rounding, and overflow ------------------------------------

def _as_raw(raw) -> np.ndarray:
    a = np.asarray(raw)
    if a.dtype != np.int64:
        if not np.issubdtype(a.dtype, np.integer):
            raise FixedPointError(f"raw values must be integers, got {a.dtype}")
        a = a.astype(np.int64)
    return a


def shift_round(raw, shift: int, rounding: Rounding, rng: np.random.Generator | None = None) -> np.ndarray:
    """raw / 2**shift rounded by `rounding` (shift > 0), or raw * 2**-shift exactly (shift <= 0).

    Left shifts are exact only while the result fits in int64; callers check widths first."""
    raw = _as_raw(raw)
    if shift <= 0:
        return raw << np.int64(-shift) if shift else raw.copy()
    if shift >= 63:                                   # everything but the sign is shifted out
        floor = np.where(raw < 0, np.int64(-1), np.int64(0))
        if rounding in (Rounding.TRN,):
            return floor
        # the remainder raw - floor * 2**shift needs more than 64 bits: use Python integers
        return np.array([_round_int(int(v), shift, rounding, rng) for v in raw.ravel()],
                        dtype=np.int64).reshape(raw.shape)
    floor = raw >> np.int64(shift)                    # arithmetic shift: toward minus infinity
    if rounding is Rounding.TRN:
        return floor
    rem = raw & np.int64((1 << shift) - 1)            # bits shifted out, 0 .. 2**shift - 1
    half = np.int64(1 << (shift - 1))
    if rounding is Rounding.TRN_ZERO:
        up = (rem != 0) & (raw < 0)
    elif rounding is Rounding.RND:
        up = rem >= half
    elif rounding is Rounding.RND_ZERO:
        up = (rem > half) | ((rem == half) & (raw < 0))
    elif rounding is Rounding.RND_MIN_INF:
        up = rem > half
    elif rounding is Rounding.RND_INF:
        up = (rem > half) | ((rem == half) & (raw >= 0))
    elif rounding is Rounding.RND_CONV:
        up = (rem > half) | ((rem == half) & ((floor & 1) == 1))
    elif rounding is Rounding.STOCHASTIC:
        if rng is None:
            raise FixedPointError("stochastic rounding needs a seeded generator")
        up = rng.integers(0, 1 << shift, size=raw.shape, dtype=np.int64) < rem
    else:                                              # pragma: no cover - the enum is closed
        raise AssertionError(rounding)
    return floor + up


def _round_int(v: int, shift: int, rounding: Rounding, rng) -> int:
    """One value in Python integers (used only for shifts of 63 bits or more)."""
    floor, rem, half = v >> shift, v & ((1 << shift) - 1), 1 << (shift - 1)
    up = {Rounding.TRN_ZERO: rem != 0 and v < 0,
          Rounding.RND: rem >= half,
          Rounding.RND_ZERO: rem > half or (rem == half and v < 0),
          Rounding.RND_MIN_INF: rem > half,
          Rounding.RND_INF: rem > half or (rem == half and v >= 0),
          Rounding.RND_CONV: rem > half or (rem == half and floor & 1 == 1)}.get(rounding)
    if rounding is Rounding.STOCHASTIC:
        up = int(rng.integers(0, 1 << 62)) * (1 << (shift - 62)) < rem
    return floor + int(up)


def out_of_range(raw: np.ndarray, fmt: FixedFormat) -> np.ndarray:
    """Where raw values do not fit the format (before its overflow rule is applied)."""
    return (raw < fmt.raw_min) | (raw > fmt.raw_max)


def apply_overflow(raw, fmt: FixedFormat) -> np.ndarray:
    """Bring integers into the format's range by its overflow rule."""
    raw = _as_raw(raw)
    mode = fmt.overflow
    if mode is Overflow.WRAP:
        if fmt.width == 64:
            return raw.copy()                                  # int64 arithmetic already wrapped
        low = raw & np.int64((1 << fmt.width) - 1)             # the low W bits, as unsigned
        if fmt.signed:                                         # sign-extend bit W-1
            sign = np.int64(1 << (fmt.width - 1))
            low = (low ^ sign) - sign
        return low
    if mode is Overflow.SAT_ZERO:
        return np.where(out_of_range(raw, fmt), np.int64(0), raw)
    return np.clip(raw, fmt.raw_min, fmt.raw_max)             # AP_SAT and AP_SAT_SYM


@dataclass
class Quantized:
    """Raw values in a format, with how many of them overflowed on the way in."""
    raw: np.ndarray
    fmt: FixedFormat
    overflows: int = 0

    def to_float(self) -> np.ndarray:
        return self.fmt.to_float(self.raw)


def requantize(raw, src_frac_bits: int, fmt: FixedFormat,
               rng: np.random.Generator | None = None) -> Quantized:
    """Integers with `src_frac_bits` fraction bits -> `fmt`: shift, round, overflow.

    A left shift (the target has more fraction bits) is exact; where it would leave int64 the value
    is out of every format's range, and is wrapped (the int64 shift is right modulo 2**64) or
    saturated by its sign."""
    raw = _as_raw(raw)
    shift = src_frac_bits - fmt.frac_bits
    if shift >= 0:
        shifted = shift_round(raw, shift, fmt.rounding, rng)
        n_over = int(np.count_nonzero(out_of_range(shifted, fmt)))
        return Quantized(apply_overflow(shifted, fmt), fmt, n_over)
    left = -shift
    if left >= 63:
        beyond = raw != 0
    else:
        beyond = (raw >= (1 << (63 - left))) | (raw < -(1 << (63 - left)))
    shifted = raw << np.int64(left) if left < 64 else np.zeros_like(raw)   # modulo 2**64
    over = beyond | out_of_range(shifted, fmt)
    if fmt.overflow is Overflow.WRAP:
        out = apply_overflow(shifted, fmt)
    elif fmt.overflow is Overflow.SAT_ZERO:
        out = np.where(over, np.int64(0), shifted)
    else:
        out = np.where(beyond, np.where(raw > 0, np.int64(fmt.raw_max), np.int64(fmt.raw_min)),
                       np.clip(shifted, fmt.raw_min, fmt.raw_max))
    return Quantized(out, fmt, int(np.count_nonzero(over)))


def quantize(values, fmt: FixedFormat, rng: np.random.Generator | None = None) -> Quantized:
    """Real values (floats) -> raw values in `fmt`, rounding and overflowing as the format says.

    Exact: x * 2**F is exact in float64 (a power-of-two scale), and its floor and remainder are
    too, so every rounding decision is taken on the true value; only then does it become int64."""
    x = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise FixedPointError(f"cannot quantize NaN or Inf to {fmt}")
    if fmt.width > MAX_FLOAT_WIDTH:
        raise FixedPointError(f"quantizing floats needs a format of at most {MAX_FLOAT_WIDTH} bits, got {fmt}")
    y = np.ldexp(x, fmt.frac_bits)
    if not np.all(np.isfinite(y)):
        raise FixedPointError(f"values too large for any rounding into {fmt}")
    # With F < 0 a tiny x can underflow to (-)0, which would round as an exact zero; the smallest
    # subnormal of the same sign takes every rounding decision the true value would.
    y = np.where((y == 0) & (x != 0), np.copysign(5e-324, x), y)
    return round_scaled(y, fmt, rng, overwrite=True)                  # y is our own temporary


def round_scaled(y: np.ndarray, fmt: FixedFormat, rng: np.random.Generator | None = None,
                 overwrite: bool = False) -> Quantized:
    """Finite float64 values already scaled by 2**F (so one LSB is 1.0) -> raw values in `fmt`:
    rounded by its rule, then overflowed. Exact for any float64 input and W <= 52.

    `overwrite=True` lets it round a float64 `y` in place (the caller's scratch, e.g. a matmul
    result): every fresh 0.5 MB temporary costs page faults on each call, which for a 256x256
    matmul cost more than the rounding itself."""
    mode = fmt.rounding
    scratch = y if overwrite and y.dtype == np.float64 else None
    if mode is Rounding.RND_CONV:
        rounded = np.rint(y, out=scratch)                    # IEEE round half to even: exact
    elif mode is Rounding.TRN:
        rounded = np.floor(y, out=scratch)
    else:
        # Every decision compares y itself with an exact float, never the remainder y - floor:
        # that is inexact for y in (-1/2, 0) (1 + y needs more bits than float64 has; the one
        # float just above -1/2 would read as an exact tie). floor + 1/2 is exact wherever y is
        # not an integer (then |y| < 2**52), and an integer y rounds to itself in every mode.
        floor = np.floor(y)
        fraction = y != floor
        mid = floor + 0.5
        above, tie = fraction & (y > mid), fraction & (y == mid)
        if mode is Rounding.TRN_ZERO:
            up = fraction & (y < 0)
        elif mode is Rounding.RND:
            up = above | tie
        elif mode is Rounding.RND_ZERO:
            up = above | (tie & (y < 0))
        elif mode is Rounding.RND_MIN_INF:
            up = above
        elif mode is Rounding.RND_INF:
            up = above | (tie & (y >= 0))
        else:                                                # stochastic: P(up) = y - floor
            if rng is None:
                raise FixedPointError("stochastic rounding needs a seeded generator")
            u = rng.random(y.shape)                          # multiples of 2**-53 in [0, 1)
            # u < y - floor, compared exactly: y - floor is exact unless floor is -1, and there
            # u - 1 is (a multiple of 2**-53 in [-1, 0)).
            up = np.where(floor == -1, u - 1.0 < y, u < y - floor)
        rounded = floor + up
    # Out-of-range values are handled in float (exact: integer-valued, power-of-two bounds) so that
    # magnitudes beyond int64 still wrap or saturate correctly.
    lo, hi = float(fmt.raw_min), float(fmt.raw_max)
    if rounded.size == 0 or (rounded.min() >= lo and rounded.max() <= hi):   # two cheap reductions
        return Quantized(rounded.astype(np.int64), fmt, 0)
    if fmt.overflow in (Overflow.SAT, Overflow.SAT_SYM):    # clamp and convert in one pass
        n_over = int(np.count_nonzero(rounded < lo)) + int(np.count_nonzero(rounded > hi))
        return Quantized(np.clip(rounded, lo, hi, out=np.empty(rounded.shape, np.int64), casting="unsafe"),
                         fmt, n_over)
    over = (rounded < lo) | (rounded > hi)
    n_over = int(np.count_nonzero(over))
    if fmt.overflow is Overflow.WRAP:
        modulus = float(1 << fmt.width)
        wrapped = np.mod(rounded, modulus)                   # exact: |values| < 2**53 after fmod
        if fmt.signed:
            wrapped = np.where(wrapped >= modulus / 2, wrapped - modulus, wrapped)
        rounded = wrapped
    else:                                                    # AP_SAT_ZERO
        rounded = np.where(over, 0.0, rounded)
    return Quantized(rounded.astype(np.int64), fmt, n_over)
