"""Datasets: loading (sklearn digits, .npz, MNIST IDX, CIFAR-10 binary batches, generated MNIST-1D),
a stratified split and a global standardizer.

Everything here is numpy-only so the device side (no torch, no sklearn) can load the same files.
Every problem with a user's file raises DataError with one line that names the file.
"""

from __future__ import annotations

import gzip
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from .mnist1d import MNIST1D_CLASSES, MNIST1D_MIN_SAMPLES, mnist1d_arrays


@dataclass
class Dataset:
    """Raw samples (not standardized): X float32 (N, D), y int64 (N,)."""

    X: np.ndarray
    y: np.ndarray
    n_classes: int
    name: str
    image_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        # Coerce once here so every consumer can rely on the dtypes.
        self.X = np.asarray(self.X, dtype=np.float32)
        self.y = np.asarray(self.y, dtype=np.int64)
        self.n_classes = int(self.n_classes)
        if self.X.ndim != 2:
            raise DataError(f"{self.name}: X must be 2-D (N, D), got shape {self.X.shape}")
        if self.y.shape != (self.X.shape[0],):
            raise DataError(f"{self.name}: X has {self.X.shape[0]} rows but y has shape {self.y.shape}")
        if self.image_shape is not None:   # (H, W) or (C, H, W)
            self.image_shape = tuple(int(s) for s in self.image_shape)
            if len(self.image_shape) not in (2, 3) or int(np.prod(self.image_shape)) != self.X.shape[1]:
                raise DataError(
                    f"{self.name}: image_shape {self.image_shape} does not match {self.X.shape[1]} features"
                )

    def __len__(self) -> int:
        return int(self.X.shape[0])

    def subset(self, idx: np.ndarray) -> Dataset:
        """The rows `idx` (indices or a boolean mask), as a new Dataset with the same metadata."""
        idx = np.asarray(idx)
        return Dataset(self.X[idx], self.y[idx], self.n_classes, self.name, self.image_shape)


# --------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------


def load_digits() -> Dataset:
    """scikit-learn's 1797 8x8 handwritten digits (shipped inside sklearn, no download)."""
    # Imported here: the device side has no sklearn and must still import this module.
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    return Dataset(
        X=bunch.data.astype(np.float32),  # raw 0..16
        y=bunch.target.astype(np.int64),
        n_classes=10,
        name="digits",
        image_shape=(8, 8),
    )


def _label_name(path) -> str:
    """The file name used in error messages (short, but enough to find the file)."""
    return Path(path).name or str(path)


