"""The device's training state in `BUNDLE/state/`: the last two checkpoints, and a lock.

    state/checkpoint.npz        the newest checkpoint (weights, momentum, step, refused steps, feedback)
    state/checkpoint.prev.npz   the one before it
    state/.lock                 held (flock) by the process that trains this bundle: one at a time
    state/trt_cache/            TensorRT's engine and timing caches (onnxruntime's TensorRT provider)
    state/.features-*.f32       cached trunk features of a bundle with a frozen trunk (runtime/feature_cache.py)

Nothing else in state/ is edgefa's: a bundle whose state/ holds another file is not replaced
(bundle.is_state_file, bundle.check_replaceable: the layout's names live in bundle.py).

A save goes through storage.replace_file: a temporary `.checkpoint.npz.PID.tmp`, fsynced, the newest
moved to `checkpoint.prev.npz`, the temporary renamed to `checkpoint.npz`, the folder fsynced. A
crash at any of those points leaves the old state or the new one (tests/test_store_faults.py
crashes at every one). A newest checkpoint that is missing or damaged falls back to the previous
one with one warning (`CheckpointFallback`), and the next save replaces the damaged file instead of
keeping it as the previous one; when both are damaged, one CheckpointError says what to do. Temporary files a killed process left behind are removed when the lock is taken (the
lock-holder is the only writer). The feedback matrices go into every checkpoint too, and must
match the bundle's on resume.
"""

from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import storage
from ..bundle import CHECKPOINT, LOCK, PREVIOUS, TEMPORARY_PATTERN, Bundle
from ..errors import CheckpointError

FEEDBACK_PREFIX = "feedback/"


class CheckpointFallback(UserWarning):
    """The newest checkpoint could not be used; the previous one was (one line: which and why)."""


class NoUsableCheckpoint(CheckpointError):
    """Neither checkpoint can be used. The line says what to do; `problem` is what is wrong without
    that advice, for a caller that does something about it itself (a server quarantines them)."""

    def __init__(self, problem: str, advice: str):
        super().__init__(f"{problem}; {advice}")
        self.problem = problem


@dataclass
class DeviceState:
    step: int
    tensors: dict[str, np.ndarray]      # weights, biases and momentum by bundle name
    refused_steps: list[int]


def checkpoint_path(bundle: Bundle) -> Path:
    return bundle.state_dir / CHECKPOINT


def previous_checkpoint_path(bundle: Bundle) -> Path:
    return bundle.state_dir / PREVIOUS


def stray_temp_files(bundle: Bundle) -> list[Path]:
    """Temporary checkpoint files a killed save left behind (`.checkpoint.npz.PID.tmp`)."""
    if not bundle.state_dir.is_dir():
        return []
    return sorted(bundle.state_dir.glob(TEMPORARY_PATTERN))


def lock_state(bundle: Bundle) -> storage.HeldLock:
    """Hold `state/.lock` for as long as this process trains the bundle (a second fine-tune or a
    server on the same state fails at once, naming the holder), and remove the temporary files a
    killed run left (safe now: only the lock-holder writes checkpoints)."""
    held = storage.hold_lock(bundle.state_dir / LOCK, f"the state of bundle {bundle.path}")
    for tmp in stray_temp_files(bundle):
        storage.remove(tmp)
    return held


def save_state(bundle: Bundle, state: DeviceState) -> Path:
    """Write a checkpoint atomically, keeping the one before it as `checkpoint.prev.npz`."""
    arrays = dict(state.tensors)
    arrays.update({FEEDBACK_PREFIX + k: v for k, v in bundle.feedback.items()})
    arrays["step"] = np.array(state.step, dtype=np.int64)
    arrays["refused_steps"] = np.array(state.refused_steps, dtype=np.int64)
    newest = checkpoint_path(bundle)
    # a damaged newest (we resumed from the previous one) is replaced, not kept: the good one stays
    keep = previous_checkpoint_path(bundle) if newest.exists() and _is_intact(newest) else None
    # streamed into the temporary file (a bad array fails there; the temporary file is removed)
    return storage.replace_file(newest, lambda f: np.savez(f, **arrays), keep_previous=keep)


