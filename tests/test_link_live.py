"""The device link end to end: a real `edgefa device serve` process (torch made unimportable),
driven over TCP and pseudo-terminals by the host client and the CLI.

Every fine-tuning session here ends by comparing the device's weights, byte for byte, with one
local `edgefa device finetune` run of the same bundle, data, steps, batch size and seed: the link
may lose, damage, repeat and cut bytes, and the device may be killed, but no step may be applied
twice or lost. Seeded and offline; the small bundle of conftest and the digits.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import tty
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, assert_one_error_line, run_edgefa
from edgefa.bundle import PAYLOAD_FILES, pack_archive
from edgefa.shared.datasets import load_dataset
from edgefa.errors import EdgefaError
from edgefa.link import client as client_module
from edgefa.link.client import ClientConfig, DeviceClient, DeviceError, read_key
from edgefa.link.messages import decode, encode
from edgefa.link.protocol import Connection, LinkError, LinkLost, MessageReceived, SessionStarted, Timing
from edgefa.link.transport import FaultyTransport, FdTransport, SerialTransport, exchange

STEPS, BATCH, SEED = 40, 16, 0
NOISY_STEPS = 4      # sessions over a damaging line (each dropped byte costs a timeout): shorter
READY_TIMEOUT = 60.0


def fast_timing() -> Timing:
    """Short retransmission timers: loopback answers in well under a millisecond."""
    return Timing(initial_rto=0.2, min_rto=0.02)


# --- a real device server in a second process ------------------------------------------------

@dataclass
class Server:
    proc: subprocess.Popen
    line: str          # the one line it printed on stdout when ready
    url: str           # what DeviceClient opens: socket://HOST:PORT or the pty path
    log: Path          # its stderr

    def stop(self) -> None:
        """SIGTERM (the server checkpoints and exits), SIGKILL if it lingers; always reaped."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


def _read_ready_line(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    fd, buf = proc.stdout.fileno(), b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"device server not ready within {timeout:.0f} s; stderr:\n{log.read_text()}")
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"device server exited ({proc.wait()}) before it was ready; "
                                     f"stdout {buf!r}; stderr:\n{log.read_text()}")
            buf += chunk
    return buf.split(b"\n", 1)[0].decode()


def _spawn(store: Path, listen: str | None, port: str | None, extra) -> Server:
    assert (listen is None) != (port is None)
    where = ["--listen", listen] if listen is not None else ["--port", port]
    cmd = [sys.executable, "-m", "edgefa.without_torch", "device", "serve", *where,
           "--store", str(store), *map(str, extra)]
    log = Path(f"{store}.log")          # beside the store, appended to across restarts
    with open(log, "ab") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, cwd=REPO,
                                env=dict(os.environ, COLUMNS="120"))
    return Server(proc, "", "", log)


def _wait_ready(server: Server) -> Server:
    server.line = _read_ready_line(server.proc, server.log, READY_TIMEOUT)
    m = re.fullmatch(r"edgefa device server: (?:listening on (\S+:\d+)|serving on (\S+))", server.line)
    assert m, server.line
    server.url = f"socket://{m[1]}" if m[1] else m[2]
    return server


@contextlib.contextmanager
def device_servers(*specs: dict):
    """Several `edgefa device serve` processes, started at once (each spec: the keyword arguments
    of device_server); yields their Servers once all are ready, and always terminates them."""
    servers = []
    try:
        for spec in specs:
            servers.append(_spawn(spec["store"], spec.get("listen"), spec.get("port"), spec.get("extra", ())))
        yield [_wait_ready(server) for server in servers]
    finally:
        for server in servers:
            server.stop()


@contextlib.contextmanager
def device_server(store: Path, *, listen: str | None = None, port: str | None = None, extra=()):
    """Run `edgefa device serve` (--listen ADDR:PORT or --port pty|PATH) until the block ends;
    yield a Server once it has printed its ready line. The process is always terminated."""
    with device_servers({"store": store, "listen": listen, "port": port, "extra": extra}) as (server,):
        yield server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the clean reference: a local fine-tuning run of the same bundle ---------------------------

@pytest.fixture(scope="module")
def digits(digits_npz):
    return load_dataset(str(digits_npz))


