"""The device server: a transport, the protocol and the service, in one loop.

One host at a time (a device has one owner). Over TCP a thread of its own accepts connections:
the first is served; one that arrives while a host is served is told "device busy: serving HOST
since TIME" and closed at once (never left waiting in the listen backlog). A TCP peer that stays
silent is dropped (PeerTimeouts: before HELLO, between requests, or stalled mid-frame), so one
forgotten or hostile connection cannot hold the device. On a serial port or a pseudo-terminal the
server keeps reading the same line, and a host that comes back simply starts a new session with
HELLO. A line has no "busy" socket, and a second host may open it while the first is in session:
the protocol refuses that host's HELLO ("device busy") until the first says BYE, closes its side of
a pseudo-terminal, or stays silent for the idle timeout (`session_hold`; see protocol.py).

`clock` (time.monotonic unless injected) times the peer timeouts; the soak benchmark injects one
that advances days per second. The protocol's retransmission timers keep the real clock: they
time round trips on the wire (see transport.exchange).
"""

from __future__ import annotations

import queue
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ..errors import EdgefaError
from .frames import Kind, encode_frame
from .protocol import Connection, LinkError, LinkLost, MessageReceived, SessionEnded, SessionStarted
from .service import DeviceService, ServiceConfig
from .transport import FdTransport, SerialTransport, accept, exchange, listen, open_pty

POLL_S = 0.5             # longest wait for bytes before the loop looks at its timers again
HANDOVER_GRACE_S = 1.0   # a host that has just left may not have been noticed yet: wait this long
BUSY_HELLO_WAIT_S = 1.0  # how long a busy answer waits for the HELLO it answers


@dataclass(frozen=True)
class PeerTimeouts:
    """How long a TCP peer may stay silent before it is dropped: `idle` between frames in a
    session (a host thinking between requests), `handshake` from connecting to its HELLO and while
    bytes that never complete a frame trickle in (nothing honest takes that long)."""
    idle: float = 60.0
    handshake: float = 10.0

    @classmethod
    def from_idle(cls, idle: float) -> "PeerTimeouts":
        """`--idle-timeout`: the handshake limit is 10 s, or the idle one where that is shorter."""
        return cls(idle, min(cls.handshake, idle))


class PeerDropped(LinkError):
    """A TCP peer was silent past its timeout and was disconnected."""


class _SilenceWatch:
    """The timeouts of one TCP connection, fed with what each turn of the loop saw."""

    def __init__(self, timeouts: PeerTimeouts, conn: Connection, now: float):
        self.timeouts = timeouts
        self.connected_at = self.last_frame_at = now
        self.in_session = False
        self.bytes_since_frame = False     # bytes arrived that have not (yet) made a frame
        self._frames = conn.stats.frames_received

    def saw(self, conn: Connection, received: int, now: float) -> None:
        """One turn of the loop: `received` bytes arrived; did they complete a frame?"""
        if conn.stats.frames_received != self._frames:
            self._frames = conn.stats.frames_received
            self.last_frame_at, self.bytes_since_frame = now, conn.buffered > 0
        elif received:
            self.bytes_since_frame = True

    def answered(self, now: float) -> None:
        """We replied: the peer's silence counts from our last word, not from its request."""
        self.last_frame_at = now

    def overdue(self, now: float) -> str | None:
        """Why the peer is dropped now, or None."""
        t = self.timeouts
        if not self.in_session:
            if now - self.connected_at > t.handshake:
                return f"no HELLO within {t.handshake:g} s of connecting"
        elif self.bytes_since_frame and now - self.last_frame_at > t.handshake:
            return f"stalled mid-frame for {t.handshake:g} s"
        elif now - self.last_frame_at > t.idle:
            return f"silent for {t.idle:g} s"
        return None

    def wait(self, now: float) -> float:
        """Seconds until the next deadline could pass (at most POLL_S)."""
        t = self.timeouts
        due = (self.connected_at + t.handshake if not self.in_session
               else self.last_frame_at + (t.handshake if self.bytes_since_frame else t.idle))
        return min(POLL_S, max(due - now, 0.0) + 1e-3)


