"""What the device server does with each request: a message in, a reply out, no transport.

The device keeps everything under one store directory:

    STORE/bundle/            the deployed bundle (verified and loaded), its state/ holds the checkpoints;
                             bundle/.archive.sha256: the sha256 of the archive it came from
    STORE/bundle.prev/       the bundle it replaced, with its state (the fallback if bundle/ fails)
    STORE/retired/TIME-SHA-stepN/  a bundle.prev that held device state (checkpoints) when a deploy
                             pushed it out: kept whole, the newest `keep_retired` of them (oldest removed)
    STORE/incoming/SHA.part  an upload in progress (its size is the resume offset), SHA.json
    STORE/quarantine/        what a start could not load, moved aside (never deleted) with the time
    STORE/.lock              held by the one server using this store

A deploy unpacks the new bundle beside the current one (incoming/unpacked), verifies it, loads it
(sessions built, one forward pass) and only then swaps it in by renames (bundle -> bundle.prev,
unpacked -> bundle); on any failure the current bundle and its state keep serving. A start
undoes a swap a crash cut short and quarantines what it cannot load (see `_start`), so a store
left in any state by a crash serves its last good bundle. No deploy loses device-only training:
the replaced bundle keeps its state in bundle.prev, and the bundle.prev it pushes out goes to
retired/ when it holds checkpoints; both can be fetched back (`fetch_begin what=kept`). A deployed
bundle whose state/ holds a checkpoint that loads for it resumes from it (pull -> deploy restores
or moves a device); one that does not load is refused.

A scratch session (`scratch_begin` .. `scratch_end`, what `edgefa profile --device` runs in) leaves
the device as it found it: the state is checkpointed and copied in memory at its start, automatic
checkpoints are suspended, and its end puts the copy and the step back. Only requests that carry
the session's token and cannot persist anything continue it (SCRATCH_OPS); any other request ends
it first, so a host that died mid-profile costs nothing, and a server killed mid-session restarts
from the checkpoint taken at its start.

Every request is idempotent, so a host that lost a reply may simply ask again: chunks name their
offset, and `train` names the step it means to apply. A train request for a step the device has
already applied is answered again and not applied twice; one for a step the device has not
reached (it restarted from an older checkpoint) is refused with the device's step, and the host
goes back to it. That is what makes a fine-tuning session exact across lost frames, reconnects
and a killed device process.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import io
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__, storage
from ..bundle import (CHECKPOINT_NAMES, LOSS_CROSS_ENTROPY, STATE_DIR, Bundle, describe_model, layer_shapes, model_kind,
                      pack_archive, read_bundle, sha256_file, unpack_archive)
from ..device_profiles.budget import step_cost
from ..errors import BundleError, CheckpointError, DataError, EdgefaError
from ..profiling.machine import device_description
from ..profiling.memory import rss_bytes
from ..profiling.profiler import Profiler
from ..runtime.backends import TENSORRT_BACKEND, available_backends, check_provider, open_checked_engine
from ..runtime.engine import DeviceEngine, choose_providers
from ..runtime.feature_cache import DEFAULT_BUDGET_BYTES, FeatureCache
from ..runtime.divergence import (DEFAULT_MAX_REFUSALS, DIVERGED, TOO_MANY_REFUSALS, DivergenceGuard, chance_loss,
                                  diverged_message, refusals_message)
from ..runtime.finetune import bundle_standardizer, check_pairs, mean_loss, wanted_data
from ..runtime.state import DeviceState, clear_state, load_state, lock_state, save_state
from ..runtime.state import LOCK as STATE_LOCK
from .frames import VERSION as PROTOCOL_VERSION
from .messages import OPS, Message, MessageError, decode, encode, error_reply, lists_to_arrays

SHA256_HEX = frozenset("0123456789abcdef")
# the store's layout (see the module docstring)
BUNDLE_DIR, PREVIOUS_DIR, QUARANTINE_DIR, STORE_LOCK = "bundle", "bundle.prev", "quarantine", ".lock"
STAGING_DIR, TRASH_DIR = "unpacked", "trash"                   # under incoming/
ARCHIVE_SHA = ".archive.sha256"          # in the bundle folder; a dot file: never packed or unpacked
LEGACY_ARCHIVE_SHA = "bundle.sha256"     # where stores before bundle.prev kept it
RETIRED_DIR = "retired"
RETIRED_NAME = re.compile(r"\d{8}T\d{6}\.\d{6}Z-[0-9a-z-]+")   # retired/TIME-SHA-stepN: edgefa's own names only
DEFAULT_KEEP_RETIRED = 3
# what a scratch session's token may come with: requests that read or train, never ones that persist
SCRATCH_OPS = frozenset({"info", "status", "train", "checkpoint", "infer", "evaluate"})


@dataclass
class ServiceConfig:
    store: Path
    checkpoint_every: int = 10            # steps between automatic checkpoints (0: only on request)
    provider: str | None = None
    threads: int | None = None
    max_bundle_bytes: int = 256 << 20
    max_chunk_bytes: int = 1 << 20
    keep_retired: int = DEFAULT_KEEP_RETIRED   # retired bundles (with device state) kept; the oldest go
    feature_cache_bytes: int | None = DEFAULT_BUDGET_BYTES   # trunk features' memory budget (None: no cache)


class RequestError(EdgefaError):
    def __init__(self, code: str, message: str, **fields):
        super().__init__(message)
        self.code, self.fields = code, fields


def _warn(line: str) -> None:
    """A service's log when its owner gives none: a warning (the CLI prints one line)."""
    warnings.warn(line, stacklevel=3)


