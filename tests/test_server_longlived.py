"""A device server that stays up: a `profile` reply that does not grow with uptime, silent and
hostile TCP peers dropped and counted, a second host told "busy" at once, and URLs that can never
work failing at once instead of being retried.

Real parts: a real DeviceService on the conftest bundle, a real `edgefa device serve` process
(torch made unimportable) with raw sockets as the silent peers, the real client and CLI.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import assert_one_error_line, run_edgefa
from test_link_fuzz import RawPeer
from test_link_live import device_server

from edgefa.errors import EdgefaError
from edgefa.link.client import ClientConfig, DeviceClient
from edgefa.link.frames import CRC, HEADER, MAGIC, Kind, encode_frame
from edgefa.link.messages import MAX_HEADER, decode, encode
from edgefa.link.protocol import FRAGMENT, LinkError
from edgefa.link.service import DeviceService, ServiceConfig
from edgefa.profiling.profiler import SERIES_POINTS, Profiler

IDLE_S = 1.5          # the server's --idle-timeout here (so the handshake limit is 1.5 s too)
SLACK_S = 2.0         # the most a drop may come late on two busy cores (the loop polls every 0.5 s)


# --- 1. the profile reply of a server up for weeks ---------------------------------------------

class ShiftedClock:
    """perf_counter_ns plus an offset the test moves forward: windows keep their real durations,
    and the uptime between them is whatever the test says."""

    def __init__(self):
        self.offset_ns = 0

    def __call__(self) -> int:
        return time.perf_counter_ns() + self.offset_ns


def profile_reply_sizes(service: DeviceService) -> tuple[int, int]:
    """(JSON header bytes, whole message bytes) of the service's answer to `profile`."""
    reply = service.handle(encode({"op": "profile"}))
    assert decode(reply)["ok"], decode(reply).fields
    return int.from_bytes(reply[:4], "big"), len(reply)


def test_the_profile_reply_of_a_real_service_does_not_grow_with_uptime(tmp_path, tiny_bundle):
    """Training steps an hour apart (about 50 days in all) and a sample every simulated minute:
    the `profile` reply after 50 days is the size it was after 25, far under the header limit.
    (It used to outgrow the 64 KiB header after about three minutes of real uptime.)"""
    store = tmp_path / "store"
    store.mkdir()
    shutil.copytree(tiny_bundle, store / "bundle")
    clock = ShiftedClock()
    service = DeviceService(ServiceConfig(store=store, checkpoint_every=0),
                            Profiler(warmup=0, max_samples=30_000, clock_ns=clock))
    status = decode(service.handle(encode({"op": "status"}))).fields
    width, classes = status["model"][0], status["model"][-1]
    rng = np.random.default_rng(0)
    sizes = []
    for half in range(2):
        for _ in range(600):
            step = service.step
            x = rng.standard_normal((8, width)).astype(np.float32)
            y = rng.integers(0, classes, 8)
            reply = decode(service.handle(encode({"op": "train", "id": step, "step": step}, {"x": x, "y": y})))
            assert reply["ok"], reply.fields
            for _ in range(25):                    # a sample a minute in the hour between steps
                clock.offset_ns += 60 * 10 ** 9 // 25
                service.profiler.sample_now()
            clock.offset_ns += 3600 * 10 ** 9 - 60 * 10 ** 9
        sizes.append(profile_reply_sizes(service))
    (header_25, size_25), (header_50, size_50) = sizes
    assert header_50 < MAX_HEADER // 4, sizes
    assert size_50 <= size_25 + 1024, sizes
    summary = service.profiler.summary()
    assert len(summary["phases"]["train_step"]["samples_ms"]) == SERIES_POINTS
    assert len(summary["memory"]["timeline"]["t_s"]) == SERIES_POINTS
    assert summary["memory"]["timeline"]["t_s"][-1] > 49 * 86400       # the uptime is really 50 days
    service.close()


# --- 2. silent, stalled and second hosts against a real server ----------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = tmp_path_factory.mktemp("longlived") / "store"
    with device_server(store, listen="127.0.0.1:0", extra=["--idle-timeout", IDLE_S]) as srv:
        yield srv


def host_port(srv) -> tuple[str, int]:
    host, port = srv.url.removeprefix("socket://").rsplit(":", 1)
    return host, int(port)


