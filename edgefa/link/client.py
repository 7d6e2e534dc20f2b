"""The host's side of the link: a client that calls the device and survives a broken link.

`DeviceClient.call` sends one request and waits for its reply. When the link fails (the transport
errors, or the peer stops answering) it reopens the URL, starts a new session and asks again;
every request is idempotent on the device (see service.py), so asking again is always safe.
On top of it: deploy (a resumable chunked upload), finetune (batches by step number, following
the device's own step), evaluate, pull (the fine-tuned bundle back) and get_state. A classifier
trains and is evaluated on labelled samples (the requests carry arrays `x`, `y`); a bradley-terry
scorer on preference pairs (`chosen`, `rejected`: `finetune_pairs`, `evaluate_pairs`), with the
same batches, checks, divergence rule and refusals.

numpy only: the host side of the link needs no torch either.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import platform
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..bundle import LOSS_BRADLEY_TERRY, check_replaceable, pack_archive, replace_folder, unpack_archive
from ..errors import DataError, EdgefaError
from ..shared.batches import batch_indices
from ..shared.preference_pairs import PreferencePairs
from ..runtime.divergence import DEFAULT_MAX_REFUSALS, DIVERGED, TOO_MANY_REFUSALS, Diverged, TooManyRefusals
from ..runtime.feature_cache import data_fingerprint
from ..runtime import finetune as local      # the checks and words of `edgefa device finetune`
from .messages import Message, MessageError, arrays_to_lists, decode, encode
from .protocol import (Connection, LineBusy, LinkError, LinkLost, MessageReceived, NotAnEdgefaDevice,
                       SessionRefused, SessionStarted, Timing)
from .transport import OpenError, SerialTransport, exchange

# A chunk and its request header fit one 64 KiB fragment: a chunk of exactly 64 KiB would need a
# second, tiny fragment and so a second round trip (measured: 115 -> 143 MB/s on loopback).
CHUNK_BYTES = 63 * 1024


class DeviceError(EdgefaError):
    """The device answered with an error."""

    def __init__(self, code: str, message: str, fields: dict):
        super().__init__(f"device: {message}")
        self.code, self.fields = code, fields


def read_key(path: str | os.PathLike | None) -> bytes | None:
    """A shared key from a file (its bytes, surrounding whitespace stripped); None for no file."""
    if path is None:
        return None
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise EdgefaError(f"{path}: cannot read the key file ({exc.strerror})") from None
    if len(key) < 16:
        raise EdgefaError(f"{path}: a shared key needs at least 16 bytes")
    return key


@dataclass
class ClientConfig:
    key: bytes | None = None
    reply_timeout: float = 120.0        # longest wait for one reply (an upload_end loads a bundle)
    reconnects: int = 5                 # consecutive failures before giving up
    connect_timeout: float = 10.0       # wait this long for a device that has answered before to answer HELLO
    # A device never reached yet that stays silent is most often a wrong URL, or no server there:
    # fail in seconds, not after a minute. A live server answers HELLO within milliseconds, and its
    # longest pauses (a checkpoint, loading a bundle) take seconds; a serial line opened before its
    # server starts keeps our HELLO buffered for it. So: 3 s, once more, then one line.
    first_contact_timeout: float = 3.0
    first_contact_retries: int = 1
    max_fragment: int = 64 * 1024
    timing: Timing = field(default_factory=Timing)
    baudrate: int = 115200
    wrap: Callable | None = None        # transport -> transport (fault injection in tests)


class NoAnswer(LinkError):
    """HELLO went unanswered. `silent`: not one byte came back (rather than frames too damaged to read)."""

    def __init__(self, message: str, silent: bool):
        super().__init__(message)
        self.silent = silent


# What the host reads from each reply, checked before anything reads it: a reply without them (a
# device running another edgefa, bytes meant for another host) is one line, never a KeyError.
# (path, type, when): "a.b" looks inside a.b; type None: present, of any type; when "F": only if
# the reply's field F is truthy, "!F": only if not, "?": only if the field is there at all.
_INT, _NUMBER, _STR_OR_NONE = int, (int, float), (str, type(None))
REPLY_FIELDS: dict[str, tuple[tuple[str, object, str | None], ...]] = {
    "info": (("device", dict, None), ("device.model", None, None), ("device.machine", None, None),
             ("device.cpu_count", None, None), ("device.hostname", None, None), ("versions", dict, None),
             ("providers", dict, None), ("providers.chosen", list, None), ("providers.available", list, None),
             ("providers.backends", (dict, type(None)), "?"), ("bundle", _STR_OR_NONE, None), ("step", _INT, None),
             ("model", list, "bundle"), ("checkpointed_step", _INT, "bundle"), ("checkpoint_every", _INT, "bundle"),
             ("kept", (list, type(None)), "?"), ("keep_retired", None, "kept")),
    "status": (("step", _INT, None), ("bundle", _STR_OR_NONE, "?"), ("in_features", _INT, "?"),
               ("n_classes", _INT, "?")),
    "profile": (("memory", dict, None), ("memory.peak_rss_bytes", None, None), ("phases", dict, None),
                ("energy", None, None), ("device", dict, None), ("device_profile", None, None),
                ("providers", list, None), ("warmup", None, None), ("sample_interval_s", None, None)),
    "upload_begin": (("offset", _INT, None),),
    "upload_chunk": (("offset", _INT, None),),
    "upload_end": (("step", _INT, None),),
    "train": (("step", _INT, None), ("step_ms", _NUMBER, "!duplicate"), ("loss", _NUMBER, "!duplicate"),
              ("accepted", bool, "!duplicate")),
    "evaluate": (("correct", _INT, None), ("loss_sum", _NUMBER, None), ("step", _INT, None)),
    "fetch_begin": (("size", _INT, None), ("sha256", str, None)),
    "scratch_begin": (("step", _INT, None),),
    "scratch_end": (("ended", None, None),),
}
ERROR_FIELDS = {"step_ahead": (("step", _INT, None),), TOO_MANY_REFUSALS: (("step", _INT, None),),
                DIVERGED: (("step", _INT, None), ("diverged_at_step", _INT, None))}
REPLY_ARRAYS = {"fetch_chunk": ("blob",)}


def _is_a(value, kind) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        return False                 # JSON's true is no count (bool is an int subclass in Python)
    return isinstance(value, kinds)


def reply_problem(op: str, reply: Message) -> str | None:
    """What is missing from (or wrong in) a reply to `op`, for the host to read it; None if nothing."""
    fields = reply.fields
    checks = REPLY_FIELDS.get(op, ()) if fields.get("ok") else ERROR_FIELDS.get(fields.get("code"), ())
    for path, kind, when in checks:
        if when and when != "?" and bool(fields.get(when.lstrip("!"))) == when.startswith("!"):
            continue
        value, found = fields, True
        for part in path.split("."):
            found = isinstance(value, dict) and part in value
            if not found:
                break
            value = value[part]
        if not found:
            if when == "?":
                continue
            return f"no '{path}'"
        if kind is not None and not _is_a(value, kind):
            return f"'{path}' is {type(value).__name__}"
    for name in REPLY_ARRAYS.get(op, ()) if fields.get("ok") else ():
        if name not in reply.arrays:
            return f"no array '{name}'"
    return None


class DeviceClient:
    def __init__(self, url: str, config: ClientConfig | None = None):
        self.url, self.config = url, config or ClientConfig()
        self.transport = None
        self.conn: Connection | None = None
        self.peer: dict | None = None
        self.reconnects = 0
        self._request_id = 0
        # who we are, in HELLO: the device tells a second host on a shared line who holds it, and
        # lets this client (its token) back into its own session after a reconnect
        self.hello = {"role": "host", "client": secrets.token_hex(8), "host": platform.node()[:64],
                      "pid": os.getpid()}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            if self.conn is not None and self.conn.is_open:
                self.conn.close_session()      # BYE: the device is free for another host at once
                try:
                    self.transport.write(self.conn.data_to_send())
                except LinkError:
                    pass
            self.transport.close()
        self.transport = None

    @property
    def stats(self):
        return self.conn.stats if self.conn else None

    # --- the session ----------------------------------------------------------------------

    def connect(self) -> None:
        self.close()
        try:
            transport = SerialTransport(self.url, self.config.baudrate)
        except OpenError as exc:
            # Not there yet (a device restarting refuses connections; a USB device we had a session
            # with re-enumerating): worth another try. A URL that can never open is not retried.
            if exc.retry or (exc.missing and self.peer is not None):
                raise LinkError(str(exc)) from None
            raise
        self.transport = self.config.wrap(transport) if self.config.wrap else transport
        if self.conn is None:   # one Connection for the client's life: its stats add up
            self.conn = Connection("client", key=self.config.key, hello=self.hello,
                                   max_fragment=self.config.max_fragment, timing=self.config.timing)
        conn = self.conn
        conn.reset_input()   # half a frame from the last connection must not eat the WELCOME
        conn.connect(time.monotonic())
        wait = self.config.connect_timeout if self.peer is not None else self.config.first_contact_timeout
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                exchange(conn, self.transport, wait=0.2)
            except LinkError:
                if conn.unframed_answer is not None:     # it answered, then closed (an HTTP server)
                    self._not_edgefa(self._describe_unframed(conn.unframed_answer))
                raise
            while (event := conn.next_event()) is not None:
                if isinstance(event, SessionStarted):
                    self.peer = event.peer
                    return
                if isinstance(event, SessionRefused):
                    self.close()
                    raise EdgefaError(f"{self.url}: the device refused the session: {event.reason}")
                if isinstance(event, NotAnEdgefaDevice):
                    self._not_edgefa(event.what)
                if isinstance(event, LineBusy):
                    self.close()
                    raise EdgefaError(f"{self.url}: device busy: {event.what}")
                if isinstance(event, LinkLost):
                    raise LinkError(f"{self.url}: {event.reason}")
        if conn.unframed_answer is not None:
            self._not_edgefa(self._describe_unframed(conn.unframed_answer))
        if conn.overheard is not None:
            self.close()
            raise EdgefaError(f"{self.url}: device busy: another host is in a session on this line "
                              f"({conn.overheard} seen), and the device did not answer us within {wait:g} s")
        raise NoAnswer(f"{self.url}: no answer to HELLO within {wait:g} s (is `edgefa device serve` running there?)",
                       silent=conn.silent)

    def _not_edgefa(self, what: str):
        """Not an edgefa device at the other end: one line, and no retry (none could help)."""
        self.close()
        raise EdgefaError(f"{self.url}: not an edgefa device: {what}")

    @staticmethod
    def _describe_unframed(head: bytes) -> str:
        return (f"it answered with bytes that are not edgefa frames ({head[:24]!r}; "
                "a serial line at another --baud, or another program?)")

    def call(self, op: str, arrays: dict | None = None, blob: bytes | None = None, **fields) -> Message:
        """Send one request and return its reply, reconnecting and asking again on link failure."""
        self._request_id += 1
        request = encode({"op": op, "id": self._request_id, **fields}, arrays, blob)
        failures = 0
        while True:
            try:
                if self.transport is None or not self.conn.is_open:
                    self.connect()
                return self._exchange(op, request)
            except LinkError as exc:
                failures += 1
                self.reconnects += 1
                self.close()
                limit = self.config.reconnects
                if isinstance(exc, NoAnswer) and exc.silent and self.peer is None:
                    limit = min(limit, self.config.first_contact_retries)   # see ClientConfig
                if failures > limit:
                    tries = failures - 1
                    raise LinkError(f"{exc} (gave up after {tries} reconnect{'' if tries == 1 else 's'})") from None
                time.sleep(min(0.05 * 2 ** failures, 2.0))

    def _exchange(self, op: str, request: bytes) -> Message:
        conn = self.conn
        conn.send(request, time.monotonic())
        deadline = time.monotonic() + self.config.reply_timeout
        while time.monotonic() < deadline:
            exchange(conn, self.transport, wait=0.5)
            while (event := conn.next_event()) is not None:
                if isinstance(event, LinkLost):
                    raise LinkError(f"{self.url}: {event.reason}")
                if isinstance(event, MessageReceived):
                    try:
                        reply = decode(event.data)
                    except MessageError as exc:
                        raise EdgefaError(f"{self.url}: unreadable reply ({exc})") from None
                    if (problem := reply_problem(op, reply)) is not None:
                        raise EdgefaError(f"{self.url}: unexpected reply to {op}: {problem} "
                                          "(a device running another edgefa version?)")
                    if not reply.get("ok"):
                        raise DeviceError(str(reply.get("code")), str(reply.get("error")), reply.fields)
                    return reply
        raise LinkError(f"{self.url}: no reply within {self.config.reply_timeout:.0f} s")

    # --- what the host does with a device ---------------------------------------------------

    def info(self) -> dict:
        return self.call("info").fields

    def status(self, scratch: str | None = None) -> dict:
        return self.call("status", scratch=scratch).fields

    @contextlib.contextmanager
    def scratch(self) -> Iterator[dict]:
        """A scratch session on the device: steps trained inside it (pass `session["token"]` as
        `scratch=`) are undone when it ends, and nothing is written on the device meanwhile; the
        device's state afterwards is the one it had before, bit for bit. Yields the begin reply
        (with `token`); at the end `session["ended"]` says whether the device put its state back
        (False: something else ended the session first, which also put it back)."""
        token = secrets.token_hex(8)
        session = {**self.call("scratch_begin", scratch=token).fields, "token": token}
        try:
            yield session
        except Exception:     # (not on Ctrl-C: the device ends the session at its next request anyway)
            with contextlib.suppress(EdgefaError):
                self.call("scratch_end", scratch=token)
            raise
        session["ended"] = self.call("scratch_end", scratch=token)["ended"]

    def profile(self, clear: bool = False, samples: bool = True, warmup: int | None = None) -> dict:
        """The device profiler's summary (windows, memory, energy); `clear` starts a fresh one after."""
        reply = self.call("profile", clear=clear, samples=samples, warmup=warmup)
        return arrays_to_lists(reply.fields, reply.arrays)

    def deploy(self, bundle_dir: str | os.PathLike, on_progress: Callable[[int, int], None] | None = None,
               chunk_bytes: int = CHUNK_BYTES) -> dict:
        """Upload a bundle in acknowledged chunks; an interrupted upload resumes where it stopped.
        The device verifies the archive's sha256 and the bundle before it replaces its own."""
        archive = pack_archive(bundle_dir)
        sha = hashlib.sha256(archive).hexdigest()
        size = len(archive)
        offset = self.call("upload_begin", sha256=sha, size=size)["offset"]
        while offset < size:
            if on_progress:
                on_progress(offset, size)
            try:
                offset = self.call("upload_chunk", sha256=sha, offset=offset,
                                   blob=archive[offset:offset + chunk_bytes])["offset"]
            except DeviceError as exc:      # the device restarted or lost track: ask where it is
                if exc.code not in ("no_upload", "bad_offset"):
                    raise
                offset = self.call("upload_begin", sha256=sha, size=size)["offset"]
        if on_progress:
            on_progress(size, size)
        return {**self.call("upload_end", sha256=sha).fields, "archive_bytes": size, "sha256": sha}

    def train_step(self, step: int, x: np.ndarray, y: np.ndarray, lr: float | None = None,
                   max_refusals: int = DEFAULT_MAX_REFUSALS, run_start: int | None = None,
                   scratch: str | None = None) -> Message:
        return self._train(step, {"x": np.asarray(x, np.float32), "y": np.asarray(y, np.int64)}, lr, max_refusals,
                           run_start, scratch)

    def train_pairs_step(self, step: int, chosen: np.ndarray, rejected: np.ndarray, lr: float | None = None,
                         max_refusals: int = DEFAULT_MAX_REFUSALS, run_start: int | None = None,
                         scratch: str | None = None) -> Message:
        """One step of a bradley-terry bundle on a batch of pairs (row i of `chosen` preferred)."""
        return self._train(step, {"chosen": np.asarray(chosen, np.float32),
                                  "rejected": np.asarray(rejected, np.float32)}, lr, max_refusals, run_start, scratch)

    def _train(self, step: int, batch: dict[str, np.ndarray], lr, max_refusals: int, run_start: int | None,
               scratch: str | None, **fields) -> Message:
        return self.call("train", batch, step=step, lr=lr, max_refusals=max_refusals,
                         run_start=step if run_start is None else run_start, scratch=scratch, **fields)

    def check_data(self, X: np.ndarray, y: np.ndarray, what: str = "data", scratch: str | None = None) -> dict:
        """Check labelled samples against the device's bundle (a classifier; feature count, labels
        in 0..n_classes-1, finite values) before any of them is sent: a problem is one DataError
        line and nothing is applied. Returns the device's status."""
        return self._check({"x": X, "y": y}, what, scratch)

    def check_pairs(self, chosen: np.ndarray, rejected: np.ndarray, what: str = "pairs",
                    scratch: str | None = None) -> dict:
        """check_data for preference pairs: the device's bundle is a bradley-terry scorer, and the
        pairs are float [N, in_features] twice, finite (runtime.finetune.check_pairs)."""
        return self._check({"chosen": chosen, "rejected": rejected}, what, scratch)

    def _check(self, data: dict[str, np.ndarray], what: str, scratch: str | None) -> dict:
        """`data`: the request arrays of a whole set ({x, y} or {chosen, rejected}), checked as the
        device's own file would be; the device's status."""
        status = self.status(scratch)
        if "in_features" not in status:     # (no bundle deployed: the device itself answers that)
            return status
        pairs = "chosen" in data
        if "loss" in status and (status["loss"] == LOSS_BRADLEY_TERRY) != pairs:
            raise DataError(f"{what}: the device's bundle trains on {local.wanted_data(not pairs)}, "
                            f"not on {local.wanted_data(pairs)}")
        if pairs:
            local.check_pairs(data["chosen"], data["rejected"], status["in_features"], what)
        else:
            local.check_samples(data["x"], data["y"], status["in_features"], status["n_classes"], what)
        return status

    def finetune(self, X: np.ndarray, y: np.ndarray, steps: int, batch_size: int = 32, seed: int = 0,
                 lr: float | None = None, on_step: Callable[[int, float, float], None] | None = None,
                 max_refusals: int = DEFAULT_MAX_REFUSALS, scratch: str | None = None) -> dict:
        """Train until the device reaches `steps`, sending batch k for device step k (the same
        batches as `edgefa device finetune`). The device's step leads: after a restart from an
        older checkpoint the lost steps are sent again, and a repeated step is never applied twice.
        The device judges every step (runtime/divergence.py, as a local run does): a divergence
        rolls it back to its last good checkpoint and raises Diverged here, `max_refusals` refused
        steps in this run raise TooManyRefusals; both carry the summary so far. The run ends with a
        checkpoint, which the device judges first, like the end of a local run. With `scratch` (a
        token of `scratch()`) every request belongs to that session: nothing is kept."""
        return self._finetune({"x": X, "y": y}, steps, batch_size, seed, lr, on_step, max_refusals, scratch)

    def finetune_pairs(self, chosen: np.ndarray, rejected: np.ndarray, steps: int, batch_size: int = 32,
                       seed: int = 0, lr: float | None = None,
                       on_step: Callable[[int, float, float], None] | None = None,
                       max_refusals: int = DEFAULT_MAX_REFUSALS, scratch: str | None = None) -> dict:
        """`finetune` for a bradley-terry bundle: batch k is pairs `batch_indices(N, batch, seed, k)`,
        as in `edgefa device finetune` on the same pairs."""
        return self._finetune({"chosen": chosen, "rejected": rejected}, steps, batch_size, seed, lr, on_step,
                              max_refusals, scratch)

    def _finetune(self, data: dict[str, np.ndarray], steps: int, batch_size: int, seed: int, lr: float | None,
                  on_step, max_refusals: int, scratch: str | None) -> dict:
        status = self._check(data, "training data", scratch)
        step = status["step"]
        # as the requests carry them (converted once, not per batch): labels int64, the rest float32
        data = {k: np.asarray(a, np.int64 if k == "y" else np.float32) for k, a in data.items()}
        n = len(next(iter(data.values())))
        # a device that caches trunk features is told which samples each batch holds (runtime/feature_cache.py)
        names = {"data": data_fingerprint(data["x"]), "samples": n} if status.get("caches_features") else {}
        start, losses, step_ms, round_trip_ms, refused = step, [], [], [], []

        def summary(final_step: int, stopped: dict | None = None) -> dict:
            rtt, dev = np.array(round_trip_ms), np.array(step_ms)
            return {"resumed_from_step": start, "final_step": final_step, "steps_run": len(losses),
                    "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                    "refused_steps": refused,
                    "rolled_back_steps": (stopped or {}).get("rolled_back_steps", 0), "stopped": stopped,
                    "step_ms_median": float(np.median(dev)) if len(dev) else None,
                    "round_trip_ms_median": float(np.median(rtt)) if len(rtt) else None,
                    "link_overhead_ms_median": float(np.median(rtt - dev)) if len(rtt) else None,
                    "round_trip_ms": round_trip_ms, "device_step_ms": step_ms,
                    "reconnects": self.reconnects}

        def stop(exc: DeviceError):
            """The device stopped the run: the same exceptions, and line, as a local run's."""
            message = str(exc).removeprefix("device: ")
            if exc.code == DIVERGED:
                back_to, at = int(exc.fields["step"]), int(exc.fields["diverged_at_step"])
                stopped = {"reason": DIVERGED, "at_step": at, "rolled_back_to_step": back_to,
                           "rolled_back_steps": at - back_to, "message": message}
                raise Diverged(f"{self.url}: {message}", summary(back_to, stopped)) from None
            refused.append(int(exc.fields["step"]) - 1)
            stopped = {"reason": TOO_MANY_REFUSALS, "at_step": int(exc.fields["step"]) - 1, "message": message}
            raise TooManyRefusals(f"{self.url}: {message}", summary(int(exc.fields["step"]), stopped)) from None

        while step < steps:
            idx = batch_indices(n, batch_size, seed, step)
            t0 = time.perf_counter()
            try:
                batch = {k: a[idx] for k, a in data.items()} | ({"ids": idx} if names else {})
                reply = self._train(step, batch, lr, max_refusals, start, scratch, **names)
            except DeviceError as exc:
                if exc.code in (DIVERGED, TOO_MANY_REFUSALS):
                    stop(exc)
                if exc.code != "step_ahead":
                    raise
                step = int(exc.fields["step"])   # the device restarted from its checkpoint
                continue
            if reply.get("duplicate"):
                step = int(reply["step"])
                continue
            round_trip_ms.append((time.perf_counter() - t0) * 1e3)
            step_ms.append(reply["step_ms"])
            losses.append(reply["loss"])
            if not reply["accepted"]:
                refused.append(step)
            step = int(reply["step"])
            if on_step:
                on_step(step, reply["loss"], round_trip_ms[-1])
        try:
            self.call("checkpoint", scratch=scratch)
        except DeviceError as exc:
            if exc.code != DIVERGED:
                raise
            stop(exc)
        return summary(step)

    def evaluate(self, X: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> dict:
        """Accuracy and mean cross-entropy of the device's current weights on labelled samples."""
        return self._evaluate({"x": X, "y": y}, "evaluation data", batch_size)

    def evaluate_pairs(self, chosen: np.ndarray, rejected: np.ndarray, batch_size: int = 1024) -> dict:
        """Preference accuracy (`accuracy`: the share of pairs scored s(chosen) > s(rejected)) and
        the mean Bradley-Terry loss of a bradley-terry bundle's current weights."""
        return self._evaluate({"chosen": chosen, "rejected": rejected}, "evaluation pairs", batch_size)

    def _evaluate(self, data: dict[str, np.ndarray], what: str, batch_size: int) -> dict:
        self._check(data, what, None)
        data = {k: np.asarray(a, np.int64 if k == "y" else np.float32) for k, a in data.items()}
        n = len(next(iter(data.values())))
        correct, loss_sum, step = 0, 0.0, None
        for i in range(0, n, batch_size):
            r = self.call("evaluate", {k: a[i:i + batch_size] for k, a in data.items()})
            correct, loss_sum, step = correct + r["correct"], loss_sum + r["loss_sum"], r["step"]
        return {"accuracy": correct / n if n else float("nan"), "loss_mean": loss_sum / n if n else float("nan"),
                "samples": n, "step": step}

    def fetch(self, what: str, on_progress: Callable[[int, int], None] | None = None,
              chunk_bytes: int = CHUNK_BYTES, name: str | None = None) -> bytes:
        """`what`: 'bundle' (the served one, checkpointed first), 'state', or 'kept' with `name`
        (a bundle the device keeps: bundle.prev or retired/NAME)."""
        begin = self.call("fetch_begin", what=what, name=name)
        size, sha = begin["size"], begin["sha256"]
        data = bytearray()
        while len(data) < size:
            if on_progress:
                on_progress(len(data), size)
            try:
                r = self.call("fetch_chunk", what=what, offset=len(data), length=chunk_bytes)
            except DeviceError as exc:
                if exc.code != "no_fetch":
                    raise
                return self.fetch(what, on_progress, chunk_bytes, name)     # the device lost its snapshot
            data += r.arrays["blob"].tobytes()
        if hashlib.sha256(data).hexdigest() != sha:
            raise EdgefaError(f"{self.url}: fetched {what} does not match its sha256")
        if on_progress:
            on_progress(size, size)
        return bytes(data)

    def get_state(self) -> dict[str, np.ndarray]:
        """The device's current weights and momentum (and 'step'), by bundle name."""
        with np.load(io.BytesIO(self.fetch("state")), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def pull(self, out: str | os.PathLike, on_progress: Callable[[int, int], None] | None = None,
             kept: str | None = None) -> Path:
        """The device's bundle with its current state (a checkpoint is taken first), or with `kept`
        one it keeps (bundle.prev or retired/NAME, as a deploy's reply and `info` name them),
        verified and written to `out` atomically; an existing bundle at `out` is replaced only once
        the new one is whole (bundle.replace_folder), and any other non-empty `out` is refused
        before the transfer."""
        out = Path(out).resolve()
        check_replaceable(out)
        archive = self.fetch("kept", on_progress, name=kept) if kept else self.fetch("bundle", on_progress)
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            (work / "archive.tar").write_bytes(archive)
            unpack_archive(work / "archive.tar", work / "bundle", max_bytes=len(archive))
            replace_folder(work / "bundle", out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return out


# --- fine-tuning over the link: what `edgefa finetune --device` and `edgefa fleet finetune` run -------

def finetune_remote(dev: DeviceClient, train, steps: int, batch_size: int = 32, seed: int = 0,
                    lr: float | None = None, eval_data=None, *, train_spec: str = "training data",
                    eval_spec: str = "evaluation data", max_refusals: int = DEFAULT_MAX_REFUSALS,
                    on_start: Callable[[int], None] | None = None,
                    on_step: Callable[[int, float, float], None] | None = None,
                    stop_if_reached: bool = False, device_memory: bool = False) -> dict | None:
    """Evaluate, fine-tune to `steps`, evaluate again: DeviceClient.finetune's summary with
    `accuracy_before` and `accuracy_after` (None without `eval_data`) and `link` (the client's
    frame counts). `train` and `eval_data` are labelled samples (X and y), or for a bradley-terry
    bundle preference pairs (shared.preference_pairs.PreferencePairs), and `metric` then says
    "preference accuracy". The device's bundle is asked for first and all the data checked against
    it, before any is sent; `on_start(step)` then hears the step it is at. With `stop_if_reached`, a
    device already at `steps` or beyond is left alone and the answer is None. With `device_memory`,
    the device's peak RSS is asked for at the end (`device_peak_rss_bytes`)."""
    pairs = isinstance(train, PreferencePairs)
    check, tune, evaluate = ((dev.check_pairs, dev.finetune_pairs, dev.evaluate_pairs) if pairs
                             else (dev.check_data, dev.finetune, dev.evaluate))

    def arrays(data) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(data, PreferencePairs) != pairs:    # evaluation data of the other kind
            raise DataError(f"{eval_spec}: the training data are {local.wanted_data(pairs)}; "
                            f"evaluate on {local.wanted_data(pairs)} too")
        return (data.chosen, data.rejected) if pairs else (data.X, data.y)

    start = check(*arrays(train), train_spec)["step"]
    if on_start:
        on_start(start)
    if stop_if_reached and start >= steps:     # --steps is the total to reach, not a count to add
        return None
    if eval_data is not None:
        check(*arrays(eval_data), eval_spec)
    before = evaluate(*arrays(eval_data))["accuracy"] if eval_data is not None else None
    result = tune(*arrays(train), steps, batch_size, seed, lr, on_step=on_step, max_refusals=max_refusals)
    after = evaluate(*arrays(eval_data))["accuracy"] if eval_data is not None else None
    result.update(accuracy_before=before, accuracy_after=after,
                  metric="preference accuracy" if pairs else "accuracy")
    if device_memory:
        result["device_peak_rss_bytes"] = dev.profile(samples=False)["memory"]["peak_rss_bytes"]
    result["link"] = dev.stats.as_dict()
    return result