def _saved_step(bundle_dir: Path) -> int | None:
    """The step of the newest readable checkpoint in BUNDLE/state/ (only its `step` entry is read),
    or None when it holds none that reads."""
    for name in CHECKPOINT_NAMES:
        try:
            with np.load(bundle_dir / STATE_DIR / name, allow_pickle=False) as z:
                return int(z["step"])
        except Exception:        # missing, torn or foreign: try the previous one
            continue
    return None


def _holds_state(bundle_dir: Path) -> bool:
    """Whether a bundle folder holds device state: any checkpoint file, readable or not."""
    return any((bundle_dir / STATE_DIR / name).exists() for name in CHECKPOINT_NAMES)


def _archive_sha_of(bundle_dir: Path) -> str | None:
    try:
        return (bundle_dir / ARCHIVE_SHA).read_text().strip() or None
    except OSError:
        return None


@dataclass
class _Scratch:
    """A scratch session: its token, and everything the device served when it began (put back
    at its end, bit for bit)."""
    token: str
    step: int
    refused: list[int]
    checkpointed_step: int
    tensors: dict[str, np.ndarray]
    guard: DivergenceGuard | None
    last_train: tuple | None
    unjudged: tuple | None
    diverged: bytes | None


def _declared_size(meta: Path) -> int | None:
    try:
        size = json.loads(meta.read_text()).get("size")
    except (OSError, ValueError, AttributeError):
        return None
    return size if type(size) is int else None


