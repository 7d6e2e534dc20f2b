"""Trunk features computed once per sample and kept: epochs after the first run the part's step only.

Under a frozen trunk (bundle.trunk_of) a sample's features never change while the part above it
trains, so the trunk, usually most of a model's FLOPs, need run only once per sample:

    cache = FeatureCache.open(engine, data_fingerprint(X), len(X), budget_bytes)
    features = cache.rows(idx, x)      # samples idx (x: those rows, standardized); the trunk runs
    engine.step_features(features, y, lr)   # on the rows not cached yet, in window "trunk_features"

`engine.step_features` binds the same ping-pong sides as `engine.step` (runtime/engine.py), so a
cached run gives the same weights, bit for bit, as an uncached one on the same batches.

Where the features live: in memory when samples x (features x 4 + 8) bytes fit `budget_bytes`,
else in a file in the bundle's state/ (np.memmap, so the process holds none of it as its own memory):

    state/.features-<bundle>-<data>.f32              features [N, F] float32, row digests [N] uint64,
                                                     then a 16-byte blake2b digest of both
    state/..features-<bundle>-<data>.f32.<pid>.tmp   the same while it fills

<bundle> is the sha256 of the bundle's manifest.json (which hashes every file, the trunk's weights
too), <data> `data_fingerprint` of the samples, 16 hex digits each: a new bundle or new data never
reads an old file. Rows fill as batches first need them; once every row is filled the temporary
file gets its digest, is fsynced and renamed to its name (edgefa/storage.py), so a crash mid-fill
leaves only a temporary file, never a half cache that is used; the next open removes it (the state
lock's holder is the only writer). A finished file is checked (size, digest) before it is used,
and one that fails is removed and filled again. Bounded: at most KEEP_FILES finished files in a
state/ (this bundle's, newest first); another bundle's are removed when a cache opens. The names
are in bundle.FEATURE_CACHE_PATTERNS, so the --out policy knows them as edgefa's; being dot files,
they never travel in a packed bundle.

Each row keeps a digest of the samples it was computed from; `rows(..., verify=True)` checks the
rows it is handed against them (the device server does: its samples come over the link, named by
index). numpy + onnxruntime only: this runs on the device.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from pathlib import Path

import numpy as np

from .. import storage
from ..bundle import MANIFEST, Bundle, sha256_file, trunk_of
from ..device_profiles.budget import DEFAULT_FEATURE_CACHE_MB, ROW_DIGEST_BYTES, feature_cache_bytes, trunk_cost
from ..errors import DataError
from .engine import DeviceEngine

DEFAULT_BUDGET_BYTES = DEFAULT_FEATURE_CACHE_MB << 20
KEEP_FILES = 2                  # finished cache files kept in one state/: this data's and one other's
DIGEST_BYTES = 16               # the file's trailing blake2b digest
PREFIX, SUFFIX = ".features-", ".f32"      # bundle.FEATURE_CACHE_PATTERNS


def data_fingerprint(X: np.ndarray) -> str:
    """16 hex digits naming a set of samples: the sha256 of their float32 bytes and shape (raw,
    as loaded or sent over the link: both sides compute it from the same numbers)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    h = hashlib.sha256(repr(X.shape).encode())
    h.update(memoryview(X).cast("B"))
    return h.hexdigest()[:16]


def bundle_fingerprint(bundle: Bundle) -> str:
    return sha256_file(bundle.path / MANIFEST)[:16]


