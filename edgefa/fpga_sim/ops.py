"""Bit-exact fixed-point operations on raw integers: add, multiply, matmul, ReLU, tanh / sigmoid
tables, and the cross-entropy output error through a hardware softmax.

Every function takes raw int64 arrays with their formats and returns a `Quantized` (raw values,
format, how many values overflowed the format on the way in).

Matmul speed. The sum of products is an integer; it is computed exactly by the fastest route that
is provably exact:
  * float64 BLAS on integer-valued floats, when K * max|a| * max|b| < 2**53: every partial sum
    of every order BLAS may choose is then an integer below 2**53, which float64 holds exactly;
  * int64 matmul otherwise (numpy's integer loops; wraps modulo 2**64, which is exact for a
    wrapping accumulator of at most 64 bits).
A saturating accumulator saturates at every addition, in the order k = 0, 1, ..., K-1 starting
from 0, as a MAC unit would. Where the bound sum_k |a_ik| * max_k |b_kj| proves that no partial
sum of an output can leave the range, that output is the exact sum; only the others are
accumulated step by step. matmul_requantize's float64 route converts into per-thread scratch and
rounds the GEMM result in place: fresh half-megabyte temporaries each cost page faults on every call.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .fixed import (FixedFormat, FixedPointError, Overflow, Quantized, Rounding, apply_overflow,
                    out_of_range, quantize, requantize, round_scaled, shift_round)

FLOAT_EXACT = 2.0 ** 53


def _check_product_width(a: FixedFormat, b: FixedFormat) -> None:
    """Every product must fit int64: Wa + Wb <= 64 when either is signed (|a b| <= 2**62, or
    < 2**63 mixed), Wa + Wb <= 63 when both are unsigned ((2**Wa - 1)(2**Wb - 1) < 2**63)."""
    limit = 64 if (a.signed or b.signed) else 63
    if a.width + b.width > limit:
        raise FixedPointError(f"a product of {a} and {b} needs {a.width + b.width} bits"
                              f"{'' if limit == 64 else ' unsigned'}; at most {limit} are supported")


def _wrap_overflows(wrapped: np.ndarray, estimate: np.ndarray, fmt: FixedFormat) -> int:
    """How many exact sums lie outside `fmt`, given them modulo 2**64 (as int64) and a float64
    estimate: the estimate's error (far below 2**62 for any sum of int64 products that float64
    can count) fixes the multiple of 2**64, so the count is exact, also beyond +-2**63."""
    turns = np.rint((estimate - wrapped.astype(np.float64)) / 2.0 ** 64)
    return int(np.count_nonzero((turns != 0) | out_of_range(wrapped, fmt)))


# --- elementwise ------------------------------------------------------------------------------

def add(a: np.ndarray, a_fmt: FixedFormat, b: np.ndarray, b_fmt: FixedFormat, out: FixedFormat,
        rng: np.random.Generator | None = None) -> Quantized:
    """a + b, exact at the finer of the two scales, then rounded and overflowed into `out`."""
    frac = max(a_fmt.frac_bits, b_fmt.frac_bits)
    need = max(a_fmt.width + frac - a_fmt.frac_bits, b_fmt.width + frac - b_fmt.frac_bits) + 1
    if need > 63:
        raise FixedPointError(f"adding {a_fmt} and {b_fmt} needs {need} bits; at most 63 are supported")
    total = (np.asarray(a, np.int64) << np.int64(frac - a_fmt.frac_bits)) \
        + (np.asarray(b, np.int64) << np.int64(frac - b_fmt.frac_bits))
    return requantize(total, frac, out, rng)


def product_format(a: FixedFormat, b: FixedFormat) -> FixedFormat:
    """The full-width product format: W = Wa + Wb, I = Ia + Ib (nothing is lost)."""
    return FixedFormat(a.width + b.width, a.int_bits + b.int_bits, signed=a.signed or b.signed)


def mul(a: np.ndarray, a_fmt: FixedFormat, b: np.ndarray, b_fmt: FixedFormat) -> Quantized:
    """The exact, full-width product a * b (broadcasting), in `product_format(a_fmt, b_fmt)`."""
    _check_product_width(a_fmt, b_fmt)
    return Quantized(np.asarray(a, np.int64) * np.asarray(b, np.int64), product_format(a_fmt, b_fmt))


def relu(raw: np.ndarray) -> np.ndarray:
    return np.maximum(raw, 0)


# --- matmul -----------------------------------------------------------------------------------

def _exact_sum_of_products(a: np.ndarray, b: np.ndarray, bound: float) -> np.ndarray:
    """sum_k a[i,k] b[k,j] in int64: float64 BLAS when `bound` (a bound on every partial sum)
    is below 2**53, else int64 matmul (modulo 2**64)."""
    if bound < FLOAT_EXACT:
        return (a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)
    return a @ b


def _saturating_add(acc: np.ndarray, p: np.ndarray, fmt: FixedFormat) -> tuple[np.ndarray, np.ndarray]:
    """acc + p, saturated by `fmt`'s rule; also where it saturated. |acc| fits the format, |p| < 2**62."""
    total = acc + p                                    # may wrap in int64 only beyond any format
    wrapped = ((acc ^ total) & (p ^ total)) < 0        # true sum left int64: it is out of range too
    over = wrapped | out_of_range(total, fmt)
    if fmt.overflow is Overflow.SAT_ZERO:
        return np.where(over, np.int64(0), total), over
    high = np.where(wrapped, p > 0, total > fmt.raw_max)
    return np.where(over, np.where(high, np.int64(fmt.raw_max), np.int64(fmt.raw_min)), total), over


