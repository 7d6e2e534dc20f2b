"""What the device server does with each request: a message in, a reply out, no transport.

The device keeps everything under one store directory:

    STORE/bundle/            the deployed bundle (verified), its state/ holds the checkpoint
    STORE/bundle.sha256      the sha256 of the archive it came from
    STORE/incoming/SHA.part  an upload in progress (its size is the resume offset), SHA.json

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..bundle import (LOSS_CROSS_ENTROPY, Bundle, describe_model, fsync_dir, layer_shapes, model_kind,
                      pack_archive, read_bundle, unpack_archive)
from ..device_profiles.budget import step_cost
from ..errors import BundleError, CheckpointError, DataError, EdgefaError
from ..profiling.machine import device_description
from ..profiling.memory import rss_bytes
from ..profiling.profiler import Profiler
from ..runtime.backends import TENSORRT_BACKEND, available_backends, check_provider, open_engine
from ..runtime.engine import DeviceEngine, choose_providers
from ..runtime.finetune import bundle_standardizer
from ..runtime.state import DeviceState, load_state, save_state
from .frames import VERSION as PROTOCOL_VERSION
from .messages import OPS, Message, MessageError, decode, encode, error_reply, lists_to_arrays

SHA256_HEX = frozenset("0123456789abcdef")


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


def _declared_size(meta: Path) -> int | None:
    try:
        size = json.loads(meta.read_text()).get("size")
    except (OSError, ValueError, AttributeError):
        return None
    return size if type(size) is int else None


class DeviceService:
    """Every request runs in a window of `profiler` (load, train_step, forward, checkpoint, transfer);
    the `profile` request sends its summary to the host."""

    def __init__(self, config: ServiceConfig, profiler: Profiler | None = None):
        self.config = config
        self.profiler = profiler or Profiler()
        self.machine = None                                   # set by the server: the device profile in use
        self.store = Path(config.store)
        (self.store / "incoming").mkdir(parents=True, exist_ok=True)
        check_provider(config.provider)
        self.bundle: Bundle | None = None
        self.engine: DeviceEngine | None = None
        self.archive_sha = None
        self.step, self.refused, self.checkpointed_step = 0, [], 0
        self._last_train: tuple[int, bytes] | None = None   # (step, reply): a repeated request gets this
        self._fetches: dict[str, bytes] = {}
        self.link_stats = None                                # set by the server: the link's counters
        if (self.store / "bundle").is_dir():
            self._load()

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
        except Exception as exc:  # the server must keep answering whatever a request does
            return error_reply("internal", f"{type(exc).__name__}: {exc}")

    def hello(self) -> dict:
        return {"edgefa": __version__, "protocol": PROTOCOL_VERSION, "role": "device"}

    # --- state -------------------------------------------------------------------------------

    def _load(self) -> None:
        rss_before = rss_bytes()
        with self.profiler.window("load"):
            bundle = read_bundle(self.store / "bundle")
            engine = open_engine(bundle, self.config.provider, self.config.threads)
            saved = load_state(bundle, engine.state_names)
            if saved:
                engine.load_state(saved.tensors)
        if rss_before is not None:
            self.profiler.extra["runtime_growth_bytes"] = rss_bytes() - rss_before
        sha_file = self.store / "bundle.sha256"
        self.bundle, self.engine = bundle, engine
        self.archive_sha = sha_file.read_text().strip() if sha_file.exists() else None
        self.step, self.refused = (saved.step, list(saved.refused_steps)) if saved else (0, [])
        self.checkpointed_step, self._last_train, self._fetches = self.step, None, {}

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
            self.checkpoint()

    def checkpoint(self) -> int:
        bundle, engine = self._need_bundle()
        with self.profiler.window("checkpoint"):
            save_state(bundle, DeviceState(self.step, engine.state(), self.refused))
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
        staging = self.store / "incoming" / "unpacked"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            unpack_archive(part, staging, self.config.max_bundle_bytes)
        except BundleError:
            shutil.rmtree(staging, ignore_errors=True)
            part.unlink()
            meta.unlink()
            raise
        shutil.rmtree(staging / "state", ignore_errors=True)     # a deploy starts fresh
        # Swap in the new bundle: the old one is moved aside first, so a crash leaves one of them.
        current, old = self.store / "bundle", self.store / "bundle.old"
        shutil.rmtree(old, ignore_errors=True)
        if current.exists():
            os.replace(current, old)
        os.replace(staging, current)
        (self.store / "bundle.sha256").write_text(sha + "\n")
        fsync_dir(self.store)
        shutil.rmtree(old, ignore_errors=True)
        part.unlink()
        meta.unlink()
        self._load()
        return self._status(), None

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

    def _op_train(self, msg: Message):
        bundle, engine = self._need_bundle()
        step, lr = msg.get("step"), msg.get("lr")
        lr = bundle.manifest["optimizer"]["lr"] if lr is None else lr
        if type(step) is not int or step < 0:
            raise RequestError("bad_request", "train needs the step number to apply")
        if not (isinstance(lr, (int, float)) and np.isfinite(lr) and lr >= 0):
            raise RequestError("bad_request", f"learning rate must be finite and >= 0, got {lr}")
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
        if not result.accepted:
            self.refused.append(step)
        self.step += 1
        reply = encode({"ok": True, "step": self.step, "loss": result.loss, "accepted": result.accepted,
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
        shutil.rmtree(bundle.state_dir, ignore_errors=True)
        self._load()
        return self._status(), None