@pytest.fixture(scope="module")
def reference_at(tiny_bundle_master, digits_npz, tmp_path_factory):
    """`edgefa device finetune --steps N` on a copy of the bundle, in a torch-free process: its
    checkpoint (weights, momentum, feedback, step), for N = STEPS and NOISY_STEPS (run at once)."""
    bundles = {}
    for steps in (STEPS, NOISY_STEPS):
        bundles[steps] = tmp_path_factory.mktemp(f"reference{steps}") / "bundle"
        shutil.copytree(tiny_bundle_master, bundles[steps])
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(lambda item: run_edgefa(
            "device", "finetune", item[1], "--data", digits_npz, "--steps", item[0], "--batch-size", BATCH,
            "--seed", SEED, without_torch=True), bundles.items()))
    refs = {}
    for (steps, bundle), proc in zip(bundles.items(), procs):
        assert proc.returncode == 0, proc.stderr
        refs[steps] = load_checkpoint(bundle / "state" / "checkpoint.npz")
        assert int(refs[steps]["step"]) == steps
    return refs.__getitem__


@pytest.fixture(scope="module")
def reference(reference_at) -> dict[str, np.ndarray]:
    return reference_at(STEPS)


def load_checkpoint(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def assert_same_state(state: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    """The device's weights and momentum (get_state) equal the reference checkpoint's, bit for bit."""
    names = sorted(k for k in state if k != "step")
    expected = sorted(k for k in ref if k not in ("step", "refused_steps") and not k.startswith("feedback/"))
    assert names == expected
    for k in names:
        a, b = state[k], ref[k]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), k
        assert np.array_equal(a, b), f"{k}: max |diff| {np.abs(a.astype(np.float64) - b).max()}"
        assert a.tobytes() == b.tobytes(), k
    assert int(state["step"]) == int(ref["step"])


def session(url: str, bundle: Path, data, config: ClientConfig | None = None, steps: int = STEPS):
    """Deploy, fine-tune `steps` steps and fetch the state; returns (state, client, finetune result)."""
    with DeviceClient(url, config) as dev:
        deployed = dev.deploy(bundle)
        assert deployed["step"] == 0 and deployed["bundle"] == deployed["sha256"]
        result = dev.finetune(data.X, data.y, steps, BATCH, SEED)
        state = dev.get_state()
        assert dev.status()["step"] == steps
    assert result["final_step"] == steps and result["refused_steps"] == []
    return state, dev, result


# --- 1. the same results over every transport, and as a local run -------------------------------

def test_tcp_and_pty_give_the_weights_of_a_local_run(tmp_path, tiny_bundle, digits, reference):
    states = {}
    with device_servers({"store": tmp_path / "store-tcp", "listen": "127.0.0.1:0"},
                        {"store": tmp_path / "store-pty", "port": "pty"}) as (tcp, pty):
        assert tcp.url.startswith("socket://127.0.0.1:") and pty.url.startswith("/dev/"), (tcp.line, pty.line)
        for kind, srv in (("tcp", tcp), ("pty", pty)):
            states[kind], dev, result = session(srv.url, tiny_bundle, digits)
            assert result["steps_run"] == STEPS and dev.reconnects == 0
    for k in states["tcp"]:
        assert states["tcp"][k].tobytes() == states["pty"][k].tobytes(), k
    assert_same_state(states["tcp"], reference)
    assert_same_state(states["pty"], reference)


def test_cli_deploy_info_finetune_pull_evaluate(tmp_path, tiny_bundle, digits_npz, digits, reference):
    with device_server(tmp_path / "store", listen="127.0.0.1:0") as srv:
        deploy = run_edgefa("deploy", tiny_bundle, "--device", srv.url, without_torch=True)
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        assert "deployed" in deploy.stdout and "device at step 0" in deploy.stdout, deploy.stdout

        info = run_edgefa("device", "info", srv.url, without_torch=True)
        assert info.returncode == 0, info.stdout + info.stderr
        sha = hashlib.sha256(pack_archive(tiny_bundle)).hexdigest()
        assert sha[:16] in info.stdout and "64 -> 32 -> 16 -> 10" in info.stdout, info.stdout
        assert re.search(r"step\s+│\s+0 \(checkpointed 0", info.stdout), info.stdout
        # edgefa's own TensorRT backend is listed with why it cannot run here (or that it can)
        assert re.search(r"tensorrt backend\s+│\s+(TensorRT|cuda-python|available)", info.stdout), info.stdout

        report = tmp_path / "report.json"
        tune = run_edgefa("finetune", "--device", srv.url, "--data", digits_npz, "--steps", STEPS,
                          "--batch-size", BATCH, "--seed", SEED, "--report", report, without_torch=True)
        assert tune.returncode == 0, tune.stdout + tune.stderr
        assert json.loads(report.read_text())["final_step"] == STEPS

        pulled = tmp_path / "pulled"
        pull = run_edgefa("device", "pull", srv.url, "--out", pulled, without_torch=True)
        assert pull.returncode == 0, pull.stdout + pull.stderr
        assert f"device state at step {STEPS}" in pull.stdout, pull.stdout

        with DeviceClient(srv.url) as dev:
            remote = dev.evaluate(digits.X, digits.y)
            assert_same_state(dev.get_state(), reference)
    pulled_ckpt = load_checkpoint(pulled / "state" / "checkpoint.npz")
    for k, v in reference.items():
        assert pulled_ckpt[k].tobytes() == v.tobytes(), k

    evaluate = run_edgefa("device", "evaluate", pulled, "--data", digits_npz, without_torch=True)
    assert evaluate.returncode == 0, evaluate.stdout + evaluate.stderr
    assert f"accuracy {100 * remote['accuracy']:.1f}% on {len(digits.y)} samples" in evaluate.stdout, \
        (evaluate.stdout, remote)
    assert f"device state at step {STEPS}" in evaluate.stdout


def _fd_request(conn: Connection, transport, fields: dict, timeout: float = 10.0):
    """One request over a bare Connection and transport (no DeviceClient): its decoded reply."""
    conn.send(encode(fields), time.monotonic())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exchange(conn, transport, wait=0.1)
        while (event := conn.next_event()) is not None:
            assert not isinstance(event, LinkLost), event
            if isinstance(event, MessageReceived):
                return decode(event.data)
    raise AssertionError(f"no reply to {fields} within {timeout} s")


def test_server_on_a_pty_the_test_made_driven_through_the_master_fd(tmp_path, tiny_bundle, digits, reference,
                                                                    monkeypatch):
    """The other pty arrangement: the test makes the pair, the server opens the slave path with
    pyserial (as it would /dev/ttyGS0), the host talks through the master fd with FdTransport."""
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    try:
        with device_server(tmp_path / "store", port=path) as srv:
            assert srv.url == path

            # A bare Connection + FdTransport + exchange, no DeviceClient.
            transport = FdTransport(os.dup(master), path)
            conn = Connection("client", hello={"role": "host"}, timing=fast_timing())
            conn.connect(time.monotonic())
            deadline = time.monotonic() + 10
            started = None
            while started is None and time.monotonic() < deadline:
                exchange(conn, transport, wait=0.1)
                started = next((e for e in conn.events() if isinstance(e, SessionStarted)), None)
            assert started is not None and started.peer["role"] == "device"
            status = _fd_request(conn, transport, {"op": "status", "id": 1})
            assert status["ok"] and status["bundle"] is None
            conn.close_session()                  # BYE: on a serial line, the next host is served at once
            transport.write(conn.data_to_send())
            transport.close()

            # The full session through the master fd: DeviceClient opens its URL with SerialTransport
            # and has no way to take a ready transport, so the test puts the master side there.
            monkeypatch.setattr(client_module, "SerialTransport",
                                lambda url, baudrate: FdTransport(os.dup(master), url))
            state, dev, _ = session(path, tiny_bundle, digits, ClientConfig(timing=fast_timing()))
            assert dev.reconnects == 0
        assert_same_state(state, reference)
    finally:
        os.close(master)
        os.close(slave)


def test_serial_transport_opens_a_loop_url():
    """loop:// has no file descriptor (pyserial raises io.UnsupportedOperation): it is polled."""
    transport = SerialTransport("loop://")
    try:
        transport.write(b"echo")
        assert transport.read(1.0) == b"echo"
    finally:
        transport.close()


# --- 2. a noisy line --------------------------------------------------------------------------

def noisy_config(**faults) -> ClientConfig:
    """Damage in both directions, a fresh seed for each connection (a reconnect must not meet the
    very damage that broke the last one); short timers for loopback. A HELLO damaged on the way
    gets no answer at all, so the first contact gets the patience of later ones (5 tries, not 2)."""
    seeds = itertools.count(11)
    return ClientConfig(wrap=lambda t: FaultyTransport(t, seed=next(seeds), **faults), timing=fast_timing(),
                        connect_timeout=3.0, first_contact_retries=5)


def test_one_percent_of_bytes_flipped_ends_with_the_clean_weights(tmp_path, tiny_bundle, digits, reference_at):
    with device_server(tmp_path / "store", listen="127.0.0.1:0") as srv:
        t0 = time.monotonic()
        state, dev, result = session(srv.url, tiny_bundle, digits, noisy_config(flip=0.01), steps=NOISY_STEPS)
        elapsed = time.monotonic() - t0
    assert_same_state(state, reference_at(NOISY_STEPS))
    assert result["steps_run"] == NOISY_STEPS
    assert dev.stats.retransmits > 0 and dev.stats.corrupt > 0, dev.stats
    assert elapsed < 30, f"{elapsed:.1f} s"


def test_dropped_and_duplicated_bytes_end_with_the_clean_weights(tmp_path, tiny_bundle, digits, reference_at):
    with device_server(tmp_path / "store", listen="127.0.0.1:0") as srv:
        with DeviceClient(srv.url, ClientConfig(timing=fast_timing())) as clean:
            clean.deploy(tiny_bundle)      # the upload under damage is the flip test's
        t0 = time.monotonic()
        with DeviceClient(srv.url, noisy_config(drop=0.002, duplicate=0.002)) as dev:
            result = dev.finetune(digits.X, digits.y, NOISY_STEPS, BATCH, SEED)
            assert dev.status()["step"] == NOISY_STEPS
        elapsed = time.monotonic() - t0
        with DeviceClient(srv.url) as clean:          # read the result back over a clean link
            state = clean.get_state()
    assert result["final_step"] == NOISY_STEPS and result["steps_run"] == NOISY_STEPS
    assert_same_state(state, reference_at(NOISY_STEPS))
    assert dev.stats.retransmits > 0 and dev.stats.corrupt > 0, dev.stats
    assert elapsed < 30, f"{elapsed:.1f} s"


# --- 3. the link cut ----------------------------------------------------------------------------

class LinkCutter:
    """A ClientConfig.wrap: counts the bytes the client writes and reads over all its connections
    and cuts the link at planned marks (cumulative byte counts): the transport is closed and
    LinkError raised, as when a cable is pulled. `partial`: the bytes before the mark still pass,
    so the peer is left holding the first part of a frame."""

    def __init__(self, partial: bool = False, only_connection: int | None = None):
        self.partial, self.only_connection = partial, only_connection
        self.written = self.read = self.connections = self.cuts = 0
        self.write_marks: list[int] = []
        self.read_marks: list[int] = []

    def __call__(self, inner):
        self.connections += 1
        return _CutTransport(inner, self, self.connections)


class _CutTransport:
    def __init__(self, inner, cutter: LinkCutter, number: int):
        self.inner, self.cutter, self.number, self.dead = inner, cutter, number, False

    def _armed(self) -> bool:
        return self.cutter.only_connection in (None, self.number)

    def _cut(self) -> None:
        self.inner.close()
        self.dead = True
        self.cutter.cuts += 1

    def write(self, data: bytes) -> None:
        c = self.cutter
        if self.dead:
            raise LinkError("test: the link is cut")
        if data and c.write_marks and self._armed() and c.written + len(data) > c.write_marks[0]:
            mark = c.write_marks.pop(0)
            if c.partial:
                k = max(mark - c.written, 0)
                self.inner.write(data[:k])
                c.written += k
            self._cut()
            raise LinkError("test: link cut while writing")
        self.inner.write(data)
        c.written += len(data)

    def read(self, timeout: float) -> bytes:
        c = self.cutter
        if self.dead:
            raise LinkError("test: the link is cut")
        data = self.inner.read(timeout)
        if data and c.read_marks and self._armed() and c.read + len(data) > c.read_marks[0]:
            mark = c.read_marks.pop(0)
            self._cut()
            if c.partial:
                k = max(mark - c.read, 0)
                c.read += k
                return data[:k]          # this much arrived; the next call finds the link dead
            raise LinkError("test: link cut while reading")
        c.read += len(data)
        return data

    def close(self) -> None:
        self.inner.close()


def test_link_cut_mid_upload_resumes_where_it_stopped(tmp_path, tiny_bundle, digits, reference):
    size = len(pack_archive(tiny_bundle))
    cutter = LinkCutter(only_connection=1)
    cutter.write_marks = [size // 2]
    offsets = []
    with device_server(tmp_path / "store", listen="127.0.0.1:0") as srv:
        with DeviceClient(srv.url, ClientConfig(wrap=cutter, timing=fast_timing())) as dev:
            deployed = dev.deploy(tiny_bundle, chunk_bytes=4096, on_progress=lambda done, total: offsets.append(done))
            assert deployed["step"] == 0 and deployed["archive_bytes"] == size
            assert cutter.cuts == 1 and dev.reconnects >= 1 and cutter.connections >= 2
            # resumed, not restarted: offsets only grow, and the bytes sent stay near one archive
            assert offsets == sorted(offsets) and offsets[-1] == size, offsets
            assert cutter.written < 1.6 * size, (cutter.written, size)
            result = dev.finetune(digits.X, digits.y, STEPS, BATCH, SEED)
            assert result["final_step"] == STEPS
            assert_same_state(dev.get_state(), reference)


def test_link_cut_mid_frame_leaves_no_half_frame_behind(tmp_path, tiny_bundle):
    """A cut in the middle of a frame leaves its first part with the peer: the server (an upload
    chunk) and then the host (a fetched archive). The next connection must start clean, not feed
    its HELLO or WELCOME into the rest of that frame. Loopback answers a HELLO in milliseconds."""
    size = len(pack_archive(tiny_bundle))
    cutter = LinkCutter(partial=True)
    cutter.write_marks = [size // 2]          # half of a 4 KiB chunk's frame reaches the server
    config = ClientConfig(wrap=cutter, timing=fast_timing(), connect_timeout=1.0, reconnects=1)
    with device_server(tmp_path / "store", listen="127.0.0.1:0") as srv:
        with DeviceClient(srv.url, config) as dev:
            assert dev.deploy(tiny_bundle, chunk_bytes=4096)["archive_bytes"] == size
            assert cutter.cuts == 1
            cutter.read_marks = [cutter.read + 10_000]     # inside the frame of the fetched archive
            pulled = dev.pull(tmp_path / "pulled")
            assert cutter.cuts == 2 and dev.reconnects == 2
    for name in ("manifest.json", *PAYLOAD_FILES):                  # fetched whole
        assert (pulled / name).read_bytes() == (tiny_bundle / name).read_bytes(), name
    assert int(load_checkpoint(pulled / "state" / "checkpoint.npz")["step"]) == 0


def test_link_cuts_mid_training_neither_repeat_nor_lose_a_step(tmp_path, tiny_bundle, digits, reference):
    """Four cuts, each right after the reply that brought the device to a given step:
    5: the next batch never leaves (whole); 10: the batch arrives and is applied, its reply is
    lost (the first read after it: the device ACKs a request before it answers it); 20: half of
    the next batch's frame leaves; 30: the batch is applied and half its reply arrives."""
    cutter = LinkCutter()
    steps_seen, plan = [], {5: ("write", False, 0), 10: ("read", False, 0),
                            20: ("write", True, 2000), 30: ("read", True, 60)}

    def on_step(step, loss, rtt):
        steps_seen.append(step)
        if step in plan:
            side, cutter.partial, offset = plan.pop(step)
            if side == "write":
                cutter.write_marks = [cutter.written + offset]
            else:
                cutter.read_marks = [cutter.read + offset]

    with device_server(tmp_path / "store", listen="127.0.0.1:0") as srv:
        with DeviceClient(srv.url, ClientConfig(wrap=cutter, timing=fast_timing())) as dev:
            dev.deploy(tiny_bundle)
            result = dev.finetune(digits.X, digits.y, STEPS, BATCH, SEED, on_step=on_step)
            assert cutter.cuts == 4 and dev.reconnects == 4, (cutter.cuts, dev.reconnects)
            assert result["final_step"] == STEPS and dev.status()["step"] == STEPS
            # every step's reply came exactly once: a repeated request for an applied step got
            # that step's own reply again, and was not applied twice (the weights say so)
            assert steps_seen == list(range(1, STEPS + 1)), steps_seen
            assert result["steps_run"] == STEPS
            assert_same_state(dev.get_state(), reference)
            assert dev.info()["link"]["sessions"] == 5


# --- 4. the device process killed -------------------------------------------------------------

def _assert_finite_checkpoint(ckpt: dict[str, np.ndarray]) -> int:
    for k, v in ckpt.items():
        if v.dtype.kind == "f":
            assert np.isfinite(v).all(), k
    return int(ckpt["step"])


def test_sigkill_between_steps_resumes_from_the_checkpoint(tmp_path, tiny_bundle, digits, reference):
    store, listen, extra = tmp_path / "store", f"127.0.0.1:{free_port()}", ["--checkpoint-every", 5]
    kill_at, seen = 17, {}
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(device_server(store, listen=listen, extra=extra))
        dev = stack.enter_context(DeviceClient(first.url, ClientConfig(reconnects=20, timing=fast_timing())))
        dev.deploy(tiny_bundle)

        def on_step(step, loss, rtt):
            if step == kill_at and "restarted" not in seen:
                first.kill()
                seen["checkpoint"] = load_checkpoint(store / "bundle" / "state" / "checkpoint.npz")
                second = stack.enter_context(device_server(store, listen=listen, extra=extra))
                with DeviceClient(second.url) as probe:      # before the host resumes
                    seen["restarted"] = probe.status()

        result = dev.finetune(digits.X, digits.y, STEPS, BATCH, SEED, on_step=on_step)
        state = dev.get_state()
    ckpt_step = _assert_finite_checkpoint(seen["checkpoint"])
    assert ckpt_step == 15 == seen["restarted"]["step"] and seen["restarted"]["checkpointed_step"] == 15
    assert result["final_step"] == STEPS and result["steps_run"] == STEPS + kill_at - ckpt_step
    assert dev.reconnects >= 1
    assert_same_state(state, reference)


def test_sigkill_mid_request_and_restart_on_the_same_port(tmp_path, tiny_bundle, digits, reference):
    store, listen, extra = tmp_path / "store", f"127.0.0.1:{free_port()}", ["--checkpoint-every", 5]
    steps, reached, outcome = [], threading.Event(), {}

    def on_step(step, loss, rtt):
        steps.append(step)
        if step >= 22:
            reached.set()

    with contextlib.ExitStack() as stack:
        first = stack.enter_context(device_server(store, listen=listen, extra=extra))
        dev = stack.enter_context(DeviceClient(first.url, ClientConfig(reconnects=20, timing=fast_timing())))
        dev.deploy(tiny_bundle)

        def work():
            try:
                outcome["result"] = dev.finetune(digits.X, digits.y, STEPS, BATCH, SEED, on_step=on_step)
            except BaseException as exc:   # reported by the main thread
                outcome["error"] = exc

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        assert reached.wait(60), steps
        first.kill()                      # the host is, most likely, in the middle of a request
        seen_at_kill = max(steps)
        kill_index = len(steps)
        ckpt = load_checkpoint(store / "bundle" / "state" / "checkpoint.npz")
        stack.enter_context(device_server(store, listen=listen, extra=extra))
        worker.join(120)
        assert not worker.is_alive()
        if "error" in outcome:
            raise outcome["error"]
        state = dev.get_state()
    # The device stood at seen_at_kill, or one step further if a reply was lost with it; its
    # periodic checkpoint is written after the reply, so a kill may also beat the latest one.
    ckpt_step = _assert_finite_checkpoint(ckpt)
    assert ckpt_step % 5 == 0 and seen_at_kill // 5 * 5 - 5 <= ckpt_step <= seen_at_kill + 1, \
        (ckpt_step, seen_at_kill)
    assert ckpt_step + 1 in steps[kill_index:], (ckpt_step, steps)   # the restarted server's first step
    assert outcome["result"]["final_step"] == STEPS and dev.reconnects >= 1
    assert_same_state(state, reference)


# --- 5. security ------------------------------------------------------------------------------

def test_shared_key(tmp_path, tiny_bundle, digits):
    key_file, wrong_file = tmp_path / "device.key", tmp_path / "wrong.key"
    key_file.write_bytes(random.Random(1).randbytes(32))
    wrong_file.write_bytes(random.Random(2).randbytes(32))
    key, wrong = read_key(key_file), read_key(wrong_file)
    assert key != wrong
    with device_server(tmp_path / "store", listen="127.0.0.1:0", extra=["--key-file", key_file]) as srv:
        with DeviceClient(srv.url, ClientConfig(key=key, timing=fast_timing())) as dev:
            dev.deploy(tiny_bundle)
            assert dev.finetune(digits.X, digits.y, 5, BATCH, SEED)["final_step"] == 5
            forged_before = dev.info()["link"]["forged"]

        with pytest.raises(EdgefaError, match="key") as no_key:
            with DeviceClient(srv.url, ClientConfig(timing=fast_timing(), connect_timeout=5)) as dev:
                dev.status()
        assert "\n" not in str(no_key.value)

        with DeviceClient(srv.url, ClientConfig(key=key, timing=fast_timing())) as dev:
            forged_mid = dev.info()["link"]["forged"]
        assert forged_mid > forged_before       # the keyless HELLO was counted

        t0 = time.monotonic()
        with pytest.raises(EdgefaError) as wrong_key:
            with DeviceClient(srv.url, ClientConfig(key=wrong, timing=fast_timing(), connect_timeout=5,
                                                    reconnects=0)) as dev:
                dev.status()
        assert time.monotonic() - t0 < 5
        assert "key" in str(wrong_key.value), wrong_key.value
        with DeviceClient(srv.url, ClientConfig(key=key, timing=fast_timing())) as dev:
            assert dev.info()["link"]["forged"] > forged_mid    # and so was the badly tagged one

        cli_no_key = run_edgefa("device", "info", srv.url, without_torch=True)
        assert_one_error_line(cli_no_key, "key")
        cli_key = run_edgefa("device", "info", srv.url, "--key-file", key_file, "--json", without_torch=True)
        assert cli_key.returncode == 0, cli_key.stderr

        with DeviceClient(srv.url, ClientConfig(key=key, timing=fast_timing())) as dev:
            info = dev.info()
            assert info["step"] == 5
            assert info["link"]["forged"] > forged_mid, info["link"]


def test_listen_binds_loopback(tmp_path):
    """`--listen 127.0.0.1:0` and `--listen :0` (no host: loopback, not every interface)."""
    with device_servers({"store": tmp_path / "store-explicit", "listen": "127.0.0.1:0"},
                        {"store": tmp_path / "store-default", "listen": ":0"}) as servers:
        for srv in servers:
            m = re.fullmatch(r"edgefa device server: listening on 127\.0\.0\.1:(\d+)", srv.line)
            assert m and int(m[1]) > 0, srv.line
            assert "reachable beyond this machine" not in srv.stderr()
        with DeviceClient(servers[1].url) as dev:
            assert dev.status()["bundle"] is None
        # a keyed host at a keyless device: one clear refusal
        with pytest.raises(EdgefaError, match="key") as refused:
            with DeviceClient(servers[0].url, ClientConfig(key=b"k" * 32, connect_timeout=5)) as dev:
                dev.status()
        assert "\n" not in str(refused.value)


def _member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = kind, link, 0o644, 0
    if kind == tarfile.REGTYPE:
        info.size = len(data)
    return info, (data if kind == tarfile.REGTYPE else None)


def _archive(bundle: Path, *extra) -> bytes:
    """The bundle's own files plus hostile entries, as a tar."""
    members = [_member(p.relative_to(bundle).as_posix(), p.read_bytes())
               for p in sorted(bundle.rglob("*")) if p.is_file()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in [*members, *extra]:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _upload(dev: DeviceClient, archive: bytes, sha: str | None = None, chunk: int = 16384):
    sha = sha or hashlib.sha256(archive).hexdigest()
    offset = dev.call("upload_begin", sha256=sha, size=len(archive))["offset"]
    while offset < len(archive):
        offset = dev.call("upload_chunk", sha256=sha, offset=offset, blob=archive[offset:offset + chunk])["offset"]
    return dev.call("upload_end", sha256=sha)


def _tree(root: Path) -> dict[str, str]:
    """Every path under root (server logs aside): file digests, link targets, directories."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.suffix == ".log":
            continue
        rel = p.relative_to(root).as_posix()
        out[rel] = (f"-> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir()
                    else hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def test_hostile_archives_are_refused_and_nothing_escapes_the_store(tmp_path, tiny_bundle, digits):
    work = tmp_path / "device"
    work.mkdir()
    store = work / "store"
    # From the device's staging directory STORE/incoming/unpacked, four '..' reach tmp_path.
    hostile = {
        "absolute path": _member(str(tmp_path / "evil-absolute.txt"), b"pwned"),
        "dot-dot path": _member("../../../../evil-dotdot.txt", b"pwned"),
        "symlink": _member("evil-link", kind=tarfile.SYMTYPE, link=str(tmp_path / "evil-link-target")),
        "hard link": _member("evil-hardlink", kind=tarfile.LNKTYPE, link="/etc/passwd"),
        "device node": _member("evil-device", kind=tarfile.CHRTYPE),
    }
    archives = {what: (_archive(tiny_bundle, m), m[0].name) for what, m in hostile.items()}
    archives["too many files"] = (_archive(tiny_bundle, *(_member(f"extra/f{i}.txt", b"x") for i in range(64))),
                                  "limit")
    with tarfile.open(fileobj=io.BytesIO(archives["absolute path"][0])) as tar:   # the test is real
        assert any(m.name.startswith("/") for m in tar.getmembers())

    with device_server(store, listen="127.0.0.1:0", extra=["--max-bundle-mb", 1]) as srv:
        with DeviceClient(srv.url, ClientConfig(timing=fast_timing())) as dev:
            good = dev.deploy(tiny_bundle)
            dev.finetune(digits.X, digits.y, 3, BATCH, SEED)
            before = _tree(tmp_path)
            for what, (archive, fragment) in archives.items():
                with pytest.raises(DeviceError) as refused:
                    _upload(dev, archive)
                assert refused.value.code == "bad_bundle", (what, refused.value.code, str(refused.value))
                assert fragment in str(refused.value), (what, str(refused.value))
                assert _tree(tmp_path) == before, what       # nothing written, in the store or outside
            for sentinel in ("evil-absolute.txt", "evil-dotdot.txt", "evil-link-target"):
                assert not (tmp_path / sentinel).exists()
            assert not any(p.is_symlink() for p in store.rglob("*"))
            assert list((store / "incoming").iterdir()) == []

            # The device still answers, with the bundle and state it had.
            status = dev.status()
            assert status["bundle"] == good["sha256"] and status["step"] == 3
            assert dev.train_step(3, digits.X[:BATCH], digits.y[:BATCH])["step"] == 4
            assert 0 <= dev.evaluate(digits.X, digits.y)["accuracy"] <= 1


def test_bad_uploads_and_bad_training_data_get_error_codes(tmp_path, tiny_bundle, digits):
    archive = pack_archive(tiny_bundle)
    with device_server(tmp_path / "store", listen="127.0.0.1:0", extra=["--max-bundle-mb", 1]) as srv:
        with DeviceClient(srv.url, ClientConfig(timing=fast_timing())) as dev:
            good = dev.deploy(tiny_bundle)

            with pytest.raises(DeviceError) as mismatch:      # a sha256 that is not the archive's
                _upload(dev, archive, sha=hashlib.sha256(b"another archive").hexdigest())
            assert mismatch.value.code == "sha256_mismatch"

            with pytest.raises(DeviceError) as too_large:
                dev.call("upload_begin", sha256=hashlib.sha256(b"big").hexdigest(), size=(1 << 20) + 1)
            assert too_large.value.code == "too_large"

            x, y = digits.X[:BATCH].copy(), digits.y[:BATCH]
            x[3, 5] = np.nan
            with pytest.raises(DeviceError) as nan:
                dev.train_step(0, x, y)
            assert nan.value.code == "bad_data"
            with pytest.raises(DeviceError) as features:
                dev.train_step(0, digits.X[:BATCH, :63], y)
            assert features.value.code == "bad_data"
            with pytest.raises(DeviceError) as labels:
                dev.train_step(0, digits.X[:BATCH], np.full(BATCH, 10))
            assert labels.value.code == "bad_data"

            status = dev.status()
            assert status["step"] == 0 and status["bundle"] == good["sha256"]
            assert dev.train_step(0, digits.X[:BATCH], y)["step"] == 1


# --- 6. bad input at the CLI ------------------------------------------------------------------

def test_cli_refuses_a_corrupt_bundle_before_sending_anything(tmp_path, tiny_bundle):
    weights = tiny_bundle / "weights.npz"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with device_server(tmp_path / "store", listen="127.0.0.1:0") as srv:
        proc = run_edgefa("deploy", tiny_bundle, "--device", srv.url, without_torch=True)
        assert_one_error_line(proc, "weights.npz")
        assert "connection from" not in srv.stderr(), srv.stderr()
        with DeviceClient(srv.url) as dev:
            info = dev.info()
        assert info["bundle"] is None and info["link"]["sessions"] == 1


def test_cli_reports_a_device_nobody_serves_in_one_line():
    proc = run_edgefa("device", "info", "socket://127.0.0.1:1", without_torch=True, timeout=120)
    assert_one_error_line(proc, "socket://127.0.0.1:1")
