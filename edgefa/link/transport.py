"""Byte pipes under the protocol: anything pyserial's `serial_for_url` opens, a listening TCP
socket's connections, a pseudo-terminal we created, and a wrapper that injects faults.

Every transport has the same three calls: `read(timeout)` returns what has arrived (b"" when
nothing did), `write(data)` sends all of it, `close()`. A transport that can no longer carry
bytes raises LinkError from read or write.
"""

from __future__ import annotations

import errno
import io
import math
import os
import random
import select
import socket
import time
import tty
from urllib.parse import urlsplit

import serial

from ..errors import EdgefaError
from .protocol import LinkError

READ_MAX = 256 * 1024
GONE_AFTER_S = 0.5       # a tty "ready" with nothing to read for this long, without a pause: gone

# Why a port may open on a later try: a device restarting refuses connections for a moment, a
# network or a USB port comes back, another process lets go of a serial port.
_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN,
                     errno.EBUSY, errno.EIO, errno.EAGAIN, errno.EINTR}


class OpenError(EdgefaError):
    """A transport that would not open. `retry`: the same URL may open on a later try (a device
    restarting refuses connections); not so for a malformed URL, an unknown scheme or a host that
    does not resolve. `missing`: a device file that is not there, which comes back only where it
    was there before (a USB serial device re-enumerating)."""

    def __init__(self, message: str, retry: bool, missing: bool = False):
        super().__init__(message)
        self.retry, self.missing = retry, missing


def _check_socket_url(url: str) -> None:
    """socket://HOST:PORT, checked before pyserial sees it (whose messages for a bad one are
    "'<=' not supported between instances of 'int' and 'NoneType'" and the like)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise OpenError(f"{url}: not a socket://HOST:PORT URL ({exc})", retry=False) from None
    if not parts.hostname or port is None or not 0 < port < 65536:
        raise OpenError(f"{url}: not a socket://HOST:PORT URL (PORT from 1 to 65535)", retry=False)


def _open_error(url: str, exc: Exception) -> OpenError:
    """What pyserial's failure means for trying again (pyserial wraps the OSError it met)."""
    cause = exc.__context__ if isinstance(exc, serial.SerialException) and exc.__context__ else exc
    if isinstance(cause, socket.gaierror):
        # EAI_AGAIN: the resolver did not answer this time; any other answer is final
        return OpenError(f"cannot open {url}: its host does not resolve ({cause.strerror})",
                         retry=cause.errno == socket.EAI_AGAIN)
    if isinstance(cause, FileNotFoundError):
        return OpenError(f"cannot open {url}: no such device", retry=False, missing=True)
    if isinstance(cause, TimeoutError) or (isinstance(cause, OSError) and cause.errno in _TRANSIENT_ERRNOS):
        return OpenError(f"cannot open {url}: {cause.strerror or cause}", retry=True)
    # the rest is final: an unknown scheme ("invalid URL, protocol 'x' not known"), a file that is
    # not a serial port, a permission denied
    return OpenError(f"cannot open {url}: {exc}", retry=False)


class SerialTransport:
    """A pyserial port by URL: /dev/ttyUSB0, /dev/pts/N, socket://host:port, loop://, rfc2217://..."""

    def __init__(self, url: str, baudrate: int = 115200):
        if url.startswith("socket://"):
            _check_socket_url(url)
        try:
            # timeout 0: pyserial never blocks in read; we wait in select ourselves, so a read returns
            # as soon as anything arrives instead of waiting for a full buffer.
            self.port = serial.serial_for_url(url, baudrate=baudrate, timeout=0)
        except (serial.SerialException, ValueError, OSError) as exc:
            raise _open_error(url, exc) from None
        self.url = url
        sock = getattr(self.port, "_socket", None)   # socket://: pyserial leaves Nagle on, which
        if isinstance(sock, socket.socket):          # holds a small frame ~40 ms behind the last
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self._fd = self.port.fileno()
        except (AttributeError, NotImplementedError, io.UnsupportedOperation, serial.SerialException):
            self._fd = None                   # loop:// and friends: poll in_waiting instead
        self._tty = self._fd is not None and os.isatty(self._fd)
        self._empty_since: float | None = None

    def read(self, timeout: float) -> bytes:
        try:
            if self._fd is not None:
                if not select.select([self._fd], [], [], max(timeout, 0))[0]:
                    self._empty_since = None
                    return b""
                return self._read_tty() if self._tty else self.port.read(READ_MAX)
            deadline = time.monotonic() + timeout
            while not self.port.in_waiting and time.monotonic() < deadline:
                time.sleep(0.0005)
            return self.port.read(self.port.in_waiting)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise LinkError(f"{self.url}: {exc}") from None

    def _read_tty(self) -> bytes:
        """A tty said it was ready. Nothing to read then means another process on the same line
        read it first (two hosts on one port; pyserial's read calls that a disconnect), or a device
        that is gone (a hung-up tty stays ready with nothing to read): only the second lasts."""
        try:
            data = os.read(self._fd, READ_MAX)
        except BlockingIOError:
            data = b""
        if data:
            self._empty_since = None
            return data
        now = time.monotonic()
        if self._empty_since is None:
            self._empty_since = now
        elif now - self._empty_since > GONE_AFTER_S:
            raise LinkError(f"{self.url}: ready to read, yet nothing came for {GONE_AFTER_S:g} s (disconnected?)")
        return b""

    def write(self, data: bytes) -> None:
        if not data:
            return
        try:
            self.port.write(data)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise LinkError(f"{self.url}: {exc}") from None

    def close(self) -> None:
        try:
            self.port.close()
        except (serial.SerialException, OSError):
            pass


