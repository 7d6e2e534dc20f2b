"""Diagnostics of host training: can a run's result be trusted? (`edgefa diagnose`, diagnosis.py)

This module reads what training and diagnosis wrote (metrics.json, diagnosis.json) without
importing torch, for `edgefa report`. The alignment metrics themselves are measured during training
(training/alignment.py), which diagnosis.py reuses.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError, DiagnosisError

METRICS = "metrics.json"
DIAGNOSIS = "diagnosis.json"
def read_metrics(run_dir: str | Path) -> dict:
    """RUN/metrics.json as written by `edgefa train`; a missing or corrupt file is a CheckpointError
    (one line naming the file)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise CheckpointError(f"{path}: no metrics file (train a run with `edgefa train --out DIR`)")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: corrupt metrics file (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: corrupt metrics file (invalid JSON at line {exc.lineno}, "
                              f"column {exc.colno}: {exc.msg})") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: unreadable metrics file ({exc.strerror or exc})") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("epochs"), list) \
            or not all(isinstance(row, dict) for row in metrics["epochs"]):
        raise CheckpointError(f"{path}: not an edgefa metrics file (no list of per-epoch rows)")
    return metrics


MEASURE_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                       "float64": "float64", "fp64": "float64"}
REFUSED_DTYPES = ("float16", "fp16", "half")


def measure_dtype_name(name: str) -> str:
    """float32 | bfloat16 | float64 for a measurement precision (aliases fp32, bf16, fp64); float16 is
    refused with its reason. No torch: the CLI checks this before importing it."""
    key = str(name).lower().removeprefix("torch.")
    if key in REFUSED_DTYPES:
        raise DiagnosisError(f"{name} measurements are refused: float16 flushes gradients below 6e-8 to zero and "
                             "loses precision below 6e-5, the very range diagnostic (b) inspects; "
                             "use float32 or bfloat16")
    if key not in MEASURE_DTYPE_NAMES:
        raise DiagnosisError(f"unknown measurement dtype {name!r}; expected float32, bfloat16 or float64")
    return MEASURE_DTYPE_NAMES[key]


def read_diagnosis(run_dir: str | Path) -> dict | None:
    """RUN/diagnosis.json as `edgefa diagnose` wrote it; None when the run was never diagnosed."""
    path = Path(run_dir) / DIAGNOSIS
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, OSError) as exc:
        raise CheckpointError(f"{path}: corrupt diagnosis file ({str(exc).splitlines()[0]})") from None
    if not isinstance(found, dict) or not isinstance(found.get("diagnostics"), dict):
        raise CheckpointError(f"{path}: not an edgefa diagnosis (no diagnostics)")
    return found


def epoch_alignment(row: dict) -> dict | None:
    """One epoch's alignment dict, or None when that epoch has none (alignment off, older runs)."""
    found = row.get("alignment")
    return found if isinstance(found, dict) and isinstance(found.get("layers"), dict) else None


__all__ = ["DIAGNOSIS", "METRICS", "measure_dtype_name", "bp_twin", "cosine", "epoch_alignment", "measure_alignment",
           "read_diagnosis", "read_metrics",
           "tensor_cosine", "weight_layers"]
