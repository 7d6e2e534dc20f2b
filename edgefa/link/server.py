"""The device server: a transport, the protocol and the service, in one loop.

One host at a time (a device has one owner). Over TCP the server accepts the next connection
when one ends; on a serial port or a pseudo-terminal it keeps reading the same line, and a host
that comes back simply starts a new session with HELLO.
"""

from __future__ import annotations

import signal
import time
from typing import Callable

from ..errors import EdgefaError
from .protocol import Connection, LinkError, LinkLost, MessageReceived, SessionStarted
from .service import DeviceService
from .transport import FdTransport, SerialTransport, accept, exchange, listen, open_pty


def serve_connection(transport, service: DeviceService, conn: Connection, log: Callable[[str], None]) -> None:
    """Serve one transport until it fails (LinkError) or the process is asked to stop."""
    try:
        while True:
            exchange(conn, transport, wait=0.5)
            while (event := conn.next_event()) is not None:
                if isinstance(event, MessageReceived):
                    conn.send(service.handle(event.data), time.monotonic())
                    transport.write(conn.data_to_send())
                    service.after_reply()
                elif isinstance(event, SessionStarted):
                    log(f"session {conn.stats.sessions} started: {event.peer}")
                elif isinstance(event, LinkLost):
                    log(f"session lost: {event.reason}")
    finally:
        s = conn.stats
        if s.forged or s.replayed:
            log(f"refused so far: {s.forged} forged and {s.replayed} replayed frames")


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
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def serve(service: DeviceService, *, port: str | None = None, listen_address: str | None = None,
          key: bytes | None = None, max_fragment: int = 64 * 1024, baudrate: int = 115200,
          ready: Callable[[str], None] = print, log: Callable[[str], None] = print) -> None:
    """Serve until interrupted. `port` is a pyserial URL or 'pty' (make a pseudo-terminal and
    print the path the host should open); `listen_address` is ADDR:PORT for TCP."""
    conn = Connection("server", key=key, hello=service.hello(), max_fragment=max_fragment)
    service.link_stats = conn.stats      # reported by `info`: forged and replayed frames among them
    try:
        if listen_address is not None:
            server = listen(listen_address)
            host, bound = server.getsockname()[:2]
            ready(f"listening on {host}:{bound}")
            with server:
                while True:
                    transport = accept(server)
                    log(f"connection from {transport.name}")
                    conn.reset_input()
                    try:
                        serve_connection(transport, service, conn, log)
                    except LinkError as exc:
                        log(f"connection ended: {exc}")
                    finally:
                        transport.close()
        elif port == "pty":
            master, path = open_pty()
            ready(f"serving on {path}")
            transport = FdTransport(master, path)
            while True:
                try:
                    serve_connection(transport, service, conn, log)
                except LinkError:
                    time.sleep(0.2)      # the host closed its side (EIO); it may open it again
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
    except KeyboardInterrupt:
        pass
    finally:
        if service.engine is not None and service.step != service.checkpointed_step:
            service.checkpoint()
            log(f"checkpointed at step {service.step}")