def seconds_until_closed(peer: RawPeer, since: float, limit: float = IDLE_S + 3 * SLACK_S) -> float:
    """Wait for the server to close the connection (the reader thread sees EOF)."""
    peer.thread.join(timeout=limit)
    assert not peer.thread.is_alive(), f"the server kept a silent peer for {limit} s"
    return time.monotonic() - since


def refusals(peer: RawPeer) -> list[str]:
    return [f.payload.decode() for f in peer.frames if f.kind == Kind.REFUSE]


def link_counters(srv) -> dict:
    with DeviceClient(srv.url, ClientConfig(reconnects=0)) as dev:
        return dev.info()["link"]


def test_a_peer_silent_before_hello_is_dropped(server):
    before = link_counters(server)
    t0 = time.monotonic()
    peer = RawPeer(*host_port(server))
    took = seconds_until_closed(peer, t0)
    assert IDLE_S <= took <= IDLE_S + SLACK_S, took
    assert refusals(peer) == [f"closed: no HELLO within {IDLE_S:g} s of connecting"]
    assert link_counters(server)["dropped_idle"] == before["dropped_idle"] + 1
    assert "no HELLO within" in server.stderr() and server.proc.poll() is None


def test_a_peer_silent_after_hello_is_dropped(server):
    before = link_counters(server)
    peer = RawPeer(*host_port(server))
    peer.handshake()
    t0 = time.monotonic()
    took = seconds_until_closed(peer, t0)
    assert IDLE_S - 0.1 <= took <= IDLE_S + SLACK_S, took
    assert refusals(peer) == [f"closed: silent for {IDLE_S:g} s"]
    assert link_counters(server)["dropped_idle"] == before["dropped_idle"] + 1


def test_a_peer_trickling_a_frame_that_never_ends_is_dropped(server):
    """After HELLO, a DATA frame's bytes one every 0.2 s: bytes keep arriving, no frame ever
    completes (the protocol's own stall timer never fires either), and the server drops it."""
    peer = RawPeer(*host_port(server))
    peer.handshake()
    t0 = time.monotonic()
    frame = encode_frame(Kind.DATA, 1, FRAGMENT.pack(1, 100, 0) + bytes(100))
    for b in frame:
        if not peer.thread.is_alive():
            break
        try:
            peer.send(bytes([b]))
        except OSError:
            break
        time.sleep(0.2)
        assert time.monotonic() - t0 < IDLE_S + 3 * SLACK_S, "still connected"
    took = seconds_until_closed(peer, t0)
    assert took <= IDLE_S + SLACK_S, took
    assert refusals(peer) == [f"closed: stalled mid-frame for {IDLE_S:g} s"]
    assert "stalled mid-frame" in server.stderr()


def test_a_host_that_pauses_less_than_the_timeout_keeps_its_session(server):
    with DeviceClient(server.url, ClientConfig(reconnects=0)) as dev:
        sessions = dev.info()["link"]["sessions"]
        time.sleep(IDLE_S / 2)
        again = dev.info()["link"]
        time.sleep(IDLE_S / 2)
        last = dev.info()["link"]
    assert again["sessions"] == last["sessions"] == sessions and dev.reconnects == 0


def test_a_second_host_is_told_busy_at_once(server):
    """While one host holds the device, a second gets one line naming who is served, at once and
    with no retry, from the library and from the CLI (exit 2); the first host is undisturbed."""
    with DeviceClient(server.url) as first:
        before = first.info()["link"]
        t0 = time.monotonic()
        with pytest.raises(EdgefaError) as busy:
            with DeviceClient(server.url, ClientConfig(reconnects=5)) as second:
                second.status()
        took = time.monotonic() - t0
        assert not isinstance(busy.value, LinkError) and second.reconnects == 0
        assert took < 4, took        # the hand-over grace (1 s) and the HELLO, never a 10 s timeout
        message = str(busy.value)
        assert "device busy: serving tcp 127.0.0.1:" in message and "since" in message and "\n" not in message

        # the CLI takes seconds to start: the first host keeps talking meanwhile (a host silent
        # past the idle timeout would be dropped, and the CLI then served)
        with ThreadPoolExecutor(max_workers=1) as pool:
            cli_run = pool.submit(run_edgefa, "device", "info", server.url, without_torch=True, timeout=60)
            while not cli_run.done():
                first.status()
                time.sleep(0.2)
        assert_one_error_line(cli_run.result(), "device busy: serving tcp 127.0.0.1:")
        link = first.info()["link"]
        assert first.reconnects == 0
    assert link["refused_busy"] == before["refused_busy"] + 2 and link["sessions"] == before["sessions"]
    assert "busy serving" in server.stderr()


