"""A wrong endpoint fails fast, and two hosts can share one serial line.

1. Whatever answers HELLO with bytes that are not edgefa frames (an SSH banner, an HTTP reply,
   binary noise, our own HELLO echoed by loop://) is "not an edgefa device": one line at once,
   never retried. A peer that stays silent is given 3 s, once more, then one line (it used to
   take 65 s: 10 s per try, five reconnects).
2. Two hosts on one pseudo-terminal: the second is refused "device busy" in one line (exit 2) and
   the first carries on without a stall (the second used to crash with KeyError: 'device' and
   stall the first for ~100 s); a host that says BYE or closes its side frees the line at once,
   and one idle past the idle timeout is released. A reply missing what the host reads is one
   line, never a KeyError.

Real parts: real loopback sockets as the wrong endpoints, a real `edgefa device serve --port pty`
process (torch made unimportable), the real client and CLI. The protocol unit test drives real
Connections through bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import REPO, assert_one_error_line, run_edgefa
from test_link_live import device_server

from edgefa.errors import EdgefaError
from edgefa.link.client import ClientConfig, DeviceClient
from edgefa.link.frames import FrameDecoder, Kind
from edgefa.link.messages import encode
from edgefa.link.protocol import (Connection, LineBusy, LinkError, MessageReceived, SessionEnded,
                                  SessionRefused, SessionStarted)
from edgefa.link.transport import FdTransport, exchange

FAST_S = 1.5          # "at once": the answer's round trip, on two busy cores
SILENT_LIMIT_S = 8.0  # 3 s, a 0.1 s pause, 3 s again, and slack


# --- 1. wrong endpoints ---------------------------------------------------------------------------

@contextlib.contextmanager
def fake_endpoint(answer: bytes | None, close_after: bool = False):
    """A loopback TCP server that, for each connection, waits for the first bytes (the HELLO), then
    sends `answer` (None: nothing, ever), then closes (`close_after`) or stays silent. Yields its
    URL and the list of connections it accepted."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def run():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            accepted.append(conn)
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                conn.recv(4096)
                if answer is not None:
                    conn.sendall(answer)
                if close_after:
                    conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"socket://127.0.0.1:{listener.getsockname()[1]}", accepted
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()
        for conn in accepted:
            conn.close()


def fail_once(url: str, config: ClientConfig | None = None) -> tuple[EdgefaError, float, DeviceClient]:
    """`info` through the real client: the error it ends with, the seconds it took, the client."""
    t0 = time.monotonic()
    with pytest.raises(EdgefaError) as failed:
        with DeviceClient(url, config or ClientConfig()) as dev:
            dev.info()
    took = time.monotonic() - t0
    assert "\n" not in str(failed.value)
    return failed.value, took, dev


@pytest.mark.parametrize("answer, close_after, words", [
    (b"SSH-2.0-OpenSSH_9.2\r\n", False, "it answered in text: 'SSH-2.0-OpenSSH_9.2'"),
    (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", True,
     "it answered in text: 'HTTP/1.1 400 Bad Request"),
    (bytes([0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x50]), True, "bytes that are not edgefa frames"),
], ids=["ssh banner", "http reply", "binary then close"])
def test_an_answer_that_is_not_frames_is_not_an_edgefa_device(answer, close_after, words):
    with fake_endpoint(answer, close_after) as (url, accepted):
        error, took, dev = fail_once(url)
    assert f"{url}: not an edgefa device: " in str(error) and words in str(error), error
    assert not isinstance(error, LinkError) and dev.reconnects == 0 and len(accepted) == 1
    assert took < FAST_S, took


def test_binary_noise_then_silence_is_named_after_one_wait():
    """Bytes with no frame in them, then silence (a serial line at another baud rate): one wait
    of 3 s, no second try, and the line names the bytes."""
    with fake_endpoint(bytes(range(0x80, 0xA0))) as (url, accepted):
        error, took, dev = fail_once(url)
    assert "not an edgefa device: it answered with bytes that are not edgefa frames (b'\\x80\\x81" in str(error)
    assert "--baud" in str(error) and dev.reconnects == 0 and len(accepted) == 1
    assert 2.5 < took < 3 + FAST_S, took


