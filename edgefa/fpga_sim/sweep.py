"""Accuracy against word length, one line per rounding mode: the fixed-point fine-tuning run of
`simulate` repeated over a grid, and the float32 runtime once beside it.

The swept classes (by default the weights and the optimizer state: what a parameter update is
rounded into) get `ap_fixed<W, int_bits, mode, AP_SAT>` for every W and mode; every other tensor
class keeps the base config's format. The expected picture (Gupta et al., ICML 2015): with few
fraction bits an update smaller than half an LSB is lost by round-to-nearest every time, so
learning stalls at the starting accuracy, while stochastic rounding keeps it in expectation.

Its table, plot and page: report/fpga_sweep_page.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..bundle import Bundle
from ..runtime.engine import OrtEngine
from ..shared.datasets import Dataset
from .config import TENSOR_CLASSES, FxpConfig
from .fixed import FixedFormat, FixedPointError, Overflow, rounding_mode
from .scope import require_in_scope
from .simulate import SimulateConfig, simulate

DEFAULT_WIDTHS = (6, 8, 10, 12, 14, 16)
DEFAULT_ROUNDINGS = ("AP_RND_CONV", "STOCHASTIC")


@dataclass
class FormatGrid:
    """The fixed-point formats a sweep tries: every width x rounding mode, the same integer bits,
    applied to the tensor classes named (the others keep the base configuration's formats)."""
    widths: tuple[int, ...] = DEFAULT_WIDTHS
    roundings: tuple[str, ...] = DEFAULT_ROUNDINGS
    int_bits: int = 2
    classes: tuple[str, ...] = ("weights", "optimizer_state")

    def __post_init__(self):
        if not self.widths or not self.roundings:
            raise FixedPointError("a sweep needs at least one width and one rounding mode")
        for c in self.classes:
            if c not in TENSOR_CLASSES:
                raise FixedPointError(f"cannot sweep unknown tensor class {c!r} (known: {', '.join(TENSOR_CLASSES)})")
        self.roundings = tuple(rounding_mode(r).value for r in self.roundings)
        for w in self.widths:                       # every format is checked before any run starts
            FixedFormat(w, self.int_bits)


def sweep(bundle: Bundle, train: Dataset, run: SimulateConfig, grid: FormatGrid, base: FxpConfig,
          eval_data: Dataset | None = None,
          on_run: Callable[[dict], None] | None = None, engine: OrtEngine | None = None) -> dict:
    """`engine`: the float reference's (simulate.float_reference_engine), for the first run."""
    require_in_scope(bundle.manifest, str(bundle.path))
    rows, float_after, before, metric = [], None, None, "accuracy"
    for i, mode in enumerate(grid.roundings):
        for width in grid.widths:
            fmt = FixedFormat(width, grid.int_bits, rounding=mode, overflow=Overflow.SAT)
            config = base.with_formats(**{c: fmt for c in grid.classes})
            first = float_after is None
            result = simulate(bundle, train, SimulateConfig(run.steps, run.batch_size, run.lr, run.seed,
                                                            float_reference=first), config, eval_data,
                              engine=engine if first else None)
            if first:
                float_after, metric = result["accuracy_after"]["float32"], result["metric"]
                before = result["accuracy_before"]["float32"]
            row = {"rounding": mode, "width": width, "int_bits": grid.int_bits,
                   "frac_bits": width - grid.int_bits, "format": str(fmt),
                   "accuracy": result["accuracy_after"]["fixed"],
                   "accuracy_before": result["accuracy_before"]["fixed"],
                   "updates": result["updates"],
                   "updates_rounded_to_zero": result["updates_rounded_to_zero"],
                   "zeroed_fraction": result["updates_rounded_to_zero"] / result["updates"] if result["updates"] else 0.0,
                   "overflowed": {c: result["overflow"][c]["overflowed"] for c in grid.classes}}
            rows.append(row)
            if on_run:
                on_run(row)
    return {"bundle": str(bundle.path), "metric": metric, "steps": run.steps, "batch_size": run.batch_size, "seed": run.seed,
            "swept_classes": list(grid.classes), "int_bits": grid.int_bits,
            "widths": list(grid.widths), "roundings": list(grid.roundings),
            "base_config": base.describe(), "float32_accuracy_before": before,
            "float32_accuracy_after": float_after, "rows": rows}