def serve_connection(transport, service: DeviceService, conn: Connection, log: Callable[[str], None],
                     timeouts: PeerTimeouts | None = None, clock: Callable[[], float] = time.monotonic) -> None:
    """Serve one transport until it fails (LinkError) or the process is asked to stop. With
    `timeouts` (a TCP connection), a peer silent past them is told why and PeerDropped is raised."""
    watch = _SilenceWatch(timeouts, conn, clock()) if timeouts is not None else None
    try:
        while True:
            received = exchange(conn, transport, wait=watch.wait(clock()) if watch else POLL_S)
            if watch:
                watch.saw(conn, received, clock())
            while (event := conn.next_event()) is not None:
                if isinstance(event, MessageReceived):
                    conn.send(service.handle(event.data), time.monotonic())
                    transport.write(conn.data_to_send())
                    service.after_reply()
                    if watch:
                        watch.answered(clock())
                elif isinstance(event, SessionStarted):
                    log(f"session {conn.stats.sessions} started: {event.peer}")
                    if watch:
                        watch.in_session = True
                elif isinstance(event, LinkLost):
                    log(f"session lost: {event.reason}")
                elif isinstance(event, SessionEnded):
                    log(f"session {conn.stats.sessions} ended: {event.reason}")
            if watch and (why := watch.overdue(clock())):
                conn.stats.dropped_idle += 1
                conn.refuse(f"closed: {why}")
                transport.write(conn.data_to_send())
                raise PeerDropped(f"dropped {getattr(transport, 'name', 'the peer')}: {why}")
    finally:
        s = conn.stats
        if s.forged or s.replayed:
            log(f"refused so far: {s.forged} forged and {s.replayed} replayed frames")


class _TcpGate:
    """Accepts TCP connections in a thread of its own. The serving loop takes them one at a time
    (`next`); one that arrives while a host is served is answered "device busy" at once.

    Shared with the serving thread: `_owner` (who is served, since when) under `_free`'s lock, and
    the hand-over queue (thread-safe by itself)."""

    def __init__(self, server, stats, log: Callable[[str], None], timeouts: PeerTimeouts):
        self._server, self._stats, self._log, self._timeouts = server, stats, log, timeouts
        self._free = threading.Condition()      # notified when the connection served ends
        self._owner: str | None = None
        self._handover: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgefa-accept", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=2 * POLL_S)

    def next(self) -> FdTransport:
        """The next connection to serve (waits for one)."""
        while True:
            try:
                return self._handover.get(timeout=POLL_S)   # a timeout, so Ctrl-C is seen
            except queue.Empty:
                pass

    def done(self) -> None:
        """The connection being served has ended: the next one may be handed over."""
        with self._free:
            self._owner = None
            self._free.notify_all()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                transport = accept(self._server, timeout=POLL_S)
            except OSError:            # the listening socket was closed: the server is stopping
                return
            if transport is None:
                continue
            with self._free:
                # one host closing and the next connecting at once (two commands in a script) must
                # not read as busy: the serving thread may not have seen the close yet
                self._free.wait_for(lambda: self._owner is None, timeout=HANDOVER_GRACE_S)
                owner = self._owner
                if owner is None:
                    self._owner = f"{transport.name} since {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}"
                    self._handover.put(transport)
            if owner is not None:
                self._answer_busy(transport, owner)

    def _answer_busy(self, transport: FdTransport, owner: str) -> None:
        """Tell a second host in one line that the device is taken, then close. Its HELLO is read
        first (up to BUSY_HELLO_WAIT_S), so that our close does not reset the connection before the
        host has read the answer."""
        try:
            transport.read(BUSY_HELLO_WAIT_S)
            why = f"device busy: serving {owner} (a silent host is dropped after {self._timeouts.idle:g} s)"
            transport.write(encode_frame(Kind.REFUSE, 0, why.encode()[:200]))
        except LinkError:
            pass
        transport.close_gracefully()
        self._stats.refused_busy += 1      # this thread is its only writer
        self._log(f"refused {transport.name}: busy serving {owner}")


def _reopen(port: str, baudrate: int) -> SerialTransport:
    while True:
        time.sleep(1.0)
        try:
            return SerialTransport(port, baudrate)
        except EdgefaError:
            pass


def stop_on_sigterm() -> None:
    """Make SIGTERM end `serve` the way Ctrl-C does (with a last checkpoint). Main thread only."""
    def handler(signum, frame):
        raise KeyboardInterrupt("SIGTERM")     # named in `serve`'s last log line
    signal.signal(signal.SIGTERM, handler)