def test_back_to_back_hosts_are_not_told_busy(server):
    """One host closes and the next connects at once (two commands in a script): the second is
    served, not refused because the server had not yet seen the first one go."""
    for _ in range(5):
        with DeviceClient(server.url, ClientConfig(reconnects=0)) as dev:
            assert dev.status()["step"] == 0


def test_idle_timeout_must_be_a_positive_number(tmp_path):
    for bad in ("0", "-1", "nan", "inf", "soon"):
        proc = run_edgefa("device", "serve", "--listen", "127.0.0.1:0", "--store", tmp_path / "s",
                          "--idle-timeout", bad, without_torch=True, timeout=60)
        assert proc.returncode == 2 and "--idle-timeout" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "s").exists()


# --- 3. errors that retrying cannot fix are not retried ----------------------------------------

@pytest.mark.parametrize("url, words", [
    ("bogus://device", "protocol 'bogus' not known"),
    ("socket://no-port-here", "not a socket://HOST:PORT URL"),
    ("socket://127.0.0.1:99999", "not a socket://HOST:PORT URL"),
    ("socket://edgefa-device.invalid:5555", "does not resolve"),
    ("/dev/edgefa-no-such-tty", "no such device"),
])
def test_a_url_that_can_never_work_fails_at_once(url, words):
    t0 = time.monotonic()
    with pytest.raises(EdgefaError, match=words) as failed:
        with DeviceClient(url, ClientConfig(reconnects=5)) as dev:
            dev.info()
    assert not isinstance(failed.value, LinkError)
    assert dev.reconnects == 0 and time.monotonic() - t0 < 1.0
    assert "\n" not in str(failed.value)


def test_the_cli_says_so_in_one_line():
    proc = run_edgefa("device", "info", "bogus://device", without_torch=True, timeout=60)
    assert_one_error_line(proc, "bogus://device", "not known")


def test_a_refused_connection_is_still_retried():
    """A device restarting refuses connections for a moment: that one is worth retrying."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]          # bound, never listening: connections are refused
        with pytest.raises(LinkError, match="gave up after 2 reconnects"):
            with DeviceClient(f"socket://127.0.0.1:{port}", ClientConfig(reconnects=2)) as dev:
                dev.info()
    assert dev.reconnects == 3


def raw_frame_of_version(version: int, kind: int, payload: bytes) -> bytes:
    """An intact frame (both CRCs right) of another protocol version."""
    header = HEADER.pack(MAGIC, version, kind, 0, 0, len(payload))
    body = header + CRC.pack(zlib.crc32(header)) + payload
    return body + CRC.pack(zlib.crc32(body))


def test_a_device_speaking_another_protocol_version_is_not_retried():
    """A peer answering HELLO with intact frames of link protocol v2: one attempt, one line."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    connections = []

    def answer_in_v2():
        listener.settimeout(10)
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            connections.append(conn)
            conn.recv(4096)                      # the HELLO
            conn.sendall(raw_frame_of_version(2, Kind.WELCOME, bytes(64)))

    thread = threading.Thread(target=answer_in_v2, daemon=True)
    thread.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(EdgefaError, match="speaks link protocol v2, this host v1") as failed:
            with DeviceClient(f"socket://127.0.0.1:{port}", ClientConfig(reconnects=5)) as dev:
                dev.info()
        assert not isinstance(failed.value, LinkError)
        assert dev.reconnects == 0 and len(connections) == 1 and time.monotonic() - t0 < 1.0
    finally:
        listener.close()
        for conn in connections:
            conn.close()


def test_a_key_the_device_does_not_take_is_not_retried(server, tmp_path):
    key_file = tmp_path / "host.key"
    key_file.write_bytes(bytes(range(32)))
    t0 = time.monotonic()
    with pytest.raises(EdgefaError, match="no shared key") as failed:
        with DeviceClient(server.url, ClientConfig(key=key_file.read_bytes(), reconnects=5)) as dev:
            dev.info()
    assert not isinstance(failed.value, LinkError) and dev.reconnects == 0 and time.monotonic() - t0 < 2.0