def _one_line(e: Exception) -> str:
    """An exception's text squeezed onto one line (the CLI prints exactly one)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _numeric(a: np.ndarray) -> bool:
    """Real numbers or booleans; complex, strings and objects are refused."""
    return a.dtype.kind in "biuf"


def _labels_to_int64(y: np.ndarray, label: str) -> np.ndarray:
    """Labels as int64; integral-valued floats are accepted (files that went through pandas)."""
    bad = f"{label}: labels must be integers >= 0"
    if y.dtype.kind in "iu":
        y64 = y.astype(np.int64)
    elif y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DataError(bad)
        y64 = y.astype(np.int64)
    else:
        raise DataError(f"{bad} (got dtype {y.dtype})")
    if y64.size and y64.min() < 0:
        raise DataError(bad)
    return y64


def load_npz(path) -> Dataset:
    """An .npz with arrays X (N, ...) and y (N,), optionally a scalar n_classes."""
    path = Path(path)
    label = _label_name(path)
    if not path.is_file():
        raise DataError(f"{label}: no such file ({path})")
    try:
        archive = np.load(path, allow_pickle=False)
    except ValueError as e:
        # np.load tries to unpickle anything that is neither .npz nor .npy; allow_pickle=False
        # refuses, with a message about pickles that would only confuse someone holding garbage.
        reason = "not a zip archive" if "pickle" in str(e) else _one_line(e)
        raise DataError(f"{label}: not a readable .npz file ({reason})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{label}: not a readable .npz file ({_one_line(e)})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        # A bare .npy file loads as one array: readable, but not our format.
        raise DataError(f"{label}: not a readable .npz file (a single array, not an archive)")

    with archive:
        arrays = {}
        for key in ("X", "y", "n_classes"):
            if key not in archive.files:
                if key == "n_classes":
                    continue
                raise DataError(f"{label}: missing array '{key}'")
            try:
                arrays[key] = archive[key]
            except ValueError as e:
                if "allow_pickle" in str(e):
                    raise DataError(f"{label}: {key} is an object array (pickled data refused)") from None
                raise DataError(f"{label}: cannot read array '{key}' ({_one_line(e)})") from None
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                raise DataError(f"{label}: cannot read array '{key}' ({_one_line(e)})") from None

    X, y = arrays["X"], arrays["y"]
    if not _numeric(X):
        raise DataError(f"{label}: X must be numeric (got dtype {X.dtype})")
    if X.ndim < 2:
        raise DataError(f"{label}: X must have shape (N, ...) with at least 2 dims, got {X.shape}")
    if X.shape[0] == 0:
        raise DataError(f"{label}: X holds no samples")
    if y.ndim != 1:
        raise DataError(f"{label}: y must be 1-D, got shape {y.shape}")
    if X.shape[0] != y.shape[0]:
        raise DataError(f"{label}: X has {X.shape[0]} rows but y has {y.shape[0]}")

    image_shape = (int(X.shape[1]), int(X.shape[2])) if X.ndim == 3 else None
    # Counted after the float32 cast so float64 values too large for float32 are caught as well.
    X32 = X.reshape(X.shape[0], -1).astype(np.float32)
    n_bad = int(np.count_nonzero(~np.isfinite(X32)))
    if n_bad:
        raise DataError(f"{label}: X holds {n_bad} non-finite values (NaN/Inf)")
    y64 = _labels_to_int64(y, label)

    n_classes = int(y64.max()) + 1
    if "n_classes" in arrays:
        nc = arrays["n_classes"]
        if nc.shape != () or nc.dtype.kind not in "iu":
            raise DataError(f"{label}: n_classes must be an integer scalar, got {nc.dtype} {nc.shape}")
        if int(nc) < n_classes:
            raise DataError(f"{label}: n_classes is {int(nc)} but labels go up to {n_classes - 1}")
        n_classes = int(nc)

    return Dataset(X32, y64, n_classes, path.stem, image_shape)


def save_npz(path, ds: Dataset) -> None:
    """Write ds in load_npz's format (X, y, n_classes); images are stored (N, H, W) to keep their shape."""
    X = ds.X if ds.image_shape is None else ds.X.reshape(len(ds), *ds.image_shape)
    # Through a file handle so numpy does not append ".npz" to a path that lacks it.
    with open(path, "wb") as f:
        np.savez(f, X=X.astype(np.float32), y=ds.y.astype(np.int64), n_classes=np.int64(ds.n_classes))


# --- MNIST IDX --------------------------------------------------------------------------------------

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dims
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dim


def _read_idx(path, magic: int, what: str) -> tuple[tuple[int, ...], np.ndarray]:
    """Parse one IDX file (plain or gzipped): check magic and payload size, return (dims, uint8 payload)."""
    path = Path(path)
    label = _label_name(path)
    if not path.is_file():
        raise DataError(f"{label}: no such file ({path})")
    try:
        raw = path.read_bytes()
        # Detect gzip by its magic bytes rather than trusting the file extension.
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{label}: cannot read {what} file ({_one_line(e)})") from None

    n_dims = magic & 0xFF
    header_len = 4 + 4 * n_dims
    if len(raw) < 4:
        raise DataError(f"{label}: too short for an IDX {what} file ({len(raw)} bytes)")
    (got_magic,) = struct.unpack(">I", raw[:4])
    if got_magic != magic:
        raise DataError(f"{label}: bad IDX magic 0x{got_magic:08x} for {what} (expected 0x{magic:08x})")
    if len(raw) < header_len:
        raise DataError(f"{label}: truncated IDX header ({len(raw)} bytes, need {header_len})")
    dims = struct.unpack(f">{n_dims}I", raw[4:header_len])
    if any(d == 0 for d in dims):
        raise DataError(f"{label}: IDX {what} has a zero dimension {dims}")
    expected = int(np.prod(dims, dtype=np.int64))
    payload = len(raw) - header_len
    if payload != expected:
        raise DataError(f"{label}: IDX {what} payload is {payload} bytes, header {dims} says {expected}")
    return dims, np.frombuffer(raw, dtype=np.uint8, offset=header_len)


