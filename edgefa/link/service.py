"""What the device server does with each request: a message in, a reply out, no transport.

The device keeps everything under one store directory:

    STORE/bundle/            the deployed bundle (verified and loaded), its state/ holds the checkpoints;
                             bundle/.archive.sha256: the sha256 of the archive it came from
    STORE/bundle.prev/       the bundle it replaced, with its state (the fallback if bundle/ fails)
    STORE/incoming/SHA.part  an upload in progress (its size is the resume offset), SHA.json
    STORE/quarantine/        what a start could not load, moved aside (never deleted) with the time
    STORE/.lock              held by the one server using this store

A deploy unpacks the new bundle beside the current one (incoming/unpacked), verifies it, loads it
(sessions built, one forward pass) and only then swaps it in by renames (bundle -> bundle.prev,
unpacked -> bundle); on any failure the current bundle and its state keep serving. A start
undoes a swap a crash cut short and quarantines what it cannot load (see `_start`), so a store
left in any state by a crash serves its last good bundle.

Every request is idempotent, so a host that lost a reply may simply ask again: chunks name their
offset, and `train` names the step it means to apply. A train request for a step the device has
already applied is answered again and not applied twice; one for a step the device has not
reached (it restarted from an older checkpoint) is refused with the device's step, and the host
goes back to it. That is what makes a fine-tuning session exact across lost frames, reconnects
and a killed device process.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__, storage
from ..bundle import (LOSS_CROSS_ENTROPY, STATE_DIR, Bundle, describe_model, layer_shapes, model_kind,
                      pack_archive, read_bundle, unpack_archive)
from ..device_profiles.budget import step_cost
from ..errors import BundleError, CheckpointError, DataError, EdgefaError
from ..profiling.machine import device_description
from ..profiling.memory import rss_bytes
from ..profiling.profiler import Profiler
from ..runtime.backends import TENSORRT_BACKEND, available_backends, check_provider, open_engine
from ..runtime.engine import DeviceEngine, choose_providers
from ..runtime.divergence import (DEFAULT_MAX_REFUSALS, DIVERGED, TOO_MANY_REFUSALS, DivergenceGuard, chance_loss,
                                  diverged_message, refusals_message)
from ..runtime.finetune import bundle_standardizer, mean_loss
from ..runtime.state import CHECKPOINT_NAMES, DeviceState, clear_state, load_state, lock_state, save_state
from ..runtime.state import LOCK as STATE_LOCK
from .frames import VERSION as PROTOCOL_VERSION
from .messages import OPS, Message, MessageError, decode, encode, error_reply, lists_to_arrays

SHA256_HEX = frozenset("0123456789abcdef")
# the store's layout (see the module docstring)
BUNDLE_DIR, PREVIOUS_DIR, QUARANTINE_DIR, STORE_LOCK = "bundle", "bundle.prev", "quarantine", ".lock"
STAGING_DIR, TRASH_DIR = "unpacked", "trash"                   # under incoming/
ARCHIVE_SHA = ".archive.sha256"          # in the bundle folder; a dot file: never packed or unpacked
LEGACY_ARCHIVE_SHA = "bundle.sha256"     # where stores before bundle.prev kept it


@dataclass
class ServiceConfig:
    store: Path
    checkpoint_every: int = 10            # steps between automatic checkpoints (0: only on request)
    provider: str | None = None
    threads: int | None = None
    max_bundle_bytes: int = 256 << 20
    max_chunk_bytes: int = 1 << 20


class RequestError(EdgefaError):
    def __init__(self, code: str, message: str, **fields):
        super().__init__(message)
        self.code, self.fields = code, fields


def _warn(line: str) -> None:
    """A service's log when its owner gives none: a warning (the CLI prints one line)."""
    warnings.warn(line, stacklevel=3)


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
        self.link_stats = None                                # set by the server: the link's counters
        self._start()

    def close(self) -> None:
        """Give the store's locks back, as the process's exit would (no checkpoint: the server's
        stop takes one first). The service must not be used afterwards."""
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
                self.log(f"{exc}; moved {' and '.join(p.name for p in moved)} to "
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
        """The bundle's engine, with its sessions built and one forward pass run on a zero batch:
        a bundle that passes its hashes but cannot run (a truncated graph re-hashed, an operator
        this onnxruntime lacks) fails here, as one BundleError line, before anything serves it."""
        try:
            engine = open_engine(bundle, self.config.provider, self.config.threads)
            logits = engine.predict_logits(np.zeros((1, bundle.model["in_features"]), np.float32))
        except EdgefaError:
            raise
        except Exception as exc:     # onnxruntime's own errors: the bundle's graphs do not load or run
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BundleError(f"{bundle.path}: cannot be loaded ({text})") from None
        if logits.shape != (1, bundle.model["n_classes"]) or not np.isfinite(logits).all():
            raise BundleError(f"{bundle.path}: a forward pass on a zero batch gave logits of shape "
                              f"{list(logits.shape)}, finite: {bool(np.isfinite(logits).all())}")
        return engine

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
        if self.engine is not None and every and self.step - self.checkpointed_step >= every:
            try:
                self.checkpoint()
            except RequestError as exc:          # e.g. a full disk: say so, keep serving, retry next time
                self.log(str(exc))

    def checkpoint(self) -> int:
        bundle, engine = self._need_bundle()
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
                "lr": manifest["optimizer"]["lr"]}

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
        if sha == self.archive_sha and self.engine is not None:
            return self._status(), None                           # a repeated upload_end
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
            storage.remove_tree(staging / STATE_DIR)              # a deploy starts fresh
            candidate = read_bundle(staging)
            with self.profiler.window("deploy_check"):
                self._open_engine(candidate)                      # loaded beside the current bundle
            storage.write_file(staging / ARCHIVE_SHA, (sha + "\n").encode())
            new_lock = lock_state(candidate)       # state/ made and locked now: after the swap nothing is written
            if self.engine is not None and self.step != self.checkpointed_step:
                try:
                    self.checkpoint()                             # the bundle leaving keeps its last step
                except RequestError as exc:
                    if exc.code != DIVERGED:                      # a runaway state is rolled back, not kept;
                        raise                                     # the deploy goes on
            self._swap_in(staging)
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
        return self._status(), None

    def _swap_in(self, staging: Path) -> None:
        """bundle.prev <- bundle <- staging, by renames (the bundle before bundle.prev goes). On an
        error the renames done are undone; a crash between them is undone by the next `_start`."""
        current, previous = self.store / BUNDLE_DIR, self.store / PREVIOUS_DIR
        trash = self.store / "incoming" / TRASH_DIR
        done: list[tuple[Path, Path]] = []
        try:
            for src, dst in ((previous, trash), (current, previous), (staging, current)):
                if src.exists():
                    storage.rename(src, dst)
                    done.append((src, dst))
            storage.fsync_dir(self.store)
            storage.fsync_dir(staging.parent)
        except Exception:
            for src, dst in reversed(done):
                storage.rename(dst, src)
            raise
        try:
            storage.remove_tree(trash)
        except OSError as exc:                                     # the next start removes it
            self.log(f"could not remove {trash} ({exc.strerror})")

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
        engine, x, y, lr = self._unjudged
        self._unjudged = None
        reason = self._guard_for(self.bundle, engine).probe(mean_loss(engine, False, x, y))
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
            x, y = self._batch(msg, with_labels=True)
        cost = step_cost(bundle.model, len(x), engine.momentum)
        with self.profiler.window("train_step", cost.flops, cost.bytes_moved):
            result = engine.step(x, y, float(lr))
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
            self.checkpoint()
            outcome = {"ok": False, "code": TOO_MANY_REFUSALS,
                       "error": refusals_message(step, [s for s in self.refused if s >= run_start], self.step)}
        reply = encode({**outcome, "step": self.step, "loss": result.loss, "accepted": result.accepted,
                        "step_ms": seconds * 1e3})
        self._last_train = (step, reply)
        self._fetches.clear()
        return reply

    def _op_infer(self, msg: Message):
        _, engine = self._need_bundle()
        x, _ = self._batch(msg, with_labels=False)
        with self.profiler.window("forward"):
            logits = engine.predict_logits(x)
        return {"step": self.step}, {"logits": logits}

    def _op_evaluate(self, msg: Message):
        _, engine = self._need_bundle()
        x, y = self._batch(msg, with_labels=True)
        with self.profiler.window("forward"):
            logits = engine.predict_logits(x).astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return {"samples": len(y), "correct": int((logits.argmax(axis=1) == y).sum()),
                "loss_sum": float(-log_probs[np.arange(len(y)), y].sum()), "step": self.step}, None

    def _op_checkpoint(self, msg: Message):
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
        else:
            raise RequestError("bad_request", "fetch what: 'bundle' or 'state'")
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