def _is_intact(path: Path) -> bool:
    """Whether the file is a whole zip (an .npz): its central directory, at the end, reads. That
    catches a truncated or torn file for about 0.1 ms; a full CRC check (testzip) would double the
    cost of a checkpoint, and a bit flip is still caught when the checkpoint is loaded."""
    try:
        with zipfile.ZipFile(path):
            return True
    except Exception:                   # whatever a torn file makes zipfile raise
        return False


def clear_state(bundle: Bundle) -> None:
    """Remove the checkpoints (the bundle's own weights apply again); the lock and caches stay."""
    for path in (checkpoint_path(bundle), previous_checkpoint_path(bundle), *stray_temp_files(bundle)):
        storage.remove(path)
    if bundle.state_dir.is_dir():
        storage.fsync_dir(bundle.state_dir)


def _read_checkpoint(bundle: Bundle, path: Path, names: list[str]) -> DeviceState:
    """One checkpoint file, checked against the bundle; any problem is a one-line CheckpointError."""
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:   # our file: closed even when np.load fails
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise CheckpointError(f"{path}: unreadable device checkpoint ({str(exc).splitlines()[0]})") from None
    except Exception as exc:    # a torn zip can fail deep inside zipfile/zlib with other types
        raise CheckpointError(f"{path}: unreadable device checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
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


def load_state(bundle: Bundle, names: list[str]) -> DeviceState | None:
    """The saved state, or None when the device has not trained this bundle yet. A damaged or
    missing newest checkpoint falls back to the previous one (a CheckpointFallback warning);
    both unusable: CheckpointError."""
    newest, previous = checkpoint_path(bundle), previous_checkpoint_path(bundle)
    if not previous.exists():
        if not newest.exists():
            return None
        try:
            return _read_checkpoint(bundle, newest, names)
        except CheckpointError as exc:
            raise NoUsableCheckpoint(str(exc), f"move it out of {bundle.state_dir} to start again from the "
                                     "bundle's weights") from None
    if newest.exists():
        try:
            return _read_checkpoint(bundle, newest, names)
        except CheckpointError as exc:
            newest_problem = str(exc)
    else:                               # only between the two renames of a save that was cut short
        newest_problem = f"{newest}: missing (a save was interrupted)"
    try:
        state = _read_checkpoint(bundle, previous, names)
    except CheckpointError as exc:
        raise NoUsableCheckpoint(f"{newest_problem}; the previous one is unusable too ({exc})", f"move both "
                                 f"out of {bundle.state_dir} to start again from the bundle's weights") from None
    warnings.warn(CheckpointFallback(f"{newest_problem}; resumed from {previous.name} "
                                     f"(step {state.step}) instead"), stacklevel=2)
    return state


def describe_state(bundle: Bundle, names: list[str]) -> str:
    """What state/ holds, in one line (`edgefa device verify`): each checkpoint's step or why it is
    damaged, and which one a fine-tune resumes from. NoUsableCheckpoint (load_state's line) when
    neither can be used."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointFallback)
        resumed = load_state(bundle, names)
    if resumed is None:
        return "no checkpoint (a fine-tune starts from the bundle's weights)"
    parts, resumes = [], " (a fine-tune resumes from it)"
    for path in (checkpoint_path(bundle), previous_checkpoint_path(bundle)):
        if not path.exists():
            if path.name == CHECKPOINT:         # the previous one exists (load_state found a state)
                parts.append(f"{path.name} missing (a save was interrupted)")
            continue
        try:
            step = _read_checkpoint(bundle, path, names).step
        except CheckpointError as exc:
            parts.append(f"{path.name} damaged ({str(exc).removeprefix(f'{path}: ')})")
            continue
        parts.append(f"{path.name} at step {step}{resumes}")
        resumes = ""                            # only the first usable one, as load_state takes it
    strays = stray_temp_files(bundle)
    if strays:
        parts.append(f"{len(strays)} temporary files of an interrupted save (removed by the next fine-tune)")
    return "; ".join(parts)
