"""The device's training state in `BUNDLE/state/checkpoint.npz`, written atomically.

Write to a temporary file in the same directory, fsync it, rename it over the old one, fsync the
directory: a crash at any moment leaves the previous checkpoint or the new one, never a torn file.
The feedback matrices go into every checkpoint too, and must match the bundle's on resume.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle import Bundle, fsync_dir
from ..errors import CheckpointError

CHECKPOINT = "checkpoint.npz"
FEEDBACK_PREFIX = "feedback/"


@dataclass
class DeviceState:
    step: int
    tensors: dict[str, np.ndarray]      # weights, biases and momentum by bundle name
    refused_steps: list[int]


def checkpoint_path(bundle: Bundle) -> Path:
    return bundle.state_dir / CHECKPOINT


def save_state(bundle: Bundle, state: DeviceState) -> Path:
    bundle.state_dir.mkdir(exist_ok=True)
    final = checkpoint_path(bundle)
    tmp = final.with_name(f".{CHECKPOINT}.{os.getpid()}.tmp")
    arrays = dict(state.tensors)
    arrays.update({FEEDBACK_PREFIX + k: v for k, v in bundle.feedback.items()})
    arrays["step"] = np.array(state.step, dtype=np.int64)
    arrays["refused_steps"] = np.array(state.refused_steps, dtype=np.int64)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return final


def load_state(bundle: Bundle, names: list[str]) -> DeviceState | None:
    """The saved state, or None when the device has not trained this bundle yet."""
    path = checkpoint_path(bundle)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise CheckpointError(f"{path}: unreadable device checkpoint ({str(exc).splitlines()[0]})") from None
    missing = [n for n in [*names, "step"] if n not in arrays]
    if missing:
        raise CheckpointError(f"{path}: missing {', '.join(missing)}")
    for name, b in bundle.feedback.items():
        saved = arrays.get(FEEDBACK_PREFIX + name)
        if saved is None or not np.array_equal(saved, b):
            raise CheckpointError(f"{path}: feedback matrix '{name}' differs from the bundle's; "
                                  "this state belongs to another bundle")
    for n in names:
        expected = bundle.weights[n.removesuffix(".momentum")].shape
        if arrays[n].shape != expected:
            raise CheckpointError(f"{path}: '{n}' has shape {arrays[n].shape}, bundle says {expected}")
    return DeviceState(int(arrays["step"]), {n: arrays[n] for n in names},
                       [int(s) for s in arrays.get("refused_steps", [])])