def matmul(a: np.ndarray, a_fmt: FixedFormat, b: np.ndarray, b_fmt: FixedFormat, acc: FixedFormat,
           rng: np.random.Generator | None = None, init: np.ndarray | None = None) -> Quantized:
    """[M,K] @ [K,N] into the accumulator format `acc`, each accumulator starting from `init`
    (raw values in `acc`, one per column: a bias; 0 when None).

    Each product is exact (Wa + Wb bits). Where `acc` has fewer fraction bits than a product, each
    product is rounded into it by `acc.rounding` before it is added (as a MAC with a narrow
    accumulator would); otherwise it is shifted left exactly. The sum then wraps (AP_WRAP:
    modular, so summed exactly and wrapped once) or saturates at every addition (the other modes).
    `overflows` counts wrapped outputs for AP_WRAP and saturating additions otherwise."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise FixedPointError(f"matmul shapes do not match: {a.shape} @ {b.shape}")
    _check_product_width(a_fmt, b_fmt)
    start = np.zeros(b.shape[1], np.int64) if init is None else np.broadcast_to(np.asarray(init, np.int64), (b.shape[1],))
    if np.any(out_of_range(start, acc)):
        raise FixedPointError(f"an accumulator's initial value does not fit {acc}")
    shift = a_fmt.frac_bits + b_fmt.frac_bits - acc.frac_bits
    if shift > 0:                                      # every product rounded on its own
        return _matmul_stepwise(a, b, acc, shift, rng, start)
    max_a = int(np.abs(a).max()) if a.size else 0
    max_b = int(np.abs(b).max()) if b.size else 0
    if acc.overflow is not Overflow.WRAP and (max_a * max_b) << -shift >= 1 << 62:
        raise FixedPointError(f"products of {a_fmt} and {b_fmt} shifted into {acc} need more than 62 bits")
    products_bound = float(a.shape[1]) * max_a * max_b                    # |sum of any products|
    bound = products_bound * 2.0 ** -shift + float(np.abs(start).max(initial=0))   # ... in acc LSBs
    if bound <= acc.raw_max and -bound >= acc.raw_min:           # no addition can leave the range
        return Quantized(_shift_left(_exact_sum_of_products(a, b, products_bound), -shift) + start, acc, 0)

    if acc.overflow is Overflow.WRAP:                  # modular: sum exactly (mod 2**64), wrap once
        exact = _shift_left(_exact_sum_of_products(a, b, products_bound), -shift) + start
        if bound < 2.0 ** 63:
            n_over = int(np.count_nonzero(out_of_range(exact, acc)))
        else:                                          # the exact sum is known modulo 2**64
            estimate = np.ldexp(a.astype(np.float64) @ b.astype(np.float64), -shift) + start
            n_over = _wrap_overflows(exact, estimate, acc)
        return Quantized(apply_overflow(exact, acc), acc, n_over)

    # Saturating. Per output: |partial sums| <= |init_j| + (sum_k |a_ik|) * max_k |b_kj|; the
    # outputs this proves safe are the exact sum; the others are accumulated step by step.
    row = np.abs(a).astype(np.float64).sum(axis=1)
    col = np.abs(b).astype(np.float64).max(axis=0)
    per_output = (np.outer(row, col) * 2.0 ** -shift + np.abs(start)) * (1 + 1e-9)
    safe = (per_output <= acc.raw_max) & (-per_output >= acc.raw_min)
    out = np.zeros((a.shape[0], b.shape[1]), np.int64)
    if safe.any():
        exact = _shift_left(_exact_sum_of_products(a, b, products_bound), -shift) + start
        out[safe] = exact[safe]                        # exact wherever the output is safe
    rows, cols = np.nonzero(~safe)
    acc_values, n_sat = start[cols].copy(), 0
    for kk in range(a.shape[1]):                       # in order, saturating at every addition
        p = (a[rows, kk] * b[kk, cols]) << np.int64(-shift)
        acc_values, sat = _saturating_add(acc_values, p, acc)
        n_sat += int(np.count_nonzero(sat))
    out[rows, cols] = acc_values
    return Quantized(out, acc, n_sat)


def _max_abs(x: np.ndarray) -> float:
    """max |x| without an |x| temporary (two reductions)."""
    return float(max(int(x.max()), -int(x.min()))) if x.size else 0.0


def _shift_left(raw: np.ndarray, bits: int) -> np.ndarray:
    return raw << np.int64(bits) if bits else raw


# Scratch for _float_matmul, one per thread: the float64 copies of A and B and the GEMM result.
# Fresh temporaries of this size come from the OS on every call (glibc hands freed ones back), and
# the page faults cost more than the rounding and the conversions together: at 256x256x256 they
# took a third of matmul_requantize's time. Bounded: it grows to the largest call below the cap.
_SCRATCH = threading.local()
SCRATCH_MAX_ELEMENTS = 1 << 22                         # 32 MB; beyond it the GEMM dominates anyway


def _float_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b in float64 for int64 a [M,K] and b [K,N], as a.astype(float64) @ b.astype(float64).
    The result is a view of this thread's scratch (valid until its next call) for calls up to
    SCRATCH_MAX_ELEMENTS in all, else a fresh array; callers may overwrite it."""
    (m, k), n = a.shape, b.shape[1]
    need = m * k + k * n + m * n
    if need > SCRATCH_MAX_ELEMENTS:
        return a.astype(np.float64) @ b.astype(np.float64)
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.size < need:
        buf = _SCRATCH.buf = np.empty(need, np.float64)
    fa, fb, total = (buf[:m * k].reshape(m, k), buf[m * k:m * k + k * n].reshape(k, n),
                     buf[m * k + k * n:need].reshape(m, n))
    np.copyto(fa, a, casting="unsafe")                 # the same conversion as astype
    np.copyto(fb, b, casting="unsafe")
    return np.matmul(fa, fb, out=total)