def test_loop_url_echoes_our_hello():
    error, took, dev = fail_once("loop://")
    assert "loop://: not an edgefa device: it sends back what this host sends" in str(error), error
    assert not isinstance(error, LinkError) and dev.reconnects == 0 and took < FAST_S, took


def test_a_silent_peer_gets_one_retry_then_one_line():
    """Accepts, reads the HELLO, never answers: 3 s, once more, then one line (was 65 s)."""
    with fake_endpoint(None) as (url, accepted):
        error, took, dev = fail_once(url)
    assert isinstance(error, LinkError), error
    assert str(error) == (f"{url}: no answer to HELLO within 3 s (is `edgefa device serve` running there?) "
                          "(gave up after 1 reconnect)")
    assert dev.reconnects == 2 and len(accepted) == 2
    assert 6.0 <= took < SILENT_LIMIT_S, took


def test_the_cli_says_each_in_one_line():
    """The same through `edgefa device info` (exit 2, one line, no traceback), run side by side."""
    with fake_endpoint(b"SSH-2.0-OpenSSH_9.2\r\n") as (ssh, _), fake_endpoint(None) as (silent, _):
        runs = [("device", "info", ssh), ("device", "info", silent), ("device", "info", "loop://")]
        with ThreadPoolExecutor(max_workers=3) as pool:
            procs = list(pool.map(lambda args: run_edgefa(*args, without_torch=True, timeout=120), runs))
    assert_one_error_line(procs[0], "not an edgefa device", "SSH-2.0-OpenSSH_9.2")
    assert_one_error_line(procs[1], "no answer to HELLO within 3 s", "gave up after 1 reconnect")
    assert_one_error_line(procs[2], "loop://: not an edgefa device", "echo")


# --- 2. two hosts on one line: the protocol ---------------------------------------------------------

def run_until_quiet(server: Connection, clients: list[Connection], deliver, now: float) -> None:
    """Move bytes until nobody has any to send: each client's bytes go to the server; the server's
    go to `deliver(data)` (the shared line decides which client reads them)."""
    for _ in range(20):
        moved = False
        for c in clients:
            if data := c.data_to_send():
                server.receive_data(data, now)
                moved = True
        if data := server.data_to_send():
            deliver(data)
            moved = True
        if not moved:
            return


def test_a_second_hello_on_a_shared_line_is_refused_busy_and_the_first_host_ignores_the_refusal():
    server = Connection("server", hello={"role": "device"}, session_hold=5.0)
    first = Connection("client", hello={"role": "host", "client": "aa", "host": "one", "pid": 1})
    second = Connection("client", hello={"role": "host", "client": "bb", "host": "two", "pid": 2})
    first.connect(0.0)
    run_until_quiet(server, [first], lambda d: first.receive_data(d, 0.0), 0.0)
    assert first.is_open and isinstance(first.events()[0], SessionStarted)
    server.events()

    second.connect(1.0)                       # its HELLO while the first is active (1 s ago)
    refusal = []
    run_until_quiet(server, [second], refusal.append, 1.0)
    frames = FrameDecoder().feed(b"".join(refusal))
    assert [f.kind for f in frames] == [Kind.REFUSE] and frames[0].seq != 0
    assert server.is_open and server.stats.busy_hellos == 1 and server.events() == []

    first.receive_data(b"".join(refusal), 1.0)          # the first host read it off the line: not for it
    assert first.is_open and first.events() == []
    second.receive_data(b"".join(refusal), 1.0)         # the second host did
    (event,) = second.events()
    assert isinstance(event, SessionRefused) and event.reason.startswith(
        "device busy: in a session with host 'one' (pid 1) for 1 s, active 1.0 s ago"), event

    first.close_session()                                # BYE: the line is free at once
    run_until_quiet(server, [first], lambda d: None, 1.5)
    assert isinstance(server.events()[0], SessionEnded) and not server.is_open
    second.connect(1.6)
    run_until_quiet(server, [second], lambda d: second.receive_data(d, 1.6), 1.6)
    assert second.is_open