def load_idx(images_path, labels_path) -> Dataset:
    """MNIST-style IDX image + label files (optionally .gz); pixels stay raw 0..255."""
    (n, rows, cols), pixels = _read_idx(images_path, _IDX_IMAGES_MAGIC, "images")
    (n_labels,), labels = _read_idx(labels_path, _IDX_LABELS_MAGIC, "labels")
    if n != n_labels:
        raise DataError(
            f"{_label_name(images_path)}: {n} images but {_label_name(labels_path)} has {n_labels} labels"
        )
    y = labels.astype(np.int64)
    return Dataset(
        X=pixels.reshape(n, rows * cols).astype(np.float32),
        y=y,
        n_classes=int(y.max()) + 1,
        name="idx",
        image_shape=(rows, cols),
    )


def load_mnist_dir(directory, split: str = "train") -> Dataset:
    """MNIST from a directory holding {split}-images-idx3-ubyte[.gz] and {split}-labels-idx1-ubyte[.gz]."""
    if split not in ("train", "t10k"):
        raise DataError(f"unknown MNIST split {split!r} (expected 'train' or 't10k')")
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory")

    def find(stem: str) -> Path:
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
        raise DataError(f"{directory}: missing {stem} (or {stem}.gz)")

    images = find(f"{split}-images-idx3-ubyte")
    labels = find(f"{split}-labels-idx1-ubyte")
    return load_idx(images, labels)


CIFAR10_RECORD = 1 + 3 * 32 * 32      # a label byte, then 1024 red, 1024 green, 1024 blue (row-major)


def load_cifar10_batches(paths) -> Dataset:
    """CIFAR-10 binary batches (`data_batch_N.bin`, `test_batch.bin`): records of a label byte and
    3072 pixel bytes, channel by channel. X keeps that order (3 x 32 x 32 flattened), raw 0..255."""
    parts_x, parts_y = [], []
    for path in map(Path, paths):
        label = _label_name(path)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise DataError(f"{label}: cannot read CIFAR-10 batch ({_one_line(e)})") from None
        if not raw or len(raw) % CIFAR10_RECORD:
            raise DataError(f"{label}: {len(raw)} bytes is not a whole number of {CIFAR10_RECORD}-byte "
                            "CIFAR-10 records (a label byte and 3072 pixels)")
        records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR10_RECORD)
        if records[:, 0].max() > 9:
            bad = int(np.flatnonzero(records[:, 0] > 9)[0])
            raise DataError(f"{label}: record {bad} has label {records[bad, 0]}, CIFAR-10 labels are 0..9")
        parts_y.append(records[:, 0].astype(np.int64))
        parts_x.append(records[:, 1:].astype(np.float32))
    return Dataset(np.concatenate(parts_x), np.concatenate(parts_y), 10, "cifar10", (3, 32, 32))


def load_cifar10_dir(directory, split: str = "train") -> Dataset:
    """CIFAR-10 from the folder of its binary version (cifar-10-batches-bin): the training split is
    every data_batch_N.bin present (N = 1..5), the test split test_batch.bin."""
    if split not in ("train", "test"):
        raise DataError(f"unknown CIFAR-10 split {split!r} (expected 'train' or 'test')")
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory")
    names = [f"data_batch_{n}.bin" for n in range(1, 6)] if split == "train" else ["test_batch.bin"]
    paths = [directory / n for n in names if (directory / n).is_file()]
    if not paths:
        raise DataError(f"{directory}: no CIFAR-10 {split} batch ({', '.join(names)})")
    return load_cifar10_batches(paths)


_ACCEPTED_SPECS = ("'digits', 'npz:PATH', a PATH ending in .npz, 'mnist:DIR', 'cifar10:DIR', "
                   "'mnist1d' or 'mnist1d:N'")


def load_mnist1d(num_samples: int = 5000, seed: int = 42) -> Dataset:
    """MNIST-1D (see mnist1d.py): X float32 (N, 40), y int64, 10 classes, deterministic in `seed`."""
    X, y = mnist1d_arrays(num_samples, seed)
    return Dataset(X=X, y=y, n_classes=MNIST1D_CLASSES, name="mnist1d", image_shape=None)


