"""The fixed-point configuration of the DFA datapath: one format per tensor class, from TOML.

    # fxp.toml
    [formats]                       # ap_fixed<W,I[,rounding[,overflow]]>, Qm.n, or a table
    weights         = "ap_fixed<16,4,AP_RND_CONV,AP_SAT>"
    activations     = "ap_fixed<16,6,AP_RND_CONV,AP_SAT>"
    errors          = "ap_fixed<16,0,AP_RND_CONV,AP_SAT>"
    feedback        = "ap_fixed<8,2,AP_RND_CONV,AP_SAT>"
    gradients       = "ap_fixed<16,4,AP_RND_CONV,AP_SAT>"
    accumulators    = "ap_fixed<40,16,AP_TRN,AP_SAT>"
    optimizer_state = { width = 16, int_bits = 4, rounding = "AP_RND_CONV", overflow = "AP_SAT" }

    [learning_rate]
    mode = "multiplier"             # or "shift": lr = 2**-shift
    format = "ap_ufixed<16,0,AP_RND_CONV>"   # multiplier: how lr and momentum are held
    shift = 8                       # shift: used instead of the bundle's lr

    [tables]
    method = "pwl"                  # tanh by "lut" or "pwl"
    size = 64
    input_range = 4.0
    exp_table_size = 64             # softmax: the 2**x table of the output error (interpolated)
    softmax_frac_bits = 16          # softmax: fraction bits of its intermediates

    [run]
    seed = 0                        # stochastic rounding's generator

Every class not given takes the default below. Data formats are at most 32 bits; accumulators at
most 64. What the TOML gets wrong is one line naming the key.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .fixed import FixedFormat, FixedPointError, parse_format, quantize

if sys.version_info >= (3, 11):
    import tomllib
else:                                                      # pragma: no cover - Python 3.10 devices
    import tomli as tomllib

TENSOR_CLASSES = ("weights", "activations", "errors", "feedback", "gradients", "accumulators",
                  "optimizer_state")
MAX_DATA_WIDTH = 32
MAX_ACCUMULATOR_WIDTH = 64
MAX_LR_SHIFT = 40               # learning_rate.mode = "shift": lr = 2**-shift, shift 0..40

DEFAULT_FORMATS = {
    "weights": "ap_fixed<16,4,AP_RND_CONV,AP_SAT>",
    "activations": "ap_fixed<16,6,AP_RND_CONV,AP_SAT>",
    "errors": "ap_fixed<16,0,AP_RND_CONV,AP_SAT>",
    "feedback": "ap_fixed<16,4,AP_RND_CONV,AP_SAT>",
    "gradients": "ap_fixed<16,4,AP_RND_CONV,AP_SAT>",
    "accumulators": "ap_fixed<48,16,AP_TRN,AP_SAT>",
    "optimizer_state": "ap_fixed<16,4,AP_RND_CONV,AP_SAT>",
}


@dataclass(frozen=True)
class FxpConfig:
    formats: dict[str, FixedFormat] = field(default_factory=lambda: {
        k: parse_format(v) for k, v in DEFAULT_FORMATS.items()})
    lr_mode: str = "multiplier"                 # "multiplier" or "shift"
    lr_shift: int | None = None                 # shift mode: lr = 2**-lr_shift (None: nearest to the bundle's)
    scalar_format: FixedFormat = field(default_factory=lambda: parse_format("ap_ufixed<16,0,AP_RND_CONV,AP_SAT>"))
    table_method: str = "pwl"
    table_size: int = 64
    table_input_range: float = 4.0
    exp_table_size: int = 64
    softmax_frac_bits: int = 16
    seed: int = 0

    def __post_init__(self):
        for name in TENSOR_CLASSES:
            if name not in self.formats:
                raise FixedPointError(f"fxp config: no format for {name}")
            limit = MAX_ACCUMULATOR_WIDTH if name == "accumulators" else MAX_DATA_WIDTH
            if self.formats[name].width > limit:
                raise FixedPointError(f"fxp config: {name} format {self.formats[name]} is wider than "
                                      f"the {limit} bits supported for {name}")
        if self.lr_mode not in ("multiplier", "shift"):
            raise FixedPointError(f"fxp config: learning_rate.mode must be multiplier or shift, got {self.lr_mode!r}")
        if self.lr_shift is not None and not 0 <= self.lr_shift <= MAX_LR_SHIFT:
            raise FixedPointError(f"fxp config: learning_rate.shift must be 0..{MAX_LR_SHIFT}, got {self.lr_shift}")
        if self.scalar_format.width > MAX_DATA_WIDTH:
            raise FixedPointError(f"fxp config: learning_rate.format is wider than {MAX_DATA_WIDTH} bits")
        if self.table_method not in ("lut", "pwl"):
            raise FixedPointError(f"fxp config: tables.method must be lut or pwl, got {self.table_method!r}")

    def fmt(self, tensor_class: str) -> FixedFormat:
        return self.formats[tensor_class]

    def learning_rate(self, lr: float) -> tuple[np.int64, FixedFormat, int | None]:
        """lr as the datapath holds it: (raw value, its format, the shift in shift mode else None).
        A learning rate the datapath cannot hold is a FixedPointError naming the range it can,
        never clamped or rounded to 0 silently."""
        if not (np.isfinite(lr) and lr >= 0):
            raise FixedPointError(f"learning rate must be finite and >= 0, got {lr}")
        if self.lr_mode == "shift":
            # lr = 2**-shift: the nearest power of two unless the config names the shift; 0 stays 0
            shift = self.lr_shift if self.lr_shift is not None else int(round(-np.log2(lr))) if lr > 0 else 0
            if not 0 <= shift <= MAX_LR_SHIFT:
                raise FixedPointError(f"learning rate {lr:g} is not representable as 2**-shift: the shift "
                                      f"mode holds 2**-{MAX_LR_SHIFT} .. 1 (shift 0..{MAX_LR_SHIFT})")
            return np.int64(1 if lr > 0 else 0), FixedFormat(2, 2 - shift), shift    # raw 1 = 2**-shift
        scalar = self.scalar_format
        q = quantize(lr, scalar)
        if q.overflows or (lr > 0 and q.raw == 0):
            raise FixedPointError(f"learning rate {lr:g} is not representable in {scalar}: it holds "
                                  f"{scalar.lsb:g} .. {float(scalar.to_float(scalar.raw_max)):g} (and 0); "
                                  "choose --lr in that range or a wider learning_rate.format")
        return q.raw, scalar, None

    def with_formats(self, **changes: FixedFormat) -> "FxpConfig":
        return replace(self, formats={**self.formats, **changes})

    def describe(self) -> dict:
        return {"formats": {k: str(v) for k, v in self.formats.items()}, "lr_mode": self.lr_mode,
                "lr_shift": self.lr_shift, "scalar_format": str(self.scalar_format),
                "table": {"method": self.table_method, "size": self.table_size,
                          "input_range": self.table_input_range},
                "softmax": {"exp_table_size": self.exp_table_size, "frac_bits": self.softmax_frac_bits},
                "seed": self.seed}


def _format_from(value, where: str) -> FixedFormat:
    if isinstance(value, str):
        try:
            return parse_format(value)
        except FixedPointError as exc:
            raise FixedPointError(f"{where}: {exc}") from None
    if isinstance(value, dict):
        unknown = set(value) - {"width", "int_bits", "signed", "rounding", "overflow"}
        if unknown or not {"width", "int_bits"} <= set(value):
            raise FixedPointError(f"{where}: a format table needs width and int_bits "
                                  f"(and may have signed, rounding, overflow); got keys {sorted(value)}")
        try:
            return FixedFormat(value["width"], value["int_bits"], bool(value.get("signed", True)),
                               value.get("rounding", "AP_TRN"), value.get("overflow", "AP_WRAP"))
        except FixedPointError as exc:
            raise FixedPointError(f"{where}: {exc}") from None
    raise FixedPointError(f"{where}: expected a format string or table, got {value!r}")


def _take(section: dict, where: str, allowed: dict) -> dict:
    unknown = set(section) - set(allowed)
    if unknown:
        raise FixedPointError(f"fxp config: unknown key {where}.{sorted(unknown)[0]} "
                              f"(known: {', '.join(sorted(allowed))})")
    out = {}
    for key, kind in allowed.items():
        if key in section:
            value = section[key]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
                raise FixedPointError(f"fxp config: {where}.{key} must be {kind.__name__}, got {value!r}")
            out[key] = value
    return out


def config_from_dict(doc: dict) -> FxpConfig:
    sections = {"formats", "learning_rate", "tables", "run"}
    unknown = set(doc) - sections
    if unknown:
        raise FixedPointError(f"fxp config: unknown section [{sorted(unknown)[0]}] "
                              f"(known: {', '.join(sorted(sections))})")
    formats = {k: parse_format(v) for k, v in DEFAULT_FORMATS.items()}
    given = doc.get("formats", {})
    for name, value in given.items():
        if name not in TENSOR_CLASSES:
            raise FixedPointError(f"fxp config: unknown tensor class formats.{name} "
                                  f"(known: {', '.join(TENSOR_CLASSES)})")
        formats[name] = _format_from(value, f"fxp config: formats.{name}")
    lr = _take(doc.get("learning_rate", {}), "learning_rate", {"mode": str, "shift": int, "format": str})
    tables = _take(doc.get("tables", {}), "tables", {"method": str, "size": int, "input_range": float,
                                                     "exp_table_size": int, "softmax_frac_bits": int})
    run = _take(doc.get("run", {}), "run", {"seed": int})
    kwargs = {"formats": formats}
    if "mode" in lr:
        kwargs["lr_mode"] = lr["mode"]
    if "shift" in lr:
        kwargs["lr_shift"] = lr["shift"]
    if "format" in lr:
        kwargs["scalar_format"] = _format_from(lr["format"], "fxp config: learning_rate.format")
    for key, target in (("method", "table_method"), ("size", "table_size"),
                        ("input_range", "table_input_range"), ("exp_table_size", "exp_table_size"),
                        ("softmax_frac_bits", "softmax_frac_bits")):
        if key in tables:
            kwargs[target] = tables[key]
    if "seed" in run:
        kwargs["seed"] = run["seed"]
    return FxpConfig(**kwargs)


def load_config(path: str | Path | None) -> FxpConfig:
    """The TOML file at `path`, or the defaults when `path` is None."""
    if path is None:
        return FxpConfig()
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise FixedPointError(f"fxp config {p}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FixedPointError(f"fxp config {p}: not valid TOML ({exc})") from None
    try:
        return config_from_dict(doc)
    except FixedPointError as exc:
        raise FixedPointError(f"{p}: {exc}") from None