def test_a_first_contact_that_reads_another_sessions_frames_stops_at_once():
    """Every frame a second host reads is one the host in session loses: it stops at the first
    DATA or ACK of a session that cannot be its own. A host that has had sessions ignores them (its
    own old session's repeats may still arrive after it reconnects)."""
    server = Connection("server", hello={"role": "device"})
    first = Connection("client", hello={"role": "host", "client": "aa"})
    first.connect(0.0)
    run_until_quiet(server, [first], lambda d: first.receive_data(d, 0.0), 0.0)
    first.send(encode({"op": "status"}), 0.1)
    server.receive_data(first.data_to_send(), 0.1)
    server.send(encode({"ok": True, "step": 3}), 0.1)
    traffic = server.data_to_send()                       # an ACK and a DATA of the first host's session

    fresh = Connection("client", hello={"role": "host", "client": "bb"})
    fresh.connect(0.2)
    fresh.receive_data(traffic, 0.2)
    (event,) = fresh.events()
    assert isinstance(event, LineBusy) and event.what == (
        "another host is in a session on this line (ACK frames of its session seen)"), event
    assert not fresh.is_open and fresh.data_to_send().count(b"\xefA") == 1    # its one HELLO, no more

    first.events()
    first.connect(0.3)                                    # a reconnecting host: not busy, keeps waiting
    first.data_to_send()
    first.receive_data(traffic, 0.3)
    assert first.events() == [] and first.overheard is None


def test_an_idle_session_is_released_and_the_same_host_may_always_come_back():
    server = Connection("server", hello={"role": "device"}, session_hold=5.0)
    first = Connection("client", hello={"role": "host", "client": "aa"})
    again = Connection("client", hello={"role": "host", "client": "aa"})     # the same host, reconnecting
    other = Connection("client", hello={"role": "host", "client": "bb"})
    first.connect(0.0)
    run_until_quiet(server, [first], lambda d: first.receive_data(d, 0.0), 0.0)
    again.connect(1.0)
    run_until_quiet(server, [again], lambda d: again.receive_data(d, 1.0), 1.0)
    assert again.is_open and server.stats.busy_hellos == 0
    other.connect(7.0)                                  # 6 s after the session's last frame: released
    run_until_quiet(server, [other], lambda d: other.receive_data(d, 7.0), 7.0)
    assert other.is_open and server.stats.sessions == 3


def test_over_a_connection_of_its_own_a_new_hello_still_takes_over():
    """No session_hold (TCP, where the gate refuses a second connection): as before."""
    server = Connection("server", hello={"role": "device"})
    for i, name in enumerate(("aa", "bb")):
        c = Connection("client", hello={"role": "host", "client": name})
        c.connect(float(i))
        run_until_quiet(server, [c], lambda d: c.receive_data(d, float(i)), float(i))
        assert c.is_open
    assert server.stats.sessions == 2 and server.stats.busy_hellos == 0


# --- 2. two hosts on one line: a real pty server -----------------------------------------------------

@pytest.fixture
def pty_server(tmp_path, tiny_bundle):
    with device_server(tmp_path / "store", port="pty", extra=["--idle-timeout", 3]) as srv:
        with DeviceClient(srv.url) as dev:
            dev.deploy(tiny_bundle)
        yield srv


FIRST_STEPS = 3000      # about 4 s here: the first host is still fine-tuning when the second tries