class FdTransport:
    """A raw file descriptor: a connected socket, or the master side of a pseudo-terminal."""

    def __init__(self, fd: int, name: str, owned: object | None = None):
        self.fd, self.name, self._owned = fd, name, owned
        os.set_blocking(fd, True)

    def read(self, timeout: float) -> bytes:
        try:
            if not select.select([self.fd], [], [], max(timeout, 0))[0]:
                return b""
            data = os.read(self.fd, READ_MAX)
        except OSError as exc:   # EIO on a pty master whose other side closed
            raise LinkError(f"{self.name}: {exc.strerror or exc}") from None
        if not data:
            raise LinkError(f"{self.name}: closed by the peer")
        return data

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:
            raise LinkError(f"{self.name}: {exc.strerror or exc}") from None

    def close(self) -> None:
        try:
            if isinstance(self._owned, socket.socket):
                self._owned.close()
            else:
                os.close(self.fd)
        except OSError:
            pass

    def close_gracefully(self, linger: float = 1.0) -> None:
        """A socket: send our last bytes' FIN, read whatever the peer still sends (up to `linger`
        seconds, until it closes), then close. Closing with unread bytes would send a RST, which
        may discard our last words (a REFUSE) before the peer reads them."""
        if isinstance(self._owned, socket.socket):
            deadline = time.monotonic() + linger
            try:
                self._owned.shutdown(socket.SHUT_WR)
                while (left := deadline - time.monotonic()) > 0 and self.read(left):
                    pass
            except (OSError, LinkError):
                pass
        self.close()


def open_pty() -> tuple[int, str]:
    """A pseudo-terminal in raw mode: returns (master fd, slave path). The slave path is what the
    other side opens with pyserial, as it would open /dev/ttyUSB0."""
    master, slave = os.openpty()
    tty.setraw(slave)            # no echo, no line editing: a byte pipe
    path = os.ttyname(slave)
    os.close(slave)              # reopened by whoever opens `path`
    return master, path


def listen(address: str) -> socket.socket:
    """A listening TCP socket for ADDR:PORT (port 0: any free port)."""
    host, _, port = address.rpartition(":")
    try:
        sock = socket.create_server((host or "127.0.0.1", int(port)), reuse_port=False)
    except (OSError, ValueError) as exc:
        raise EdgefaError(f"cannot listen on {address}: {exc}") from None
    return sock


def accept(server: socket.socket, timeout: float | None = None) -> FdTransport | None:
    server.settimeout(timeout)
    try:
        conn, peer = server.accept()
    except socket.timeout:
        return None
    conn.setblocking(True)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # small frames go out at once
    return FdTransport(conn.fileno(), f"tcp {peer[0]}:{peer[1]}", owned=conn)


class FaultyTransport:
    """Wraps a transport and damages the bytes that pass through it, in both directions, at given
    per-byte rates: flip one bit, drop the byte, send it twice; `delay` is the chance that a write
    is held back by `delay_s`. Seeded, so a failing run can be replayed."""

    def __init__(self, inner, flip: float = 0.0, drop: float = 0.0, duplicate: float = 0.0,
                 delay: float = 0.0, delay_s: float = 0.005, seed: int = 0):
        self.inner = inner
        self.flip, self.drop, self.duplicate, self.delay, self.delay_s = flip, drop, duplicate, delay, delay_s
        self.rng = random.Random(seed)
        self.damaged = 0

    def _damage(self, data: bytes) -> bytes:
        p = self.flip + self.drop + self.duplicate
        if not data or p <= 0:
            return data
        out = bytearray()
        rng = self.rng
        i, n = 0, len(data)
        while True:
            # jump straight to the next damaged byte: one draw per damage, not one per byte
            gap = int(_geometric(rng, p))
            if i + gap >= n:
                out += data[i:]
                return bytes(out)
            out += data[i:i + gap]
            i += gap
            r = rng.random() * p
            b = data[i]
            if r < self.flip:
                out.append(b ^ (1 << rng.randrange(8)))
            elif r < self.flip + self.drop:
                pass
            else:
                out += bytes([b, b])
            self.damaged += 1
            i += 1

    def read(self, timeout: float) -> bytes:
        return self._damage(self.inner.read(timeout))

    def write(self, data: bytes) -> None:
        if self.delay and self.rng.random() < self.delay:
            time.sleep(self.delay_s)
        self.inner.write(self._damage(data))

    def close(self) -> None:
        self.inner.close()


def _geometric(rng: random.Random, p: float) -> float:
    """Bytes before the next damaged one, when each byte is damaged with probability p."""
    if p >= 1:
        return 0
    return math.floor(math.log(1.0 - rng.random()) / math.log(1.0 - p))


def exchange(conn, transport, wait: float) -> int:
    """One turn of I/O for a protocol Connection: send what it has, wait up to `wait` seconds for
    bytes (less when one of its timers is due), feed them in, run its timers, send again. Returns
    how many bytes arrived.

    The Connection's timers (retransmission, giving up) read time.monotonic: they time round
    trips on the wire, which an injected clock (server.serve's `clock`) must not speed up."""
    transport.write(conn.data_to_send())
    deadline = conn.next_deadline()
    if deadline is not None:
        wait = min(wait, max(deadline - time.monotonic(), 0.0))
    data = transport.read(wait)
    now = time.monotonic()
    if data:
        conn.receive_data(data, now)
    conn.poll(now)
    transport.write(conn.data_to_send())
    return len(data)