class DeviceService:
    """Every request runs in a window of `profiler` (load, train_step, forward, checkpoint, transfer);
    the `profile` request sends its summary to the host."""

    def __init__(self, config: ServiceConfig, profiler: Profiler | None = None,
                 log: Callable[[str], None] | None = None):
        self.config = config
        self.profiler = profiler or Profiler()
        self.log = log or _warn                               # one line per event the operator should know
        self.machine = None                                   # set by the server: the device profile in use
        self.store = Path(config.store)
        check_provider(config.provider)
        storage.make_dir(self.store / "incoming")
        # one server per store; and while it serves a bundle it holds that bundle's state lock too
        self._store_lock = storage.hold_lock(self.store / STORE_LOCK, f"device store {self.store}")
        self._state_lock: storage.HeldLock | None = None
        self.bundle: Bundle | None = None
        self.engine: DeviceEngine | None = None
        self.archive_sha = None
        self.step, self.refused, self.checkpointed_step = 0, [], 0
        self._last_train: tuple[int, bytes] | None = None   # (step, reply): a repeated request gets this
        self._fetches: dict[str, bytes] = {}
        self._scratch: _Scratch | None = None                 # a scratch session in progress
        self.manifest_sha = None                              # sha256 of the served bundle's manifest.json
        self.link_stats = None                                # set by the server: the link's counters
        self._start()

    def close(self) -> None:
        """Give the store's locks back, as the process's exit would (no checkpoint: the server's
        stop takes one first). The service must not be used afterwards."""
        self._close_feature_cache()
        for lock in (self._state_lock, self._store_lock):
            if lock is not None:
                lock.release()

    # --- the entry point ---------------------------------------------------------------------

    def handle(self, data: bytes) -> bytes:
        """One request in, one reply out. Never raises: a bad request gets an error reply."""
        try:
            msg = decode(data)
            op = msg.get("op")
            if op not in OPS:
                raise RequestError("unknown_op", f"unknown request {str(op)[:40]!r}")
            self._scratch_gate(op, msg)
            reply = getattr(self, f"_op_{op}")(msg)
            return reply if isinstance(reply, bytes) else encode({"ok": True, **reply[0]}, reply[1])
        except MessageError as exc:
            return error_reply("bad_message", str(exc))
        except RequestError as exc:
            return encode({"ok": False, "code": exc.code, "error": str(exc), **exc.fields})
        except (BundleError, CheckpointError) as exc:
            return error_reply("bad_bundle", str(exc))
        except DataError as exc:
            return error_reply("bad_data", str(exc))
        except EdgefaError as exc:
            return error_reply("refused", str(exc))
        except OSError as exc:    # the store failed a write (a full disk): nothing served is lost
            return error_reply("store_failed", f"the device's store failed: {exc.strerror or exc}"
                               + (f" ({exc.filename})" if exc.filename else ""))
        except Exception as exc:  # the server must keep answering whatever a request does
            return error_reply("internal", f"{type(exc).__name__}: {exc}")

    def hello(self) -> dict:
        return {"edgefa": __version__, "protocol": PROTOCOL_VERSION, "role": "device"}

    # --- state -------------------------------------------------------------------------------

    def _start(self) -> None:
        """Bring the store to a state it can serve, whatever a crash or a bad bundle left there,
        and serve it: the staging and trash folders of an interrupted deploy go (edgefa wrote
        them); a swap cut between its renames is undone (bundle.prev back to bundle); a bundle
        that does not load is moved to quarantine/ and bundle.prev serves instead; checkpoints
        that do not load (both of them) are moved to quarantine/ and the bundle starts from its
        own weights. One log line for each; with nothing loadable left, no bundle (said so)."""
        incoming, current, previous = self.store / "incoming", self.store / BUNDLE_DIR, self.store / PREVIOUS_DIR
        for leftover in (STAGING_DIR, TRASH_DIR):
            storage.remove_tree(incoming / leftover)
        if not current.exists() and previous.is_dir():
            storage.rename(previous, current)
            storage.fsync_dir(self.store)
        quarantined = False
        while os.path.lexists(current):
            try:
                self._load()
                return
            except CheckpointError as exc:       # the bundle loads; neither of its checkpoints does
                moved = [storage.quarantine(current / STATE_DIR / name, self.store / QUARANTINE_DIR)
                         for name in CHECKPOINT_NAMES if (current / STATE_DIR / name).exists()]
                # what is wrong (state.NoUsableCheckpoint.problem), not its advice to move them: done here
                problem = getattr(exc, "problem", str(exc))
                self.log(f"{problem}; moved {' and '.join(p.name for p in moved)} to "
                         f"{self.store / QUARANTINE_DIR}; serving the bundle from its own weights (step 0)")
            except BundleError as exc:
                where = storage.quarantine(current, self.store / QUARANTINE_DIR)
                quarantined = True
                fallback = previous.is_dir()
                if fallback:
                    storage.rename(previous, current)
                    storage.fsync_dir(self.store)
                self.log(f"{exc}; moved it to {where}; "
                         + ("serving the previous bundle" if fallback else "serving with no bundle"))
        if quarantined:
            self.log("no bundle to serve: deploy one (edgefa deploy BUNDLE --device URL)")

    def _open_engine(self, bundle: Bundle) -> DeviceEngine:
        """The bundle's engine, checked by a forward pass (backends.open_checked_engine): a bundle
        that passes its hashes but cannot run fails as one BundleError line before anything serves it."""
        return open_checked_engine(bundle, self.config.provider, self.config.threads)

    def _load(self, lock: storage.HeldLock | None = None) -> None:
        """Serve STORE/bundle: hold its state lock (`lock`, when the caller took it already), open
        it (`_open_engine`), resume from its checkpoint (a fallback to the previous one is logged)."""
        rss_before = rss_bytes()
        with self.profiler.window("load"):
            bundle = read_bundle(self.store / BUNDLE_DIR)
            held = self._state_lock
            if lock is None:
                lock = held if held is not None and held.holds(bundle.state_dir / STATE_LOCK) else lock_state(bundle)
            try:
                engine = self._open_engine(bundle)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    saved = load_state(bundle, engine.state_names)
                if saved:
                    engine.load_state(saved.tensors)
            except BaseException:
                if lock is not held:
                    lock.release()
                raise
        for warning in caught:
            self.log(str(warning.message))
        if rss_before is not None:
            self.profiler.extra["runtime_growth_bytes"] = rss_bytes() - rss_before
        if held is not None and lock is not held:
            held.release()                       # the bundle this one replaces (now bundle.prev)
        self._state_lock = lock
        sha_file = bundle.path / ARCHIVE_SHA
        if not sha_file.exists():
            sha_file = self.store / LEGACY_ARCHIVE_SHA
        self.bundle, self.engine = bundle, engine
        self.archive_sha = sha_file.read_text().strip() if sha_file.exists() else None
        self.manifest_sha = sha256_file(bundle.path / "manifest.json")
        self.step, self.refused = (saved.step, list(saved.refused_steps)) if saved else (0, [])
        self.checkpointed_step, self._last_train, self._fetches = self.step, None, {}
        self._diverged = None        # a stop's cached reply belongs to the weights it rolled back

    @property
    def providers(self) -> list[str]:
        """What runs the bundle: the loaded engine's providers, or what a load would choose."""
        if self.engine is not None:
            return list(self.engine.providers)
        return [self.config.provider] if self.config.provider == TENSORRT_BACKEND else list(
            choose_providers(self.config.provider))

    def _need_bundle(self) -> tuple[Bundle, DeviceEngine]:
        if self.engine is None:
            raise RequestError("no_bundle", "no bundle deployed on this device (edgefa deploy BUNDLE --device URL)")
        return self.bundle, self.engine

    def after_reply(self) -> None:
        """Work that need not delay a reply: the periodic checkpoint (about 3 ms here). A device
        killed before it lands loses one more interval at most, which the host sends again."""
        every = self.config.checkpoint_every
        if self.engine is not None and every and self.step - self.checkpointed_step >= every \
                and self.step >= self._checkpoint_retry_step and self._scratch is None:   # (a scratch writes nothing)
            try:
                self.checkpoint()
            except RequestError as exc:
                # e.g. a full disk: say so once, keep serving, try again an interval later (not
                # every step: a disk that stays full would fill the log one line per step)
                self._checkpoint_retry_step = self.step + every
                self.log(str(exc))

    _checkpoint_retry_step = 0     # the periodic checkpoint waits until this step after a failed one

    def checkpoint(self) -> int:
        bundle, engine = self._need_bundle()
        if self._scratch is not None:   # (the server's stop) a scratch session writes nothing: it ends, and
            self._end_scratch()         # the state it began from is on disk already (scratch_begin saved it)
            return self.step
        self._judge_state()           # a diverged state is rolled back (RequestError "diverged"), never written
        try:
            with self.profiler.window("checkpoint"):
                save_state(bundle, DeviceState(self.step, engine.state(), self.refused))
        except OSError as exc:        # a full disk: the previous checkpoints stay; training goes on
            raise RequestError("store_failed", f"checkpoint at step {self.step} not written "
                               f"({exc.strerror or exc}); the one at step {self.checkpointed_step} stays") from None
        self.checkpointed_step = self.step
        return self.step

    def _status(self) -> dict:
        if self.bundle is None:
            return {"bundle": None, "step": 0}
        manifest = self.bundle.manifest
        m = manifest["model"]
        # `model`: the widths along the matmul path (an mlp's layer widths, as hosts before model kinds
        # read them); `description`: the one line `describe_model` gives any kind
        return {"bundle": self.archive_sha, "step": self.step, "refused_steps": len(self.refused),
                "checkpointed_step": self.checkpointed_step,
                "in_features": m["in_features"], "n_classes": m["n_classes"],   # what the host checks data against
                "model": [m["in_features"]] + [w[0] for w, _ in layer_shapes(m).values() if len(w) == 2],
                "kind": model_kind(m), "description": describe_model(m),
                "trainable": m.get("trainable", "all"), "loss": manifest.get("loss", LOSS_CROSS_ENTROPY),
                "lr": manifest["optimizer"]["lr"],
                # which bundle it is, whatever its state (`edgefa profile --device` compares it with its own)
                "manifest_sha256": self.manifest_sha, "scratch": self._scratch is not None,
                # a train request may name its samples (ids, data, samples): their trunk features are cached
                "caches_features": self._caches_features(self.engine)}

    # --- requests ----------------------------------------------------------------------------

    def _op_info(self, msg: Message):
        import onnxruntime as ort
        import sys
        return {"versions": {"edgefa": __version__, "protocol": PROTOCOL_VERSION, "python": sys.version.split()[0],
                             "numpy": np.__version__, "onnxruntime": ort.__version__},
                "capabilities": list(OPS),
                "device": device_description(),
                "providers": {"available": ort.get_available_providers(), "chosen": self.providers,
                              "backends": available_backends()},
                "limits": {"max_bundle_bytes": self.config.max_bundle_bytes,
                           "max_chunk_bytes": self.config.max_chunk_bytes},
                "checkpoint_every": self.config.checkpoint_every,
                "link": self.link_stats.as_dict() if self.link_stats else None,
                "kept": self._kept(), "keep_retired": self.config.keep_retired,
                **self._status()}, None

    def _op_status(self, msg: Message):
        return self._status(), None

    def _upload_paths(self, sha: str) -> tuple[Path, Path]:
        if not (isinstance(sha, str) and len(sha) == 64 and set(sha) <= SHA256_HEX):
            raise RequestError("bad_request", "sha256 must be 64 lowercase hex digits")
        return self.store / "incoming" / f"{sha}.part", self.store / "incoming" / f"{sha}.json"

    def _op_upload_begin(self, msg: Message):
        sha, size = msg.get("sha256"), msg.get("size")
        part, meta = self._upload_paths(sha)
        if type(size) is not int or not 0 < size <= self.config.max_bundle_bytes:
            raise RequestError("too_large", f"bundle archive of {size} bytes refused "
                               f"(this device accepts up to {self.config.max_bundle_bytes})")
        if sha == self.archive_sha and self.engine is not None:
            return {"offset": size, "deployed": True}, None      # already here: keep its state
        for old in (self.store / "incoming").iterdir():          # one upload at a time
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            elif old.stem != sha:
                old.unlink()
        if _declared_size(meta) != size:
            meta.write_text(json.dumps({"size": size}))
            part.write_bytes(b"")
        offset = part.stat().st_size if part.exists() else 0
        if offset > size:
            part.write_bytes(b"")
            offset = 0
        return {"offset": offset, "deployed": False}, None

    def _op_upload_chunk(self, msg: Message):
        sha, offset = msg.get("sha256"), msg.get("offset")
        part, meta = self._upload_paths(sha)
        blob = msg.arrays.get("blob")
        size = _declared_size(meta)
        if size is None or not part.exists():
            raise RequestError("no_upload", "no upload of this bundle in progress (send upload_begin)")
        have = part.stat().st_size
        if blob is None or blob.dtype != np.uint8 or blob.ndim != 1 or len(blob) > self.config.max_chunk_bytes:
            raise RequestError("bad_request", "upload_chunk needs a 1-D uint8 'blob' within the chunk limit")
        if type(offset) is not int or not 0 <= offset <= have or offset + len(blob) > size:
            raise RequestError("bad_offset", f"chunk at offset {offset} does not fit: the device holds "
                               f"{have} of {size} bytes", offset=have)
        with self.profiler.window("transfer"), open(part, "r+b") as f:   # a repeat overwrites the same bytes
            f.seek(offset)
            f.write(blob.tobytes())
            f.truncate(offset + len(blob))
        return {"offset": offset + len(blob)}, None

    def _op_upload_end(self, msg: Message):
        sha = msg.get("sha256")
        part, meta = self._upload_paths(sha)
        if sha == self.archive_sha and self.engine is not None:   # a repeated upload_end: the same answer
            return {**self._status(), **(self._last_deploy[1] if self._last_deploy[0] == sha else {})}, None
        size = _declared_size(meta)
        if size is None or not part.exists():
            raise RequestError("no_upload", "no upload of this bundle in progress")
        if part.stat().st_size != size:
            raise RequestError("incomplete", f"upload holds {part.stat().st_size} of {size} bytes")
        digest = hashlib.sha256(part.read_bytes()).hexdigest()
        if digest != sha:
            part.unlink()
            meta.unlink()
            raise RequestError("sha256_mismatch", f"uploaded archive has sha256 {digest[:16]}…, "
                               f"expected {sha[:16]}…; upload it again")
        staging = self.store / "incoming" / STAGING_DIR
        new_lock = None
        try:
            storage.remove_tree(staging)                          # what an earlier failed deploy left
            unpack_archive(part, staging, self.config.max_bundle_bytes)      # hashes and shapes verified
            candidate = read_bundle(staging)
            with self.profiler.window("deploy_check"):
                engine = self._open_engine(candidate)             # loaded beside the current bundle
                resumed_step = self._check_deployed_state(candidate, engine)
            del engine
            storage.write_file(staging / ARCHIVE_SHA, (sha + "\n").encode())
            new_lock = lock_state(candidate)       # state/ made and locked now: after the swap nothing is written
            if self.engine is not None and self.step != self.checkpointed_step:
                try:
                    self.checkpoint()                             # the bundle leaving keeps its last step
                except RequestError as exc:
                    if exc.code != DIVERGED:                      # a runaway state is rolled back, not kept;
                        raise                                     # the deploy goes on
            replaced = ({"bundle": self.archive_sha, "step": self.step, "kept_as": PREVIOUS_DIR}
                        if self.engine is not None else None)
            pushed_out = self._swap_in(staging)
        except (EdgefaError, OSError) as exc:
            if new_lock is not None:
                new_lock.release()
            storage.remove_tree(staging)
            storage.remove(part)
            storage.remove(meta)
            raise self._deploy_refused(exc) from None
        for done in (part, meta, self.store / LEGACY_ARCHIVE_SHA):
            storage.remove(done)
        try:
            self._load(new_lock)
        except (BundleError, CheckpointError) as exc:             # loaded in staging, yet not here
            self._start()                                         # quarantines it, serves bundle.prev
            raise self._deploy_refused(exc) from None
        evicted = self._evict_retired()                           # (only once the deploy has succeeded)
        # what became of the state the device held: the host's deploy line says it
        report = {"resumed_step": resumed_step, "replaced": replaced, "pushed_out": pushed_out,
                  "evicted": evicted, "keep_retired": self.config.keep_retired}
        self._last_deploy = (sha, report)
        return {**self._status(), **report}, None

    _last_deploy: tuple[str | None, dict] = (None, {})   # (archive sha, report) of the last deploy

    def _check_deployed_state(self, candidate: Bundle, engine: DeviceEngine) -> int | None:
        """A deployed bundle's own state/: its checkpoints are kept when one loads for it (feedback
        equal, shapes right, finite), and the device resumes from it (pull -> deploy backs up,
        restores or moves a device); the step it resumes at, or None without a checkpoint. One
        that does not load refuses the deploy in one line. Everything else in state/ (engine caches
        built for another device, a lock) is dropped: it belongs to the machine that wrote it."""
        state_dir = candidate.state_dir
        if not state_dir.is_dir():
            return None
        for entry in state_dir.iterdir():
            if entry.name not in CHECKPOINT_NAMES:
                (storage.remove_tree if entry.is_dir() else storage.remove)(entry)
        if not any((state_dir / name).exists() for name in CHECKPOINT_NAMES):
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")       # a fallback to checkpoint.prev.npz is still a state
                saved = load_state(candidate, engine.state_names)
            engine.load_state(saved.tensors)          # NaN/Inf refused here
        except EdgefaError as exc:
            problem = str(exc).split("; move ")[0].replace(f"{candidate.path}{os.sep}", "")
            raise BundleError(f"the bundle's state/ does not load for it ({problem}); remove state/ from "
                              "the bundle to deploy it from its own weights") from None
        return saved.step

    def _swap_in(self, staging: Path) -> dict | None:
        """bundle.prev <- bundle <- staging, by renames. The bundle that was bundle.prev goes to
        retired/ when it holds device state (checkpoints) and `keep_retired` allows, else to the
        trash; what became of it is returned (None: there was none). On an error the renames done
        are undone; a crash between them is undone by the next `_start` (a retired bundle stays
        retired: it is whole, and the swap's other renames are)."""
        current, previous = self.store / BUNDLE_DIR, self.store / PREVIOUS_DIR
        trash = self.store / "incoming" / TRASH_DIR
        pushed_out, retire_to = None, None
        if previous.is_dir():
            pushed_out = {"bundle": _archive_sha_of(previous), "step": _saved_step(previous), "kept_as": None}
            if _holds_state(previous) and self.config.keep_retired > 0:
                retire_to = self._retired_path(pushed_out["bundle"], pushed_out["step"])
                storage.make_dir(retire_to.parent)
                pushed_out["kept_as"] = f"{RETIRED_DIR}/{retire_to.name}"
        done: list[tuple[Path, Path]] = []
        try:
            for src, dst in ((previous, retire_to or trash), (current, previous), (staging, current)):
                if src.exists():
                    storage.rename(src, dst)
                    done.append((src, dst))
            storage.fsync_dir(self.store)
            storage.fsync_dir(staging.parent)
            if retire_to is not None:
                storage.fsync_dir(retire_to.parent)
        except Exception:
            for src, dst in reversed(done):
                storage.rename(dst, src)
            raise
        try:
            storage.remove_tree(trash)
        except OSError as exc:                                     # the next start removes it
            self.log(f"could not remove {trash} ({exc.strerror})")
        return pushed_out

    def _retired_path(self, sha: str | None, step: int | None) -> Path:
        """retired/TIME-SHA-stepN (UTC time to the microsecond first: the names sort oldest first)."""
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        name = f"{stamp}-{(sha or 'unknown')[:12]}-step{'unknown' if step is None else step}"
        target, n = self.store / RETIRED_DIR / name, 1
        while os.path.lexists(target):
            n += 1
            target = self.store / RETIRED_DIR / f"{name}-{n}"
        return target

    def _retired(self) -> list[Path]:
        """The retired bundles, oldest first (only edgefa's own names: anything else is left alone)."""
        folder = self.store / RETIRED_DIR
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.is_dir() and RETIRED_NAME.fullmatch(p.name))

    def _evict_retired(self) -> list[str]:
        """Remove the oldest retired bundles beyond `keep_retired` (edgefa moved them there); their
        names. A removal that fails is logged and tried again at the next deploy."""
        retired = self._retired()
        evicted = []
        for old in retired[:max(len(retired) - self.config.keep_retired, 0)]:
            try:
                storage.remove_tree(old)
                evicted.append(f"{RETIRED_DIR}/{old.name}")
            except OSError as exc:
                self.log(f"could not remove {old} ({exc.strerror})")
        return evicted

    def _kept(self) -> list[dict]:
        """The bundles the device keeps besides the one it serves, newest first, each with the
        step of its state (None: none that reads): what `fetch_begin what=kept name=...` sends."""
        kept = [(PREVIOUS_DIR, self.store / PREVIOUS_DIR)] if (self.store / PREVIOUS_DIR).is_dir() else []
        kept += [(f"{RETIRED_DIR}/{p.name}", p) for p in reversed(self._retired())]
        return [{"name": name, "step": _saved_step(path), "bundle": _archive_sha_of(path)}
                for name, path in kept[:64]]      # bounded by keep_retired; the cap bounds the reply anyway

    def _kept_path(self, name) -> Path:
        for entry in self._kept():
            if entry["name"] == name:
                return self.store / name
        names = ", ".join(e["name"] for e in self._kept()) or "none"
        raise RequestError("no_such_bundle", f"this device keeps no bundle {str(name)[:80]!r} (it keeps: {names})")

    def _deploy_refused(self, exc: Exception) -> EdgefaError:
        """The one line the host gets for a deploy that did not happen."""
        serving = (f"bundle {self.archive_sha[:16]}… at step {self.step}" if self.engine is not None and
                   self.archive_sha else "its bundle" if self.engine is not None else "no bundle")
        if isinstance(exc, OSError):
            return RequestError("store_failed", f"deploy failed writing the store ({exc.strerror or exc}: "
                                f"{exc.filename}); the device keeps serving {serving}")
        if isinstance(exc, RequestError):
            return RequestError(exc.code, f"deploy failed: {exc}; the device keeps serving {serving}", **exc.fields)
        return BundleError(f"deploy refused: {exc}; the device keeps serving {serving}")

    def _batch(self, msg: Message, with_labels: bool) -> tuple[np.ndarray, np.ndarray | None]:
        bundle, _ = self._need_bundle()
        model = bundle.manifest["model"]
        x, y = msg.arrays.get("x"), msg.arrays.get("y")
        if x is None or x.ndim != 2 or x.shape[1] != model["in_features"] or len(x) == 0:
            raise DataError(f"x must be [batch, {model['in_features']}], got "
                            f"{None if x is None else list(x.shape)}")
        if not np.isfinite(x).all():
            raise DataError("x holds NaN or Inf")
        if with_labels:
            if y is None or y.shape != (len(x),) or y.dtype.kind not in "iu":
                raise DataError(f"y must be {len(x)} integer labels")
            if y.min() < 0 or y.max() >= model["n_classes"]:
                raise DataError(f"labels must lie in 0..{model['n_classes'] - 1}")
            y = y.astype(np.int64)
        return bundle_standardizer(bundle).apply(x), y

    def _training_batch(self, msg: Message) -> tuple[np.ndarray, np.ndarray]:
        """What a train or evaluate request carries, checked and standardized: (x, labels) for a
        classifier; (chosen, rejected) for a bradley-terry scorer, which trains on pairs."""
        bundle, engine = self._need_bundle()
        if not engine.preference:
            if "chosen" in msg.arrays:
                raise DataError(f"this bundle trains on {wanted_data(False)}, not on pairs: send 'x' and 'y'")
            return self._batch(msg, with_labels=True)
        chosen, rejected = msg.arrays.get("chosen"), msg.arrays.get("rejected")
        if chosen is None or rejected is None:
            raise DataError(f"this bundle trains on {wanted_data(True)}: send 'chosen' and 'rejected'")
        check_pairs(chosen, rejected, bundle.model["in_features"], "pairs")
        std = bundle_standardizer(bundle)
        return std.apply(chosen), std.apply(rejected)

    # --- fine-tuning's stops (runtime/divergence.py) --------------------------------------------
    # The divergence rule runs here on the device, not in the host's client: the device writes the
    # checkpoints (a periodic one lands between two requests), so it must judge a state before it
    # writes it, and roll back to its own last good checkpoint even when the host has gone. The
    # host sends its limits with every step (`max_refusals`, and `run_start`: where its run began,
    # so refusals count per run as in `edgefa device finetune`); the rule is that command's.
    _guard: tuple[DeviceEngine, DivergenceGuard] | None = None   # and the engine it judges (a load replaces it)
    _unjudged: tuple | None = None      # (engine, x, y, lr): an applied update no loss has judged yet
    _diverged: bytes | None = None      # the last stop's reply, for a host that has not heard of it

    def _guard_for(self, bundle: Bundle, engine: DeviceEngine) -> DivergenceGuard:
        if self._guard is None or self._guard[0] is not engine:
            self._guard = (engine, DivergenceGuard(chance_loss(bundle.model["n_classes"], engine.preference)))
        return self._guard[1]

    def _judge_state(self) -> None:
        """Judge an update no step's loss has judged yet by its loss on its own batch (a forward
        pass); a runaway is rolled back and raised."""
        if self._unjudged is None or self._unjudged[0] is not self.engine:
            return
        engine, a, b, lr = self._unjudged
        self._unjudged = None
        reason = self._guard_for(self.bundle, engine).probe(mean_loss(engine, engine.preference, a, b))
        if reason:
            raise self._roll_back(self.step, reason, lr)

    def _roll_back(self, step: int, reason: str, lr: float) -> RequestError:
        """Serve the last good checkpoint again (every one written was judged; none: the bundle's own
        weights) and return the one-line error that says so (kept for a repeated request)."""
        self._load()
        error = RequestError(DIVERGED, diverged_message(step, reason, self.step, lr), step=self.step,
                             diverged_at_step=step)
        self._diverged = encode({"ok": False, "code": error.code, "error": str(error), **error.fields})
        return error

    def _op_train(self, msg: Message):
        bundle, engine = self._need_bundle()
        step, lr = msg.get("step"), msg.get("lr")
        lr = bundle.manifest["optimizer"]["lr"] if lr is None else lr
        max_refusals, run_start = msg.get("max_refusals", DEFAULT_MAX_REFUSALS), msg.get("run_start", step)
        if type(step) is not int or step < 0:
            raise RequestError("bad_request", "train needs the step number to apply")
        if not (isinstance(lr, (int, float)) and np.isfinite(lr) and lr >= 0):
            raise RequestError("bad_request", f"learning rate must be finite and >= 0, got {lr}")
        if type(max_refusals) is not int or max_refusals < 1 or type(run_start) is not int or run_start < 0:
            raise RequestError("bad_request", "max_refusals must be an integer >= 1 and run_start one >= 0")
        if self._diverged is not None and step > self.step:
            return self._diverged          # the host missed the stop's reply: the same answer again
        if step < self.step:
            if self._last_train and self._last_train[0] == step:
                return self._last_train[1]
            return {"step": self.step, "duplicate": True}, None
        if step > self.step:
            raise RequestError("step_ahead", f"the device is at step {self.step}, not {step}", step=self.step)
        with self.profiler.window("batch"):
            x, y = self._training_batch(msg)          # pairs: x chosen, y rejected
        cache = self._feature_cache(msg, engine)
        cost = step_cost(bundle.model, len(x), engine.momentum, engine.preference, on_features=cache is not None)
        with self.profiler.window("train_step", cost.flops, cost.bytes_moved):
            if cache is None:
                result = (engine.step_pairs if engine.preference else engine.step)(x, y, float(lr))
            else:                          # the batch's rows are checked against the cache's first
                features = cache.rows(msg.arrays["ids"], x, verify=True)
                with self.profiler.window("head_step", cost.flops, cost.bytes_moved):
                    result = engine.step_features(features, y, float(lr))
        seconds = self.profiler.last_seconds("train_step")
        guard = self._guard_for(bundle, engine)
        guard.max_refusals = max_refusals
        refused_in_run = sum(s >= run_start for s in self.refused) + (not result.accepted)
        verdict = guard.judge(result.loss, result.accepted, refused_in_run)
        if verdict == DIVERGED:            # the state this step started from ran away
            raise self._roll_back(step, guard.reason, lr)
        self._diverged = None
        if not result.accepted:
            self.refused.append(step)
        self.step += 1
        self._unjudged = (engine, x, y, lr) if result.accepted else None
        every = self.config.checkpoint_every
        if every and self.step - self.checkpointed_step >= every:
            self._judge_state()            # after_reply checkpoints this state: judge it now, in this reply
        outcome = {"ok": True}
        if verdict == TOO_MANY_REFUSALS:   # the weights are the judged ones: keep them with the refusals
            if self._scratch is None:      # (a scratch session writes nothing)
                self.checkpoint()
            outcome = {"ok": False, "code": TOO_MANY_REFUSALS,
                       "error": refusals_message(step, [s for s in self.refused if s >= run_start], self.step)}
        reply = encode({**outcome, "step": self.step, "loss": result.loss, "accepted": result.accepted,
                        "step_ms": seconds * 1e3})
        self._last_train = (step, reply)
        self._fetches.clear()
        return reply

    # --- trunk features cached per sample (runtime/feature_cache.py) -----------------------------
    # A train request may name its samples: `ids` (their indices in the host's data set), `data`
    # (that set's data_fingerprint) and `samples` (its size). For a bundle with a frozen trunk the
    # device then keeps each sample's trunk features and runs the part's step alone, with the same
    # result bit for bit; the rows sent are checked against the digests of the cached ones.
    _cache: FeatureCache | None = None
    _cache_key: tuple | None = None     # (bundle archive, manifest, data, samples) the cache is for

    def _feature_cache(self, msg: Message, engine: DeviceEngine) -> FeatureCache | None:
        ids, data, samples = msg.arrays.get("ids"), msg.get("data"), msg.get("samples")
        if ids is None or self.config.feature_cache_bytes is None or not self._caches_features(engine):
            return None
        if not (isinstance(data, str) and re.fullmatch("[0-9a-f]{16}", data)) or type(samples) is not int \
                or samples < 1:
            raise RequestError("bad_request", "a train request with 'ids' needs 'data' (the data set's "
                               "fingerprint, 16 hex digits) and 'samples' (its size, >= 1)")
        key = (self.archive_sha, self.manifest_sha, data, samples)
        if self._cache_key != key:      # another data set or bundle: this one's file (if any) stays
            self._close_feature_cache()
            self._cache_key = key       # (None when it cannot be made: said once, not per step)
            self._cache = FeatureCache.open(engine, data, samples, self.config.feature_cache_bytes, self.profiler)
        if self._cache is not None:
            self._cache.engine = engine  # a rollback reopens the engine: the same bundle, the same trunk
        return self._cache

    def _caches_features(self, engine: DeviceEngine | None) -> bool:
        return (engine is not None and self.config.feature_cache_bytes is not None and engine.caches_features
                and not engine.preference)

    def _close_feature_cache(self) -> None:
        if self._cache is not None:
            self._cache.close()
        self._cache, self._cache_key = None, None

    def _op_infer(self, msg: Message):
        _, engine = self._need_bundle()
        x, _ = self._batch(msg, with_labels=False)
        with self.profiler.window("forward"):
            logits = engine.predict_logits(x)
        return {"step": self.step}, {"logits": logits}

    def _op_evaluate(self, msg: Message):
        """Labelled samples: `correct` right classes, `loss_sum` their cross-entropy. Pairs (a
        bradley-terry bundle): `correct` pairs ranked right (a tie is wrong, as in preference
        accuracy), `loss_sum` their softplus(s_rejected - s_chosen)."""
        _, engine = self._need_bundle()
        x, y = self._training_batch(msg)
        if engine.preference:
            with self.profiler.window("forward"):
                margin = engine.predict_logits(x)[:, 0].astype(np.float64) - engine.predict_logits(y)[:, 0]
            return {"samples": len(x), "correct": int((margin > 0).sum()),
                    "loss_sum": float(np.logaddexp(0.0, -margin).sum()), "step": self.step}, None
        with self.profiler.window("forward"):
            logits = engine.predict_logits(x).astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return {"samples": len(y), "correct": int((logits.argmax(axis=1) == y).sum()),
                "loss_sum": float(-log_probs[np.arange(len(y)), y].sum()), "step": self.step}, None

    def _op_checkpoint(self, msg: Message):
        if self._scratch is not None:   # (the gate let it through: it is the session's) judged, not written
            self._judge_state()
            return {"step": self.step, "scratch": True}, None
        return {"step": self.checkpoint()}, None

    def _op_fetch_begin(self, msg: Message):
        what = msg.get("what")
        if what == "bundle":
            self.checkpoint()
            blob = pack_archive(self.store / "bundle")
        elif what == "state":
            _, engine = self._need_bundle()
            buf = io.BytesIO()
            np.savez(buf, **engine.state(), step=np.array(self.step, dtype=np.int64))
            blob = buf.getvalue()
        elif what == "kept":           # a bundle a deploy replaced, with its state: bundle.prev or retired/NAME
            path = self._kept_path(msg.get("name"))
            blob = pack_archive(path)
            self._fetches[what] = blob
            return {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest(), "step": _saved_step(path),
                    "name": msg.get("name")}, None
        else:
            raise RequestError("bad_request", "fetch what: 'bundle', 'state' or 'kept' (with its name)")
        self._fetches[what] = blob
        return {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest(), "step": self.step}, None

    def _op_fetch_chunk(self, msg: Message):
        what, offset, length = msg.get("what"), msg.get("offset"), msg.get("length")
        blob = self._fetches.get(what) if isinstance(what, str) else None
        if blob is None:
            raise RequestError("no_fetch", f"no fetch of {str(what)[:20]!r} in progress (send fetch_begin)")
        if type(offset) is not int or type(length) is not int or not (0 <= offset <= len(blob)) \
                or not 0 < length <= self.config.max_chunk_bytes:
            raise RequestError("bad_offset", f"bad chunk request at {offset}, {length} bytes")
        with self.profiler.window("transfer"):
            chunk = np.frombuffer(blob[offset:offset + length], dtype=np.uint8)
        return {"offset": offset}, {"blob": chunk}

    def _op_profile(self, msg: Message):
        """The device profiler's summary; `clear: true` starts a fresh measurement after it, with
        `warmup` windows per phase left out of its statistics when given."""
        warmup = msg.get("warmup")
        if warmup is not None:
            if type(warmup) is not int or warmup < 0:
                raise RequestError("bad_request", "warmup must be a count of windows >= 0")
            self.profiler.warmup = warmup
        summary = self.profiler.summary(include_samples=bool(msg.get("samples", True)))
        if msg.get("clear"):
            self.profiler.clear()
        return lists_to_arrays({**summary, "warmup": self.profiler.warmup,
                                "sample_interval_s": self.profiler.sample_interval_s,
                                "device_profile": self.machine, "device": device_description(),
                                "providers": list(self.providers),
                                "bundle_bytes": self.bundle.size_bytes() if self.bundle else None,
                                **self._status()})

    def _op_reset(self, msg: Message):
        bundle, _ = self._need_bundle()
        clear_state(bundle)             # the checkpoints go; the lock and engine caches stay
        self._load()
        return self._status(), None

    # --- scratch sessions (what `edgefa profile --device` runs in; see the module docstring) ------

    def _scratch_gate(self, op: str, msg: Message) -> None:
        """Before every request: one that is not its scratch session's (its token, an op of
        SCRATCH_OPS) ends the session first, the steps undone. One that names a session the device
        does not have (it restarted, or another request ended it) is refused: its steps must never
        land on the state the session was meant to leave alone."""
        if op in ("scratch_begin", "scratch_end"):
            return
        token = msg.get("scratch")
        if self._scratch is not None and not (token == self._scratch.token and op in SCRATCH_OPS):
            self._end_scratch()
        if token is not None and self._scratch is None:
            raise RequestError("no_scratch", "the device has ended that scratch session (it restarted, or "
                               f"another request ended it); its steps were undone and it is at step {self.step}",
                               step=self.step)

    def _op_scratch_begin(self, msg: Message):
        """Start a scratch session named by the host's token: checkpoint the state (a server killed
        mid-session restarts from exactly it) and copy it in memory (weights, momentum, step,
        refused steps, the divergence rule's history). A repeated begin is answered again."""
        token = msg.get("scratch")
        if not (isinstance(token, str) and 8 <= len(token) <= 64):
            raise RequestError("bad_request", "scratch_begin needs a 'scratch' token of 8 to 64 characters")
        if self._scratch is not None:
            if self._scratch.token == token:
                return {**self._status(), "began_at_step": self._scratch.step}, None
            self._end_scratch()
        bundle, engine = self._need_bundle()
        if self.step != self.checkpointed_step:
            self.checkpoint()
        guard = copy.deepcopy(self._guard[1]) if self._guard is not None and self._guard[0] is engine else None
        self._scratch = _Scratch(token, self.step, list(self.refused), self.checkpointed_step, engine.state(),
                                 guard, self._last_train, self._unjudged, self._diverged)
        return {**self._status(), "began_at_step": self.step}, None

    def _op_scratch_end(self, msg: Message):
        """End the scratch session (whichever is open; none: nothing to do, as for a repeat)."""
        ended = self._end_scratch()
        return {**self._status(), "ended": ended}, None

    def _end_scratch(self) -> bool:
        """Put back what the device served when the session began; False when none was open."""
        scratch, self._scratch = self._scratch, None
        if scratch is None:
            return False
        if self.engine is not None:      # (a rollback inside the session may have reopened it: same bundle)
            self.engine.load_state(scratch.tensors)
            self._guard = (self.engine, scratch.guard) if scratch.guard is not None else None
        self.step, self.refused, self.checkpointed_step = scratch.step, scratch.refused, scratch.checkpointed_step
        self._last_train, self._unjudged, self._diverged = scratch.last_train, scratch.unjudged, scratch.diverged
        self._fetches.clear()
        return True