def row_digests(x: np.ndarray) -> np.ndarray:
    """One uint64 per row of x (blake2b of its float32 bytes): which sample a cached row came from."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return np.array([int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=ROW_DIGEST_BYTES).digest(), "little")
                     for row in x], dtype=np.uint64)


def cache_path(bundle: Bundle, data: str) -> Path:
    return bundle.state_dir / f"{PREFIX}{bundle_fingerprint(bundle)}-{data}{SUFFIX}"


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")      # storage.replace_file's naming


class FeatureCache:
    """The trunk features of one set of samples for one engine's bundle (see the module doc).
    `where` is "memory", "file" (filling a temporary file) or "file (reused)"."""

    def __init__(self, engine: DeviceEngine, data: str, samples: int, budget_bytes: int, profiler=None):
        bundle = engine.bundle
        self.engine, self.profiler = engine, profiler
        self.samples, self.width = samples, trunk_of(bundle.model)["features"]
        self.path = cache_path(bundle, data)
        self.bytes = feature_cache_bytes(samples, self.width)
        self.published, self._mapped = False, None
        _remove_stale(bundle, self.path)
        if self._reuse():
            return
        self.filled = np.zeros(samples, dtype=bool)
        self.count = 0
        if self.bytes <= budget_bytes:
            self.where = "memory"
            self.features = np.empty((samples, self.width), dtype=np.float32)
            self.digests = np.empty(samples, dtype=np.uint64)
        else:
            self.where = "file"
            self._map(_temporary(self.path), create=True)

    @classmethod
    def open(cls, engine: DeviceEngine, data: str, samples: int, budget_bytes: int, profiler=None):
        """The cache, or None (with one warning) when it cannot be made: a full or read-only disk
        costs the run its speed-up, never the run."""
        try:
            return cls(engine, data, samples, budget_bytes, profiler)
        except OSError as exc:
            warnings.warn(f"trunk feature cache off ({exc.strerror or exc}: {exc.filename}); "
                          "every step runs the trunk", stacklevel=2)
            return None

    # --- the file -----------------------------------------------------------------------------
    def _map(self, path: Path, create: bool) -> None:
        if create:      # the file's blocks, allocated now: a full disk fails here, not as a SIGBUS mid-run
            storage.make_dir(path.parent)
            try:
                storage.write_file(path, lambda f: os.posix_fallocate(f.fileno(), 0, self.bytes + DIGEST_BYTES),
                                   sync=False)
            except OSError:
                storage.remove(path)
                raise
        mode = "r+" if create else "r"
        n, width = self.samples, self.width
        self._mapped = path
        self.features = np.memmap(path, np.float32, mode, offset=0, shape=(n, width))
        self.digests = np.memmap(path, np.uint64, mode, offset=n * width * 4, shape=(n,))

    def _content_digest(self) -> bytes:
        h = hashlib.blake2b(digest_size=DIGEST_BYTES)
        h.update(memoryview(np.ascontiguousarray(self.features)).cast("B"))
        h.update(memoryview(np.ascontiguousarray(self.digests)).cast("B"))
        return h.digest()

    def _reuse(self) -> bool:
        """Use the finished file of this bundle and data, if there is one and it is whole."""
        if not self.path.is_file():
            return False
        if self.path.stat().st_size == self.bytes + DIGEST_BYTES:
            self._map(self.path, create=False)
            with open(self.path, "rb") as f:
                f.seek(self.bytes)
                whole = f.read(DIGEST_BYTES) == self._content_digest()
            if whole:
                self.where, self.published, self.count = "file (reused)", True, self.samples
                self.filled = np.ones(self.samples, dtype=bool)
                return True
            self._unmap()
        warnings.warn(f"{self.path}: damaged trunk feature cache removed; filling it again", stacklevel=3)
        storage.remove(self.path)
        return False

    def _publish(self) -> None:
        """Every row is filled: digest, fsync and rename the temporary file to its name."""
        tmp = self._mapped
        self.features.flush()
        self.digests.flush()
        try:
            with open(tmp, "r+b") as f:
                f.seek(self.bytes)
                f.write(self._content_digest())
                f.flush()
                storage.fsync_file(f)
            storage.rename(tmp, self.path)
            storage.fsync_dir(self.path.parent)
        except OSError as exc:      # a full disk: this run keeps its mapped rows; nothing is published
            warnings.warn(f"trunk feature cache not saved ({exc.strerror or exc}); this run still uses it",
                          stacklevel=3)
            return
        self._mapped, self.published = self.path, True
        _keep_newest(self.path)

    def _unmap(self) -> None:
        self.features = self.digests = None
        self._mapped = None

    def close(self) -> None:
        """Let the file go; a temporary file that never filled is removed (nothing can resume it)."""
        tmp = self._mapped if self.where == "file" and not self.published else None
        self._unmap()
        if tmp is not None:
            storage.remove(tmp)

    # --- rows ---------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self.count == self.samples

    def rows(self, idx: np.ndarray, x: np.ndarray, verify: bool = False) -> np.ndarray:
        """The trunk features of samples `idx`, whose rows (standardized, as the trunk takes them)
        are `x`; the trunk runs on the rows not cached yet. `verify`: check that the cached rows
        were computed from these very samples (a DataError line if not)."""
        idx = np.asarray(idx)
        if idx.dtype.kind not in "iu":
            raise DataError(f"sample indices must be integers, got {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        if idx.ndim != 1 or len(idx) != len(x) or (len(idx) and (idx.min() < 0 or idx.max() >= self.samples)):
            raise DataError(f"sample indices must be {len(x)} integers in 0..{self.samples - 1}")
        missing = ~self.filled[idx]
        digests = row_digests(x) if verify or missing.any() else None
        if verify:
            cached = ~missing
            if not np.array_equal(digests[cached], self.digests[idx[cached]]):
                raise DataError("sample indices do not match the samples the feature cache holds for them "
                                "(the same data set, in the same order, is needed)")
        if missing.any():
            new = idx[missing]
            cost = trunk_cost(self.engine.bundle.model, len(new))
            with (self.profiler.window("trunk_features", cost.flops, cost.bytes_moved) if self.profiler
                  else contextlib.nullcontext()):
                self.features[new] = self.engine.features(x[missing])
            self.digests[new] = digests[missing]
            self.filled[new] = True
            self.count = int(np.count_nonzero(self.filled))
            if self.complete and self.where == "file":
                self._publish()
        return np.ascontiguousarray(self.features[idx])

    def describe(self) -> dict:
        """For a run's report: where the features are, how many rows, and how many bytes."""
        return {"where": self.where, "samples": self.samples, "features": self.width, "bytes": self.bytes,
                "filled": self.count, "file": str(self.path) if self.where != "memory" else None}


def _remove_stale(bundle: Bundle, keep: Path) -> None:
    """Remove temporary cache files (a killed run's: the caller holds the state lock, so no other
    process writes them) and finished ones of another bundle."""
    state = bundle.state_dir
    if not state.is_dir():
        return
    mine = f"{PREFIX}{bundle_fingerprint(bundle)}-"
    for path in sorted(state.glob(f".{PREFIX}*{SUFFIX}.*.tmp")):
        storage.remove(path)
    for path in sorted(state.glob(f"{PREFIX}*{SUFFIX}")):
        if not path.name.startswith(mine) and path != keep:
            storage.remove(path)


def _keep_newest(current: Path) -> None:
    """At most KEEP_FILES finished caches in state/: `current` and the newest others."""
    others = sorted((p for p in current.parent.glob(f"{PREFIX}*{SUFFIX}") if p != current),
                    key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for path in others[KEEP_FILES - 1:]:
        storage.remove(path)