def test_two_hosts_on_one_pty_the_second_is_told_busy_and_the_first_is_not_stalled(pty_server, digits_npz, tmp_path):
    """`edgefa finetune --device PTY` in progress; a second host (the library, then `edgefa device
    info PTY`) gets "device busy" in one line at once, and the first host's longest round trip stays
    short (it used to stall ~100 s while the second crashed with KeyError: 'device')."""
    report = tmp_path / "first.json"
    first = subprocess.Popen([sys.executable, "-m", "edgefa.without_torch", "finetune", "--device", pty_server.url,
                              "--data", str(digits_npz), "--steps", str(FIRST_STEPS), "--batch-size", "16",
                              "--lr", "0.001", "--report", str(report)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                             env=dict(os.environ, COLUMNS="120"))
    try:
        deadline = time.monotonic() + 60
        while "session 2 started" not in pty_server.stderr():       # (session 1: the fixture's deploy)
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        t0 = time.monotonic()
        with pytest.raises(EdgefaError) as busy:
            with DeviceClient(pty_server.url) as second:
                second.info()
        took = time.monotonic() - t0
        cli = run_edgefa("device", "info", pty_server.url, without_torch=True, timeout=120)
        overlapped = first.poll() is None
        _, first_err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert overlapped, "the first host was done before the second tried: raise FIRST_STEPS"
    # the device's "busy" answer, or (when the second host reads the first one's frames first) its own
    message = str(busy.value)
    assert message.startswith(f"{pty_server.url}: ") and ("device busy: in a session with host" in message
                                                          or "device busy: another host is in a session" in message)
    assert second.reconnects == 0 and took < FAST_S, took
    assert_one_error_line(cli, "device busy: ")
    assert first.returncode == 0, first_err
    result = json.loads(report.read_text())
    assert result["final_step"] == FIRST_STEPS and result["reconnects"] == 0 and result["refused_steps"] == []
    assert max(result["round_trip_ms"]) < 5000, max(result["round_trip_ms"])      # was ~100 s
    with DeviceClient(pty_server.url) as dev:           # the first host said BYE: served at once
        assert dev.status()["step"] == FIRST_STEPS


def test_a_pty_host_that_closes_without_bye_or_idles_frees_the_line(pty_server):
    """Closed without BYE (as a killed host): the server sees the pty's other side go, and the next
    host is served at once. Idle with the pty open: refused while active, served after --idle-timeout (3 s)."""
    gone = DeviceClient(pty_server.url)
    gone.status()
    gone.transport.close()                    # no BYE: the way SIGKILL leaves it
    gone.transport = None
    time.sleep(0.5)                           # (a host started again takes longer than this to open it)
    t0 = time.monotonic()
    with DeviceClient(pty_server.url) as dev:
        dev.status()
    assert time.monotonic() - t0 < FAST_S

    with DeviceClient(pty_server.url) as idle:
        idle.status()
        with pytest.raises(EdgefaError, match="device busy: in a session with host"):
            with DeviceClient(pty_server.url) as second:
                second.status()
        time.sleep(3.5)
        with DeviceClient(pty_server.url) as second:
            assert second.status()["step"] == 0
        idle.transport.close()                # its session is gone: leave without a BYE into another's
        idle.transport = None


# --- a reply missing what the host reads --------------------------------------------------------------

@contextlib.contextmanager
def device_answering(reply_fields: dict):
    """A device on loopback that speaks the real protocol and answers every request with a reply
    of these fields and nothing else (a device of another version, or bytes for another host)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def run():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                sock, _ = listener.accept()
            except OSError:
                continue
            transport = FdTransport(sock.fileno(), "fake", owned=sock)
            conn = Connection("server", hello={"role": "device", "protocol": 1})
            with contextlib.suppress(LinkError):
                while not stop.is_set():
                    exchange(conn, transport, wait=0.05)
                    for event in conn.events():
                        if isinstance(event, MessageReceived):
                            conn.send(encode(reply_fields), time.monotonic())
            transport.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"socket://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


@pytest.mark.parametrize("fields, op, words", [
    ({"ok": True}, "info", "unexpected reply to info: no 'device'"),
    ({"ok": True, "device": {"model": "x"}}, "info", "unexpected reply to info: no 'device.machine'"),
    ({"ok": True, "step": "7"}, "status", "unexpected reply to status: 'step' is str"),
    ({"ok": False, "code": "step_ahead", "error": "ahead"}, "status", "unexpected reply to status: no 'step'"),
])
def test_a_reply_without_what_the_host_reads_is_one_line(fields, op, words):
    with device_answering(fields) as url:
        with pytest.raises(EdgefaError, match=words) as failed:
            with DeviceClient(url) as dev:
                getattr(dev, op)()
        assert "\n" not in str(failed.value) and "another edgefa version" in str(failed.value)
        if op == "info":
            assert_one_error_line(run_edgefa("device", "info", url, without_torch=True, timeout=120), words)