def serve(service: DeviceService, *, port: str | None = None, listen_address: str | None = None,
          key: bytes | None = None, max_fragment: int = 64 * 1024, baudrate: int = 115200,
          ready: Callable[[str], None] = print, log: Callable[[str], None] = print,
          timeouts: PeerTimeouts = PeerTimeouts(), clock: Callable[[], float] = time.monotonic) -> None:
    """Serve until interrupted. `port` is a pyserial URL or 'pty' (make a pseudo-terminal and
    print the path the host should open); `listen_address` is ADDR:PORT for TCP, where `timeouts`
    drop silent peers (timed by `clock`)."""
    # session_hold: on a serial line two hosts may share, a second host waits while the first is
    # active. Not over TCP: its gate answers a second connection "busy" before any HELLO, and a
    # HELLO on the connection being served is that connection's own host starting again.
    conn = Connection("server", key=key, hello=service.hello(), max_fragment=max_fragment,
                      session_hold=None if listen_address is not None else timeouts.idle)
    service.link_stats = conn.stats      # reported by `info`: forged and replayed frames among them
    stopped_by = None
    try:
        if listen_address is not None:
            server = listen(listen_address)
            host, bound = server.getsockname()[:2]
            ready(f"listening on {host}:{bound}")
            with server, _TcpGate(server, conn.stats, log, timeouts) as gate:
                while True:
                    transport = gate.next()
                    log(f"connection from {transport.name}")
                    conn.end_session()       # nothing of the last connection carries over
                    try:
                        serve_connection(transport, service, conn, log, timeouts, clock)
                    except LinkError as exc:
                        log(f"connection ended: {exc}")
                    finally:
                        transport.close()
                        gate.done()
        elif port == "pty":
            master, path = open_pty()
            ready(f"serving on {path}")
            transport = FdTransport(master, path)
            while True:
                try:
                    serve_connection(transport, service, conn, log)
                except LinkError:
                    # EIO: no host has the pty open any more (closed or killed), so its session is
                    # over and the next host need not wait out the idle timeout; one may open it again
                    conn.end_session()
                    time.sleep(0.2)
        else:
            transport = SerialTransport(port, baudrate)
            ready(f"serving on {port}")
            while True:
                try:
                    serve_connection(transport, service, conn, log)
                except LinkError as exc:   # e.g. a USB cable pulled: wait for the port to return
                    log(f"{exc}; reopening {port}")
                    transport.close()
                    transport = _reopen(port, baudrate)
    except KeyboardInterrupt as exc:
        stopped_by = str(exc) or "SIGINT"       # SIGTERM: stop_on_sigterm's; Ctrl-C: SIGINT
    finally:
        saved = service.engine is not None and service.step != service.checkpointed_step
        if saved:
            service.checkpoint()
        if stopped_by:                         # a stop the operator asked for: one line, what it kept
            kept = (f"checkpointed at step {service.step}" if saved else
                    f"the checkpoint at step {service.checkpointed_step} is current" if service.engine is not None
                    else "no bundle deployed")
            log(f"stopped ({stopped_by}); {kept}")
        elif saved:
            log(f"checkpointed at step {service.step}")


def serve_device(config: ServiceConfig, *, port: str | None = None, listen_address: str | None = None,
                 key: bytes | None = None, baudrate: int = 115200, profile_name: str | None = None,
                 idle_timeout: float = 60.0, ready: Callable[[str], None] = print,
                 log: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic,
                 clock_ns: Callable[[], int] = time.perf_counter_ns) -> None:
    """`edgefa device serve`: serve this device from the store `config.store` until SIGTERM or
    Ctrl-C, with this machine's profiler (`profile_name`: a device profile, default detected).
    Every refusal comes before anything is created: a bundle given as the store, an address that
    cannot be bound (in use, not this machine's: a probe binds it and closes it at once; `serve`
    binds it again), and then a store another process serves (DeviceService takes its lock first).
    `clock` (the server's timeouts) and `clock_ns` (the profiler's timestamps) are injected by the
    soak benchmark to run the server's time days per second; the defaults are the real clocks."""
    from ..out_folders import check_store_folder
    from ..profiling.machine import open_profiler
    from ..runtime.backends import runs_on_gpu

    check_store_folder(config.store)
    if listen_address is not None:
        listen(listen_address).close()
    profiler, machine = open_profiler(profile_name, work_on_gpu=runs_on_gpu(config.provider), clock_ns=clock_ns)
    service = DeviceService(config, profiler.start(), log=log)
    log(f"device profile {machine.profile.name} ({machine.how_recognized}); {machine.energy_line}")
    service.machine = {"name": machine.profile.name, "display_name": machine.profile.display_name,
                       "detected": bool(machine.profile.detected), "how": machine.how_recognized}
    stop_on_sigterm()
    serve(service, port=port, listen_address=listen_address, key=key, baudrate=baudrate,
          ready=ready, log=log, timeouts=PeerTimeouts.from_idle(idle_timeout), clock=clock)
