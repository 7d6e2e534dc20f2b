"""The host's side of the link: a client that calls the device and survives a broken link.

`DeviceClient.call` sends one request and waits for its reply. When the link fails (the transport
errors, or the peer stops answering) it reopens the URL, starts a new session and asks again;
every request is idempotent on the device (see service.py), so asking again is always safe.
On top of it: deploy (a resumable chunked upload), finetune (batches by step number, following
the device's own step), evaluate, pull (the fine-tuned bundle back) and get_state.

numpy only: the host side of the link needs no torch either.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..bundle import check_replaceable, pack_archive, replace_folder, unpack_archive
from ..errors import EdgefaError
from ..runtime.batches import batch_indices
from ..runtime.divergence import DEFAULT_MAX_REFUSALS, DIVERGED, TOO_MANY_REFUSALS, Diverged, TooManyRefusals
from ..runtime.finetune import check_samples
from .messages import Message, MessageError, arrays_to_lists, decode, encode
from .protocol import Connection, LinkError, LinkLost, MessageReceived, SessionRefused, SessionStarted, Timing
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
    connect_timeout: float = 10.0       # wait this long for the device to answer HELLO
    max_fragment: int = 64 * 1024
    timing: Timing = field(default_factory=Timing)
    baudrate: int = 115200
    wrap: Callable | None = None        # transport -> transport (fault injection in tests)


class DeviceClient:
    def __init__(self, url: str, config: ClientConfig | None = None):
        self.url, self.config = url, config or ClientConfig()
        self.transport = None
        self.conn: Connection | None = None
        self.peer: dict | None = None
        self.reconnects = 0
        self._request_id = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self.transport is not None:
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
            self.conn = Connection("client", key=self.config.key, hello={"role": "host"},
                                   max_fragment=self.config.max_fragment, timing=self.config.timing)
        self.conn.reset_input()   # half a frame from the last connection must not eat the WELCOME
        self.conn.connect(time.monotonic())
        deadline = time.monotonic() + self.config.connect_timeout
        while time.monotonic() < deadline:
            exchange(self.conn, self.transport, wait=0.2)
            while (event := self.conn.next_event()) is not None:
                if isinstance(event, SessionStarted):
                    self.peer = event.peer
                    return
                if isinstance(event, SessionRefused):
                    self.close()
                    raise EdgefaError(f"{self.url}: the device refused the session: {event.reason}")
                if isinstance(event, LinkLost):
                    raise LinkError(f"{self.url}: {event.reason}")
        raise LinkError(f"{self.url}: no answer to HELLO within {self.config.connect_timeout:.0f} s "
                        "(is `edgefa device serve` running there?)")

    def call(self, op: str, arrays: dict | None = None, blob: bytes | None = None, **fields) -> Message:
        """Send one request and return its reply, reconnecting and asking again on link failure."""
        self._request_id += 1
        request = encode({"op": op, "id": self._request_id, **fields}, arrays, blob)
        failures = 0
        while True:
            try:
                if self.transport is None or not self.conn.is_open:
                    self.connect()
                return self._exchange(request)
            except LinkError as exc:
                failures += 1
                self.reconnects += 1
                self.close()
                if failures > self.config.reconnects:
                    raise LinkError(f"{exc} (gave up after {failures - 1} reconnects)") from None
                time.sleep(min(0.05 * 2 ** failures, 2.0))

    def _exchange(self, request: bytes) -> Message:
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
                    if not reply.get("ok"):
                        raise DeviceError(str(reply.get("code")), str(reply.get("error")), reply.fields)
                    return reply
        raise LinkError(f"{self.url}: no reply within {self.config.reply_timeout:.0f} s")

    # --- what the host does with a device ---------------------------------------------------

    def info(self) -> dict:
        return self.call("info").fields

    def status(self) -> dict:
        return self.call("status").fields

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
                   max_refusals: int = DEFAULT_MAX_REFUSALS, run_start: int | None = None) -> Message:
        return self.call("train", {"x": np.asarray(x, np.float32), "y": np.asarray(y, np.int64)},
                         step=step, lr=lr, max_refusals=max_refusals, run_start=step if run_start is None else run_start)

    def check_data(self, X: np.ndarray, y: np.ndarray, what: str = "data") -> dict:
        """Check labelled samples against the device's bundle (feature count, labels in
        0..n_classes-1, finite values) before any of them is sent: a problem is one DataError line
        and nothing is applied. Returns the device's status."""
        status = self.status()
        if "in_features" in status:          # (no bundle deployed: the device itself answers that)
            check_samples(X, y, status["in_features"], status["n_classes"], what)
        return status

    def finetune(self, X: np.ndarray, y: np.ndarray, steps: int, batch_size: int = 32, seed: int = 0,
                 lr: float | None = None, on_step: Callable[[int, float, float], None] | None = None,
                 max_refusals: int = DEFAULT_MAX_REFUSALS) -> dict:
        """Train until the device reaches `steps`, sending batch k for device step k (the same
        batches as `edgefa device finetune`). The device's step leads: after a restart from an
        older checkpoint the lost steps are sent again, and a repeated step is never applied twice.
        The device judges every step (runtime/divergence.py, as a local run does): a divergence
        rolls it back to its last good checkpoint and raises Diverged here, `max_refusals` refused
        steps in this run raise TooManyRefusals; both carry the summary so far. The run ends with a
        checkpoint, which the device judges first, like the end of a local run."""
        step = self.check_data(X, y, "training data")["step"]
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
            idx = batch_indices(len(y), batch_size, seed, step)
            t0 = time.perf_counter()
            try:
                reply = self.train_step(step, X[idx], y[idx], lr, max_refusals, start)
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
            self.call("checkpoint")
        except DeviceError as exc:
            if exc.code != DIVERGED:
                raise
            stop(exc)
        return summary(step)

    def evaluate(self, X: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> dict:
        self.check_data(X, y, "evaluation data")
        correct, loss_sum, step = 0, 0.0, None
        for i in range(0, len(y), batch_size):
            r = self.call("evaluate", {"x": np.asarray(X[i:i + batch_size], np.float32),
                                       "y": np.asarray(y[i:i + batch_size], np.int64)})
            correct, loss_sum, step = correct + r["correct"], loss_sum + r["loss_sum"], r["step"]
        n = len(y)
        return {"accuracy": correct / n if n else float("nan"), "loss_mean": loss_sum / n if n else float("nan"),
                "samples": n, "step": step}

    def fetch(self, what: str, on_progress: Callable[[int, int], None] | None = None,
              chunk_bytes: int = CHUNK_BYTES) -> bytes:
        begin = self.call("fetch_begin", what=what)
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
                return self.fetch(what, on_progress, chunk_bytes)     # the device lost its snapshot
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

    def pull(self, out: str | os.PathLike, on_progress: Callable[[int, int], None] | None = None) -> Path:
        """The device's bundle with its current state (a checkpoint is taken first), verified and
        written to `out` atomically; an existing bundle at `out` is replaced only once the new one
        is whole (bundle.replace_folder), and any other non-empty `out` is refused before the
        transfer."""
        out = Path(out).resolve()
        check_replaceable(out)
        archive = self.fetch("bundle", on_progress)
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            (work / "archive.tar").write_bytes(archive)
            unpack_archive(work / "archive.tar", work / "bundle", max_bytes=len(archive))
            replace_folder(work / "bundle", out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return out