def _mnist1d_spec(spec: str) -> Dataset:
    """'mnist1d' (5000 samples) or 'mnist1d:N' (N samples, N >= 100), generated by the mnist1d package."""
    if spec == "mnist1d":
        return load_mnist1d()
    count = spec[len("mnist1d:"):]
    # Plain decimal digits only: int() would also take ' 500', '+500', '5_00' or '５００'.
    if not (count.isascii() and count.isdigit()):
        raise DataError(f"mnist1d: the number of samples in {spec!r} must be an integer >= {MNIST1D_MIN_SAMPLES}")
    if int(count) < MNIST1D_MIN_SAMPLES:
        raise DataError(f"mnist1d: {spec!r} asks for {int(count)} samples, at least {MNIST1D_MIN_SAMPLES} are needed")
    return load_mnist1d(int(count))


def load_dataset(spec: str) -> Dataset:
    """Dispatch a CLI dataset spec: 'digits', 'npz:PATH', 'PATH.npz', 'mnist:DIR', 'cifar10:DIR',
    'mnist1d' or 'mnist1d:N'."""
    if spec == "digits":
        return load_digits()
    if spec == "mnist1d" or spec.startswith("mnist1d:"):
        return _mnist1d_spec(spec)
    if spec.startswith("npz:") and spec[4:]:
        return load_npz(spec[4:])
    if spec.startswith("mnist:") and spec[6:]:
        return load_mnist_dir(spec[6:], "train")
    if spec.startswith("cifar10:") and spec[8:]:
        return load_cifar10_dir(spec[8:], "train")
    if spec.lower().endswith(".npz"):
        return load_npz(spec)
    raise DataError(f"unknown dataset {spec!r}: expected {_ACCEPTED_SPECS}")


# --------------------------------------------------------------------------------------------------
# Split and standardization
# --------------------------------------------------------------------------------------------------


def stratified_split(ds: Dataset, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(train, test): per class, shuffle with the seed and send round(test_fraction * n_c) to test."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test_parts = []
    # Classes in sorted order, so the rng draws happen in the same order for the same data.
    for c in np.unique(ds.y):
        members = np.flatnonzero(ds.y == c)
        n_test = int(round(test_fraction * members.size))
        test_parts.append(rng.permutation(members)[:n_test])
    test_idx = np.sort(np.concatenate(test_parts)) if test_parts else np.empty(0, dtype=np.int64)
    is_test = np.zeros(len(ds), dtype=bool)
    is_test[test_idx] = True
    train_idx = np.flatnonzero(~is_test)
    if test_idx.size == 0 or train_idx.size == 0:
        raise DataError(
            f"{ds.name}: test_fraction {test_fraction} leaves an empty "
            f"{'test' if test_idx.size == 0 else 'training'} set ({len(ds)} samples)"
        )
    return ds.subset(train_idx), ds.subset(test_idx)


@dataclass
class Standardizer:
    """One global scalar mean and std for all features.

    Global rather than per pixel: a per-pixel std is ~0 on always-blank border pixels, and once the
    device's sensor shifts a little ink onto them the standardized values blow up.
    """

    mean: float
    std: float

    @classmethod
    def fit(cls, X) -> Standardizer:
        X = np.asarray(X, dtype=np.float64)
        if X.size == 0:
            raise DataError("cannot fit a standardizer on an empty array")
        mean = float(X.mean())
        std = float(X.std())
        # A constant input would divide by zero; 1.0 leaves it merely centred.
        if not np.isfinite(std) or std < 1e-12:
            std = 1.0
        return cls(mean, std)

    def apply(self, X, rows_per_block: int = 4096) -> np.ndarray:
        """(X - mean) / std in float64, as float32. Block by block, so that a large data set on a
        device never needs a whole float64 copy (three times its float32 size, briefly)."""
        X = np.asarray(X)
        out = np.empty(X.shape, dtype=np.float32)
        for i in range(0, len(X), rows_per_block):
            out[i:i + rows_per_block] = (X[i:i + rows_per_block].astype(np.float64) - self.mean) / self.std
        return out

    def to_dict(self) -> dict:
        return {"mean": float(self.mean), "std": float(self.std)}

    @classmethod
    def from_dict(cls, d) -> Standardizer:
        try:
            mean, std = float(d["mean"]), float(d["std"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"standardizer needs numeric 'mean' and 'std' ({_one_line(e)})") from None
        if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
            raise DataError(f"standardizer has invalid values mean={mean}, std={std}")
        return cls(mean, std)