def matmul_requantize(a: np.ndarray, a_fmt: FixedFormat, b: np.ndarray, b_fmt: FixedFormat,
                      acc: FixedFormat, out: FixedFormat, rng: np.random.Generator | None = None,
                      init: np.ndarray | None = None) -> tuple[Quantized, int]:
    """`matmul` into `acc`, then requantized into `out`: the result in `out` and the number of
    accumulator overflows. Bit-identical to the two calls; faster where the accumulator provably
    holds every partial sum and the sum is below 2**53: the float64 BLAS result is then the exact
    sum, and it is rounded into `out` straight from float64 (a power-of-two scale, then the
    rounding rule: exact), never becoming an int64 accumulator in between. Stochastic rounding
    takes the two-step route, so its random draws do not depend on the route."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    shift = a_fmt.frac_bits + b_fmt.frac_bits - acc.frac_bits
    fast = (shift <= 0 and out.rounding is not Rounding.STOCHASTIC and out.width <= 52
            and a.ndim == 2 and b.ndim == 2 and a.shape[1] == b.shape[0] and a.size and b.size)
    if fast:
        _check_product_width(a_fmt, b_fmt)
        start = np.zeros(b.shape[1], np.int64) if init is None else \
            np.broadcast_to(np.asarray(init, np.int64), (b.shape[1],))
        products_bound = float(a.shape[1]) * _max_abs(a) * _max_abs(b)
        bound = products_bound * 2.0 ** -shift + _max_abs(start)
        if bound <= acc.raw_max and -bound >= acc.raw_min and bound < FLOAT_EXACT \
                and not np.any(out_of_range(start, acc)):
            # Every value here is a multiple of the accumulator's LSB below bound < 2**53 of them,
            # so the sum and the power-of-two scalings are exact in float64.
            total = _float_matmul(a, b)                                   # in product LSBs
            if init is not None:
                total += start * 2.0 ** shift
            total *= 2.0 ** (out.frac_bits - a_fmt.frac_bits - b_fmt.frac_bits)
            return round_scaled(total, out, rng, overwrite=True), 0
    q = matmul(a, a_fmt, b, b_fmt, acc, rng, init)
    return requantize(q.raw, acc.frac_bits, out, rng), q.overflows


def _matmul_stepwise(a, b, acc: FixedFormat, shift: int, rng, start: np.ndarray) -> Quantized:
    """Products rounded one by one into `acc`, accumulated in order k = 0..K-1 (an outer product
    per k). Wrapping sums are exact modulo 2**64 and wrapped once; saturating ones step by step."""
    out = np.broadcast_to(start, (a.shape[0], b.shape[1])).copy()
    n_over = 0
    wrap = acc.overflow is Overflow.WRAP
    estimate = out.astype(np.float64) if wrap else None
    for kk in range(a.shape[1]):
        p = shift_round(np.multiply.outer(a[:, kk], b[kk, :]), shift, acc.rounding, rng)
        if wrap:
            out += p                                   # modulo 2**64
            estimate += p
        else:
            out, sat = _saturating_add(out, p, acc)
            n_over += int(np.count_nonzero(sat))
    if wrap:
        n_over = _wrap_overflows(out, estimate, acc)
        out = apply_overflow(out, acc)
    return Quantized(out, acc, n_over)


# --- tanh and sigmoid by table ----------------------------------------------------------------

_FUNCTIONS = {"tanh": np.tanh, "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x))}


@dataclass(frozen=True)
class FunctionTable:
    """tanh or sigmoid over [-input_range, input_range) by a table of `size` entries.

    `lut`: the entry of the segment the input falls in, each entry f at the segment's centre.
    `pwl`: linear between f at the segment ends (size + 1 knots), the slope applied in integers.
    Outside the range the output is the table's end value (the end segment's entry for `lut`, f at
    the range end for `pwl`): choose `input_range` where f is flat enough (tanh at 4: 1 - 7e-4;
    sigmoid at 4 is still 0.018 from 1, so sigmoid wants 8).
    `size` and `input_range` are powers of two, so the segment index is the input's top bits
    (a shift), as in hardware."""
    function: str
    method: str
    size: int
    input_range: float
    in_fmt: FixedFormat
    out_fmt: FixedFormat

    def __post_init__(self):
        if self.function not in _FUNCTIONS:
            raise FixedPointError(f"unknown table function {self.function!r} (tanh or sigmoid)")
        if self.method not in ("lut", "pwl"):
            raise FixedPointError(f"unknown table method {self.method!r} (lut or pwl)")
        for name, v in (("size", self.size), ("input_range", self.input_range)):
            if not (v > 0 and float(np.log2(v)).is_integer()):
                raise FixedPointError(f"table {name} must be a power of two, got {v}")
        if self.segment_shift < 0:
            raise FixedPointError(f"a {self.size}-entry table over +-{self.input_range} is finer than "
                                  f"the input's LSB ({self.in_fmt})")

    @property
    def segment_shift(self) -> int:
        """log2 of a segment's width in input LSBs."""
        return int(np.log2(2 * self.input_range)) + self.in_fmt.frac_bits - int(np.log2(self.size))

    @cached_property
    def _entries(self) -> np.ndarray:
        f = _FUNCTIONS[self.function]
        step = 2 * self.input_range / self.size
        edges = -self.input_range + step * np.arange(self.size + 1)
        knots = f(edges + step / 2)[:-1] if self.method == "lut" else f(edges)
        return quantize(knots, self.out_fmt.with_(rounding=Rounding.RND_CONV, overflow=Overflow.SAT)).raw

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw, np.int64)
        entries = self._entries
        offset = raw + np.int64(int(self.input_range * 2 ** self.in_fmt.frac_bits))   # >= 0 in range
        index = offset >> np.int64(self.segment_shift)
        below, above = index < 0, index >= self.size
        index = np.clip(index, 0, self.size - 1)
        if self.method == "lut":
            out = entries[index]
        else:
            within = offset - (index << np.int64(self.segment_shift))                    # 0 .. 2**s - 1
            slope = entries[index + 1] - entries[index]
            out = entries[index] + shift_round(slope * within, self.segment_shift, self.out_fmt.rounding)
        return np.where(below, entries[0], np.where(above, entries[-1], out))


# --- the output error of softmax cross-entropy --------------------------------------------------

@dataclass(frozen=True)
class SoftmaxError:
    """e = (softmax(z) - onehot(y)) / batch, the way a small accelerator computes it, with every
    intermediate held in `frac_bits` fraction bits (F):

    exp(z - max z) = 2**t with t = (z - max z) * log2(e) <= 0, log2(e) held in F bits. t splits
    into an integer part n >= 0 (a right shift by n) and a fraction x in [0, 1), and 2**x comes
    from a table of 2**(i / size), i = 0..size (F bits, rounded to nearest), interpolated linearly
    by the fraction's low bits: relative error about (ln 2)**2 / (8 size**2) + 2**-F (1.5e-5 for
    64 entries and F = 16). The row sum s then divides each term: p = round(2**F exp / s), one
    integer divider per row (a reciprocal table and a multiplier are the usual cheaper hardware;
    the divide is their exact limit). The division by the batch is a multiply by 1/batch held in
    F bits (exact for powers of two). The error goes into `out_fmt` by its rounding and overflow."""
    in_fmt: FixedFormat
    out_fmt: FixedFormat
    exp_table_size: int = 64
    frac_bits: int = 16

    def __post_init__(self):
        if not (self.exp_table_size >= 2 and float(np.log2(self.exp_table_size)).is_integer()):
            raise FixedPointError(f"the exp table size must be a power of two >= 2, got {self.exp_table_size}")
        if not int(np.log2(self.exp_table_size)) <= self.frac_bits <= 28:
            raise FixedPointError(f"softmax fraction bits must be log2(table size)..28, got {self.frac_bits}")
        if self.in_fmt.width + self.frac_bits + 1 > 62:
            raise FixedPointError(f"logits in {self.in_fmt} times log2(e) in {self.frac_bits} bits overflow int64")

    @cached_property
    def _exp2_table(self) -> np.ndarray:
        knots = 2.0 ** (np.arange(self.exp_table_size + 1) / self.exp_table_size)
        return np.round(knots * 2.0 ** self.frac_bits).astype(np.int64)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """softmax rows as raw integers with `frac_bits` fraction bits."""
        F = self.frac_bits
        z = np.asarray(logits, np.int64)
        d = z - z.max(axis=1, keepdims=True)                                    # <= 0
        log2e = int(round(np.log2(np.e) * 2 ** F))
        t = shift_round(d * log2e, self.in_fmt.frac_bits, Rounding.RND_CONV)    # F fraction bits
        n = -(t >> np.int64(F))                                                 # integer part, >= 0
        x = t & np.int64((1 << F) - 1)                                          # fraction, F bits
        low_bits = F - int(np.log2(self.exp_table_size))
        i, low = x >> np.int64(low_bits), x & np.int64((1 << low_bits) - 1)
        table = self._exp2_table
        mant = table[i] + shift_round((table[i + 1] - table[i]) * low, low_bits, Rounding.RND_CONV)
        exp = mant >> np.minimum(n, 62)                                         # 2**t, truncated
        total = exp.sum(axis=1, keepdims=True)                                  # >= 2**F (the max term)
        return (exp * (1 << F) + total // 2) // total                           # round to nearest

    def __call__(self, logits: np.ndarray, labels: np.ndarray, rng=None) -> Quantized:
        F = self.frac_bits
        p = self.probabilities(logits)
        onehot = np.zeros_like(p)
        onehot[np.arange(len(labels)), labels] = 1 << F
        recip = int(round(2 ** F / len(labels)))                                # 1/batch, F bits
        return requantize((p - onehot) * recip, 2 * F, self.out_fmt, rng)
