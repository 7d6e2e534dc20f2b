"""Soak and chaos benchmark: one real device server for a long run under a seeded mix of requests and faults.

    .venv/bin/python benchmarks/soak.py                         # 2 hours (the issue's run)
    .venv/bin/python benchmarks/soak.py --minutes 5             # a short run, same mix
    .venv/bin/python benchmarks/soak.py --minutes 0.75 --clock-rate 3600 --gap-s 0.05 0.2 \\
        --kill-every-s 11 --disk-full-every-s 17 --idle-cap-s 20 --out /tmp/soak.json   # as tests/test_soak.py

The device is a separate process (benchmarks/_soak_server.py: `edgefa device serve --listen
127.0.0.1:0` built through the library, 1 onnxruntime thread, its own store folder), and the host
is edgefa.link.client in this process: a fresh DeviceClient per request, as each CLI command
makes one. The mix, paced at one action every --gap-s seconds (default 0.5-2 s, so the server's
CPU use stays modest), is a shuffled deck per round (seeded) of

    info, status, profile (samples off, as `edgefa finetune` asks), profile with samples,
    fine-tunes of 10-40 steps over the link (DeviceClient.finetune, what `edgefa finetune` runs),
    evaluate, checkpoint, pull (verified with read_bundle), deploys of two good bundles in turn,
    broken deploys (a bundle whose train_step.onnx is truncated and re-hashed, so verify passes
    and only loading it fails; an archive damaged after packing), idle clients (connect and say
    nothing; say HELLO and then nothing; stop half-way through a frame) and garbage clients
    (random bytes, with or without a HELLO first),

and, on their own timers (by default every third of the run, at most 15 min; every quarter, at
most 10 min), SIGKILL of the server and a restart on the same store and port (in turn: between
requests, right after a broken deploy, in the middle of a fine-tune), and disk full on the store (RLIMIT_FSIZE lowered on the running server with prlimit(2): every write that
takes a file past 4 KiB fails with EFBIG; see _soak_server.py).

Every request's outcome is one of: ok; an expected failure (a broken deploy refused, a write
refused while the disk is full), counted apart by reason; or an unexpected failure (a request that should have succeeded did not, the
server died, a restart on its store failed, the old bundle was not served after a broken
deploy). After a broken deploy the host checks that the previous bundle still answers; after a
restart, that the device serves the last good bundle. A server that will not start on its store
is recorded, its store kept aside, and the run goes on with a fresh store. A "busy" answer (an
idle client holds the device) is counted and the request asked again, for up to --busy-wait-s.

Reported (JSON, default benchmarks/results/soak.json, and a short table):
  * unexpected failures (target 0) and expected ones by reason; restarts;
  * RSS growth of the server per hour (target <= 5 MiB/h): VmRSS read from /proc every
    --rss-interval-s; the slope of one least-squares line with one intercept per server lifetime
    (a restart starts a new one), over the samples after each lifetime's first --warmup-s;
  * reply sizes (bytes the host received for info/status/profile; median) and p95 latency of each
    request kind (a fresh connection + the request, as one CLI command; train_step: one step's
    round trip inside a fine-tune) in the first and the last quarter of the run after warm-up
    (target end <= 1.2x start; latency judged where both quarters hold >= 10 requests of the kind);
  * idle clients the server dropped (target: all, within --idle-cap-s).

--clock-rate R makes the server's clock (profiler and server, where this edgefa takes an injected
clock) advance R times faster than real time, so faults that grow with uptime show in seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's edgefa first

import numpy as np  # noqa: E402

from _pairs import load_now, machine_info  # noqa: E402
from edgefa.bundle import pack_archive, read_bundle, sha256_file  # noqa: E402
from edgefa.shared.datasets import load_digits  # noqa: E402
from edgefa.errors import EdgefaError  # noqa: E402
from edgefa.link.client import CHUNK_BYTES, ClientConfig, DeviceClient, DeviceError  # noqa: E402
from edgefa.link.protocol import Connection  # noqa: E402

READY_PREFIX = "edgefa device server: "
BATCH, EVAL_SAMPLES, CHECKPOINT_EVERY = 32, 512, 10
DISK_FULL_FSIZE_BYTES = 4096          # a checkpoint, a bundle, an upload chunk: all larger
RSS_GROWTH_TARGET_MIB_PER_H, END_OVER_START_TARGET, MIN_TO_JUDGE = 5.0, 1.2, 10
# One round of the ordinary mix (each round is shuffled); kills and disk-full run on timers.
DECK = {"info": 4, "status": 3, "profile": 4, "profile_samples": 1, "finetune": 8, "evaluate": 2,
        "checkpoint": 1, "pull": 2, "deploy": 2, "deploy_truncated": 1, "deploy_corrupt": 1,
        "idle_client": 1, "garbage_client": 2}
KILL_VARIANTS = ("between_requests", "after_broken_deploy", "during_finetune")
IDLE_VARIANTS = ("silent", "after_hello", "mid_frame")
SIZE_KINDS = ("info", "status", "profile", "profile_samples")
NOT_JUDGED = ("finetune", "restart")  # a fine-tune's length varies by design (train_step is judged); a restart is no request


def is_busy(exc: Exception) -> bool:
    """The device's answer while another host holds it (a refused session or a 'busy' reply)."""
    return getattr(exc, "code", None) == "busy" or "busy" in str(exc).lower()


def is_disk_full(text: str) -> bool:
    text = text.lower()
    return any(s in text for s in ("file too large", "errno 27", "no space", "disk full", "disk is full"))


def upload_archive(client: DeviceClient, archive: bytes) -> dict:
    """Send given archive bytes as DeviceClient.deploy does. deploy() packs a directory, and a damaged
    archive cannot come from one."""
    sha = hashlib.sha256(archive).hexdigest()
    offset = client.call("upload_begin", sha256=sha, size=len(archive))["offset"]
    while offset < len(archive):
        offset = client.call("upload_chunk", sha256=sha, offset=offset,
                             blob=archive[offset:offset + CHUNK_BYTES])["offset"]
    return client.call("upload_end", sha256=sha).fields


# --- the bundles ------------------------------------------------------------------------------

def train_bundle(out: Path) -> Path:
    """A small DFA bundle (64-64-64-10 on digits, 2 epochs). Host side: torch is imported here only."""
    from edgefa.exporters.export import export_bundle
    from edgefa.training.trainer import TrainConfig, load_run, save_run, train

    run = train(TrainConfig(method="dfa", hidden=[64, 64], epochs=2, lr=0.01, device="cpu"))
    save_run(run, out.parent / "run")
    return export_bundle(load_run(out.parent / "run"), out)


def make_bundles(given: Path | None, work: Path) -> dict[str, Path]:
    """Two good bundles that differ in one manifest field (so every deploy uploads and swaps) and
    one whose train_step.onnx is cut in half with its sha256 and size re-written in the manifest:
    it reads and verifies as a bundle, and only loading it fails."""
    good = Path(given) if given else train_bundle(work / "bundle_a")
    read_bundle(good)
    out = {"a": good}
    for name in ("b", "truncated"):
        copy = work / f"bundle_{name}"
        shutil.copytree(good, copy, ignore=shutil.ignore_patterns("state", ".*"))
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["soak_twin"] = name
        if name == "truncated":
            graph = copy / "train_step.onnx"
            graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
            manifest["files"]["train_step.onnx"] = {"sha256": sha256_file(graph), "bytes": graph.stat().st_size}
        (copy / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        read_bundle(copy)        # hashes match: the device's verify passes
        out[name] = copy
    return out


# --- the server -------------------------------------------------------------------------------

class ServerStartError(Exception):
    pass


class Server:
    """One lifetime of the device server process (a restart makes a new one)."""

    def __init__(self, store: Path, log: Path, listen: str, clock_rate: float, threads: int):
        self.store, self.log_path = store, log
        self.command = [sys.executable, str(ROOT / "benchmarks" / "_soak_server.py"), "--store", str(store),
                        "--listen", listen, "--clock-rate", repr(clock_rate),
                        "--checkpoint-every", str(CHECKPOINT_EVERY), "--threads", str(threads)]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.address = None
        # The log goes through a pipe that this process copies to the file: a log file written by the
        # server itself would count against the disk-full phase's RLIMIT_FSIZE and lose its last lines.
        self._copier = threading.Thread(target=self._copy_log, daemon=True)
        self._copier.start()

    def _copy_log(self) -> None:
        with open(self.log_path, "w") as log:
            for line in self.proc.stderr:
                log.write(line)
                log.flush()

    def wait_ready(self, timeout: float) -> str:
        """The server's `listening on H:P` line, or ServerStartError with its last log line."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().strip() if ready else ""
        if not line.startswith(READY_PREFIX + "listening on "):
            self.kill()
            raise ServerStartError(f"no ready line within {timeout:.0f} s (exit {self.proc.returncode}): "
                                   f"{self.last_log_line()}")
        self.address = line.rsplit(" ", 1)[1]
        return self.address

    @property
    def url(self) -> str:
        return f"socket://{self.address}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def last_log_line(self) -> str:
        """The last line that is not part of a traceback's body: a traceback's exception line, or a log line."""
        lines = [ln for ln in self.log_tail(400) if ln.strip() and not ln[0].isspace()
                 and not ln.startswith(("Traceback", "During handling", "The above exception"))]
        return lines[-1][:400] if lines else "(empty log)"

    def log_tail(self, n: int = 12) -> list[str]:
        if not self.alive():
            self._copier.join(timeout=5)       # the rest of what it wrote
        try:
            return self.log_path.read_text(errors="replace").splitlines()[-n:]
        except FileNotFoundError:
            return []

    def rss_bytes(self) -> int | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            return None
        return None

    def limit_file_size(self, limit: int | None) -> None:
        """Lower (or lift, with None) the soft RLIMIT_FSIZE of the running server: 'disk full'."""
        _, hard = resource.prlimit(self.proc.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(self.proc.pid, resource.RLIMIT_FSIZE, (hard if limit is None else limit, hard))

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._copier.join(timeout=5)
        self.proc.stdout.close()

    def stop(self) -> None:
        """SIGTERM: the server checkpoints and exits, as `edgefa device serve` on Ctrl-C."""
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


# --- the record -------------------------------------------------------------------------------

@dataclass
class Outcome:
    t: float                      # seconds since the soak started
    kind: str
    result: str                   # "ok" | "expected" | "unexpected"
    ms: float | None = None
    reply_bytes: int | None = None
    note: str | None = None
    phase: str = "normal"         # "disk_full" while the store is full


@dataclass
class Record:
    t0: float = field(default_factory=time.monotonic)
    outcomes: list[Outcome] = field(default_factory=list)
    rss: list[tuple[float, int, float, int]] = field(default_factory=list)   # (t, lifetime, t in lifetime, bytes)
    idle: list[dict] = field(default_factory=list)
    restarts: list[dict] = field(default_factory=list)
    disk_full: list[dict] = field(default_factory=list)
    garbage_clients: int = 0
    busy_answers: int = 0
    refused_steps: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def add(self, kind: str, result: str, **kw) -> None:
        with self.lock:
            self.outcomes.append(Outcome(self.now(), kind, result, **kw))


class RequestFailed(Exception):
    """A request that did not do what it should (the reply was wrong, or it failed)."""


# --- the soak ---------------------------------------------------------------------------------

class Soak:
    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.rng = np.random.default_rng(args.seed)
        self.rec = Record()
        self.bundles = make_bundles(args.bundle, work)
        self.archive_a = pack_archive(self.bundles["a"])
        data = load_digits()
        self.X, self.y = data.X, data.y
        self.serving: str | None = None            # the good bundle the device should serve: "a" | "b"
        self.phase = "normal"
        self.lifetime = 0
        self.stores = 0
        self.store = self._new_store()
        self.server = self._start(listen="127.0.0.1:0")
        self.clock_line = next((ln for ln in self.server.log_tail(50) if "clock rate" in ln), None)
        self.sha = {name: hashlib.sha256(pack_archive(p)).hexdigest() for name, p in self.bundles.items()}
        self._stop_sampler = threading.Event()
        self._sampler = threading.Thread(target=self._sample_rss, daemon=True)
        self._idle_threads: list[threading.Thread] = []

    # --- server lifetimes -------------------------------------------------------------------

    def _new_store(self) -> Path:
        self.stores += 1
        return self.work / f"store{self.stores}"

    def _start(self, listen: str) -> Server:
        self.lifetime += 1
        server = Server(self.store, self.work / f"server{self.lifetime}.log", listen,
                        self.args.clock_rate, self.args.device_threads)
        server.wait_ready(self.args.start_timeout_s)
        return server

    def restart(self, why: str) -> None:
        """SIGKILL (if still running) and start again on the same store and port. A server that will
        not start there is an unexpected failure; its store is kept aside and a fresh one serves."""
        port = self.server.address.rsplit(":", 1)[1]
        old_pid = self.server.proc.pid
        self.server.kill()
        t0 = time.monotonic()
        entry = {"t": self.rec.now(), "why": why, "old_pid": old_pid}
        try:
            self.server = self._start(listen=f"127.0.0.1:{port}")
        except ServerStartError as exc:
            entry.update(started=False, error=str(exc))
            self.rec.add("restart", "unexpected", note=f"server did not start on its store after {why}: {exc}")
            self.recover()
        else:
            entry.update(started=True, start_s=time.monotonic() - t0)
            self.rec.add("restart", "ok", ms=(time.monotonic() - t0) * 1e3)
            self.check_serving(f"after restart ({why})")
        self.rec.restarts.append(entry)

    def recover(self) -> None:
        """A fresh store (the unstartable one stays for a look) and the good bundle deployed again."""
        self.store = self._new_store()
        self.server = self._start(listen="127.0.0.1:0")
        name, self.serving = self.serving, None
        self.deploy_good(name or "a")

    def ensure_alive(self, after: str) -> None:
        if not self.server.alive():
            self.rec.add("server_alive", "unexpected", note=f"server died (exit {self.server.proc.returncode}) "
                                                             f"during {after}: {self.server.last_log_line()}")
            self.restart(f"its death during {after}")

    def _sample_rss(self) -> None:
        while not self._stop_sampler.wait(self.args.rss_interval_s):
            server = self.server
            rss = server.rss_bytes()
            if rss is not None:
                with self.rec.lock:
                    self.rec.rss.append((self.rec.now(), self.lifetime, time.monotonic() - server.started, rss))

    # --- requests ---------------------------------------------------------------------------

    def request(self, kind: str, call, *, expected=None, size: bool = False, config: dict | None = None,
                restart_if_dead: bool = True):
        """One request on a fresh client, timed from connect to reply, as one CLI command makes it.
        `expected(exc)` returns the reason when a failure is expected. A 'busy' answer is counted
        and asked again (for up to --busy-wait-s). Returns the call's result, or None on failure."""
        deadline = time.monotonic() + self.args.busy_wait_s
        while True:
            client = DeviceClient(self.server.url, ClientConfig(reply_timeout=self.args.reply_timeout_s,
                                                                **(config or {})))
            t0 = time.perf_counter()
            try:
                result = call(client)
                ms = (time.perf_counter() - t0) * 1e3
                nbytes = client.stats.bytes_received if size and client.stats else None
            except Exception as exc:    # noqa: BLE001 - every failure is recorded, none ends the soak
                if is_busy(exc) and time.monotonic() < deadline:
                    self.rec.busy_answers += 1
                    time.sleep(0.5)
                    continue
                reason = expected(exc) if expected else None
                text = f"{type(exc).__name__}: {exc}"[:400]
                if reason:
                    self.rec.add(kind, "expected", note=f"{reason}: {text}", phase=self.phase)
                else:
                    self.rec.add(kind, "unexpected", note=text, phase=self.phase)
                    if restart_if_dead:
                        self.ensure_alive(kind)
                return None
            finally:
                client.close()
            self.rec.add(kind, "ok", ms=ms, reply_bytes=nbytes, phase=self.phase)
            return result

    def check(self, kind: str, ok: bool, note: str) -> None:
        """A property of the device after an action (the bundle it serves, the step it reached)."""
        self.rec.add(kind, "ok" if ok else "unexpected", note=None if ok else note, phase=self.phase)

    def check_serving(self, when: str) -> None:
        """The device serves the last good bundle and answers an evaluate with it."""
        if self.serving is None:
            return
        status = self.request("status", lambda c: c.status())
        if status is not None:
            self.check("serving_check", status.get("bundle") == self.sha[self.serving],
                       f"{when}: the device serves {str(status.get('bundle'))[:12]}, expected bundle "
                       f"{self.serving} ({self.sha[self.serving][:12]})")
        self.evaluate()

    # --- the actions --------------------------------------------------------------------------

    def info(self) -> None:
        self.request("info", lambda c: c.info(), size=True)

    def status(self) -> None:
        status = self.request("status", lambda c: c.status(), size=True)
        if status is not None and self.serving:
            self.check("serving_check", status.get("bundle") == self.sha[self.serving],
                       f"status names bundle {str(status.get('bundle'))[:12]}, expected {self.serving}")

    def profile(self) -> None:
        self.request("profile", lambda c: c.profile(samples=False), size=True)

    def profile_samples(self) -> None:
        self.request("profile_samples", lambda c: c.profile(samples=True), size=True)

    def evaluate(self) -> None:
        result = self.request("evaluate", lambda c: c.evaluate(self.X[:EVAL_SAMPLES], self.y[:EVAL_SAMPLES]))
        if result is not None:
            self.check("evaluate_check", np.isfinite(result["loss_mean"]) and 0 <= result["accuracy"] <= 1,
                       f"evaluate gave {result}")

    def checkpoint(self, expected=None) -> None:
        self.request("checkpoint", lambda c: c.call("checkpoint").fields, expected=expected)

    def finetune(self, steps: int | None = None, expected=None, **request_options) -> dict | None:
        """DeviceClient.finetune (what `edgefa finetune` runs) for 10-40 more steps; each step's
        round trip is recorded as a train_step."""
        n = steps or int(self.rng.integers(10, 41))
        per_step: list[tuple[float, float]] = []

        def run(client: DeviceClient) -> dict:
            target = client.status()["step"] + n
            result = client.finetune(self.X, self.y, target, BATCH, self.args.seed,
                                     on_step=lambda step, loss, rtt: per_step.append((self.rec.now(), rtt)))
            if result["final_step"] != target:
                raise RequestFailed(f"fine-tune ended at step {result['final_step']}, not {target}")
            return result

        result = self.request("finetune", run, expected=expected, **request_options)
        with self.rec.lock:
            self.rec.outcomes += [Outcome(t, "train_step", "ok", ms=rtt, phase=self.phase) for t, rtt in per_step]
        if result is not None:
            self.rec.refused_steps += len(result["refused_steps"])
        return result

    def pull(self) -> None:
        out = self.work / "pulled"

        def run(client: DeviceClient) -> str:
            client.pull(out)
            read_bundle(out)                 # whole and verified
            return (out / "manifest.json").read_text()

        manifest = self.request("pull", run)
        if manifest is not None and self.serving:
            want = (self.bundles[self.serving] / "manifest.json").read_text()
            self.check("pull_check", manifest == want, f"pulled bundle is not bundle {self.serving}")

    def deploy_good(self, name: str | None = None, expected=None) -> bool:
        name = name or ("b" if self.serving == "a" else "a")
        result = self.request("deploy", lambda c: c.deploy(self.bundles[name]), expected=expected)
        if result is not None:
            self.serving = name
            self.check("deploy_check", result.get("bundle") == self.sha[name] and result.get("step") == 0,
                       f"deploy of {name} answered bundle {str(result.get('bundle'))[:12]} step {result.get('step')}")
        return result is not None

    def deploy(self) -> None:
        self.deploy_good()

    def _broken(self, kind: str, send) -> None:
        def refused(exc):
            return "broken bundle refused" if isinstance(exc, DeviceError) else None

        result = self.request(kind, send, expected=refused)
        if result is not None:
            self.rec.add(kind + "_accepted", "unexpected", note=f"the device accepted a broken bundle: {result}")
            self.serving = None
            self.deploy_good("a")
        else:
            self.check_serving(f"after {kind}")

    def deploy_truncated(self) -> None:
        self._broken("deploy_truncated", lambda c: c.deploy(self.bundles["truncated"]))

    def deploy_corrupt(self) -> None:
        archive = bytearray(self.archive_a)
        if self.rng.random() < 0.5:          # damaged bytes in the middle (a file's content or a header)
            mid = int(self.rng.integers(len(archive) // 4, 3 * len(archive) // 4))
            archive[mid:mid + 512] = self.rng.integers(0, 256, 512, dtype=np.uint8).tobytes()
        else:                                # cut short
            archive = archive[: int(len(archive) * self.rng.uniform(0.2, 0.9))]
        self._broken("deploy_corrupt", lambda c: upload_archive(c, bytes(archive)))

    # --- hostile peers ------------------------------------------------------------------------

    def _connect_raw(self) -> socket.socket:
        host, port = self.server.address.rsplit(":", 1)
        return socket.create_connection((host, int(port)), timeout=5)

    def idle_client(self) -> None:
        """A client in a thread that connects and then says nothing (variants in turn), until the
        server drops it or --idle-cap-s passes."""
        variant = IDLE_VARIANTS[len(self.rec.idle) % len(IDLE_VARIANTS)]
        entry = {"t": self.rec.now(), "variant": variant, "lifetime": self.lifetime}
        self.rec.idle.append(entry)
        try:
            sock = self._connect_raw()
        except OSError as exc:
            entry["ended"] = f"could not connect: {exc}"
            return
        hello = Connection("client", hello={"role": "host"})
        hello.connect(time.monotonic())
        hello_bytes = hello.data_to_send()
        if variant == "after_hello":
            sock.sendall(hello_bytes)
        elif variant == "mid_frame":
            sock.sendall(hello_bytes[: len(hello_bytes) // 2])

        def hold() -> None:
            t0 = time.monotonic()
            sock.settimeout(0.5)
            try:
                while time.monotonic() - t0 < self.args.idle_cap_s and not self._stop_sampler.is_set():
                    try:
                        if sock.recv(4096) == b"":
                            break
                    except socket.timeout:
                        continue
                    except OSError:
                        break
                else:
                    entry["ended"] = "held"
            finally:
                entry["held_s"] = time.monotonic() - t0
                sock.close()
            if "ended" not in entry:
                entry["ended"] = "dropped" if entry["lifetime"] == self.lifetime else "server restarted"
            elif self._stop_sampler.is_set():
                entry["ended"] = "soak ended"

        thread = threading.Thread(target=hold, daemon=True)
        thread.start()
        self._idle_threads.append(thread)

    def garbage_client(self) -> None:
        """Random bytes (after a HELLO, every other time), then close."""
        self.rec.garbage_clients += 1
        try:
            with self._connect_raw() as sock:
                if self.rec.garbage_clients % 2 == 0:
                    hello = Connection("client", hello={"role": "host"})
                    hello.connect(time.monotonic())
                    sock.sendall(hello.data_to_send())
                sock.sendall(self.rng.integers(0, 256, int(self.rng.integers(1, 16385)), dtype=np.uint8).tobytes())
                sock.settimeout(0.3)
                try:
                    sock.recv(65536)
                except OSError:
                    pass
        except OSError:
            pass   # the server may close first: that is its right

    # --- faults on timers ---------------------------------------------------------------------

    def kill_restart(self, variant: str) -> None:
        if variant == "after_broken_deploy":
            self.deploy_truncated()
            self.restart("SIGKILL right after a broken deploy")
        elif variant == "during_finetune":
            # a client with patience for the restart (about 20 s of reconnects), which resumes
            # exactly; the restart is this thread's job, not the fine-tune's
            done: dict = {}
            thread = threading.Thread(target=lambda: done.update(
                r=self.finetune(steps=60, config={"reconnects": 14}, restart_if_dead=False)), daemon=True)
            thread.start()
            time.sleep(float(self.rng.uniform(0.05, 0.3)))
            self.restart("SIGKILL during a fine-tune")
            thread.join(timeout=self.args.reply_timeout_s * 2)
            self.check("finetune_across_kill", done.get("r") is not None and not thread.is_alive(),
                       "the fine-tune did not finish across SIGKILL + restart")
        else:
            self.restart("SIGKILL between requests")

    def disk_full_phase(self) -> None:
        """RLIMIT_FSIZE on the running server: writes past 4 KiB fail, as on a full disk. Requests that
        must write may be refused (one line); the server must keep answering, keep serving its
        bundle, and checkpoint again once space is back."""
        entry = {"t": self.rec.now(), "mechanism": f"prlimit RLIMIT_FSIZE={DISK_FULL_FSIZE_BYTES} on the server",
                 "refusals": []}
        self.rec.disk_full.append(entry)

        def refused(exc):
            if isinstance(exc, DeviceError):
                entry["refusals"].append(str(exc)[:200])
                return "write refused while the disk is full"
            return None

        server = self.server              # the one made full (a crash would replace self.server)
        server.limit_file_size(DISK_FULL_FSIZE_BYTES)
        self.phase = "disk_full"
        try:
            self.finetune(steps=2 * CHECKPOINT_EVERY, expected=refused)   # crosses an automatic checkpoint
            self.checkpoint(expected=refused)
            self.deploy_good(expected=refused)
            self.status()
        finally:
            self.phase = "normal"
            if self.server.alive():
                self.server.limit_file_size(None)
        entry["server_survived"] = server.alive()
        # the mechanism worked if a refusal or the server's own log names the failed write
        entry["verified"] = any(is_disk_full(r) for r in entry["refusals"]) or any(
            is_disk_full(ln) for ln in server.log_tail(400))
        self.ensure_alive("disk full")
        self.checkpoint()                                    # space is back: this must work
        self.check_serving("after disk full")

    # --- the run ------------------------------------------------------------------------------

    def run(self) -> None:
        args = self.args
        self._sampler.start()
        self.rounds = 0
        self.deploy_good("a")
        end = self.rec.now() + args.duration_s
        next_kill, next_disk = args.kill_every_s, args.disk_full_every_s * 0.75
        kills, rounds = 0, 0
        deck = [kind for kind, n in DECK.items() for _ in range(n)]
        while self.rec.now() < end:
            rounds += 1
            for kind in map(str, self.rng.permutation(deck)):
                if self.rec.now() >= next_kill:
                    self.kill_restart(KILL_VARIANTS[kills % len(KILL_VARIANTS)])
                    kills, next_kill = kills + 1, self.rec.now() + args.kill_every_s
                if self.rec.now() >= next_disk:
                    self.disk_full_phase()
                    next_disk = self.rec.now() + args.disk_full_every_s
                getattr(self, kind)()
                self.ensure_alive(kind)
                time.sleep(float(self.rng.uniform(*args.gap_s)))
            self.rounds = rounds
        self.check_serving("at the end")

    def close(self) -> None:
        self._stop_sampler.set()
        for thread in self._idle_threads:
            thread.join(timeout=2)
        self.server.stop()


# --- the figures ------------------------------------------------------------------------------

def rss_slope(samples: list[tuple[float, int, float, int]], warmup_s: float) -> dict:
    """MiB per hour: one least-squares line with one intercept per server lifetime (a restart
    starts a new process), over the samples taken after each lifetime's first `warmup_s`."""
    kept = [(life, t, rss) for t, life, t_life, rss in samples if t_life >= warmup_s]
    lifetimes = sorted({life for life, _, _ in kept})
    sxy = sxx = 0.0
    per_life = []
    for life in lifetimes:
        t = np.array([s[1] for s in kept if s[0] == life])
        r = np.array([s[2] for s in kept if s[0] == life], dtype=np.float64) / 2**20
        if len(t) < 2:
            continue
        dt, dr = t - t.mean(), r - r.mean()
        sxy, sxx = sxy + float(dt @ dr), sxx + float(dt @ dt)
        per_life.append({"lifetime": life, "samples": len(t), "span_s": float(t[-1] - t[0]),
                         "mib_per_h": float(dt @ dr / (dt @ dt) * 3600) if dt @ dt > 0 else None,
                         "rss_mib_first_last": [float(r[0]), float(r[-1])]})
    return {"mib_per_h": sxy / sxx * 3600 if sxx > 0 else None,
            "method": f"least squares, one intercept per server lifetime, samples after each lifetime's first "
                      f"{warmup_s:g} s",
            "samples_used": sum(p["samples"] for p in per_life),
            "span_s_used": sum(p["span_s"] for p in per_life), "per_lifetime": per_life}


def windows(t_from: float, t_to: float) -> tuple[tuple[float, float], tuple[float, float]]:
    quarter = (t_to - t_from) / 4
    return (t_from, t_from + quarter), (t_to - quarter, t_to)


def start_end(outcomes: list[Outcome], start: tuple, end: tuple, value: str, agg) -> dict:
    out = {}
    for kind in sorted({o.kind for o in outcomes if o.result == "ok" and getattr(o, value) is not None}):
        pick = lambda w: [getattr(o, value) for o in outcomes if o.kind == kind and o.result == "ok"  # noqa: E731
                          and getattr(o, value) is not None and w[0] <= o.t <= w[1]]
        s, e = pick(start), pick(end)
        row = {"start": agg(s) if s else None, "end": agg(e) if e else None, "n_start": len(s), "n_end": len(e),
               "max": max(getattr(o, value) for o in outcomes if o.kind == kind and o.result == "ok"
                          and getattr(o, value) is not None)}
        row["end_over_start"] = row["end"] / row["start"] if row["start"] and row["end"] is not None else None
        out[kind] = row
    return out


def summarize(soak: Soak, wall_s: float) -> dict:
    rec, args = soak.rec, soak.args
    outcomes = rec.outcomes
    warmup = args.warmup_s
    start, end = windows(warmup, wall_s)
    counts: dict[str, dict] = {}
    for o in outcomes:
        c = counts.setdefault(o.kind, {"ok": 0, "expected": 0, "unexpected": 0})
        c[o.result] += 1
    expected_reasons: dict[str, int] = {}
    for o in outcomes:
        if o.result == "expected":
            reason = f"{o.kind}: {o.note.split(':')[0]}"
            expected_reasons[reason] = expected_reasons.get(reason, 0) + 1
    unexpected = [{"t_s": round(o.t, 2), "kind": o.kind, "phase": o.phase, "error": o.note}
                  for o in outcomes if o.result == "unexpected"]
    latency = start_end(outcomes, start, end, "ms", lambda v: float(np.percentile(v, 95)))
    sizes = start_end([o for o in outcomes if o.kind in SIZE_KINDS], start, end, "reply_bytes",
                      lambda v: float(np.median(v)))
    rss = rss_slope(rec.rss, args.warmup_s)
    idle_dropped = [i for i in rec.idle if i.get("ended") == "dropped"]
    idle_held = [i for i in rec.idle if i.get("ended") == "held"]

    targets = {"unexpected_failures": {"value": len(unexpected), "max": 0, "met": not unexpected}}
    slope = rss["mib_per_h"]
    targets["rss_growth_mib_per_h"] = {"value": slope, "max": RSS_GROWTH_TARGET_MIB_PER_H,
                                       "met": None if slope is None else bool(slope <= RSS_GROWTH_TARGET_MIB_PER_H)}
    for what, table, unit in (("p95_latency", latency, "ms"), ("reply_bytes_median", sizes, "B")):
        for kind, row in table.items():
            if kind in NOT_JUDGED:
                continue
            enough = row["n_start"] >= (1 if unit == "B" else MIN_TO_JUDGE) and row["n_end"] >= (
                1 if unit == "B" else MIN_TO_JUDGE)
            targets[f"{what}_{kind}_end_over_start"] = {
                "value": row["end_over_start"], "max": END_OVER_START_TARGET,
                "met": bool(row["end_over_start"] <= END_OVER_START_TARGET) if enough and row["end_over_start"]
                is not None else None}
    targets["idle_clients_held_past_cap"] = {"value": len(idle_held), "max": 0, "met": not idle_held}
    targets["disk_full_verified"] = {"value": sum(bool(d.get("verified")) for d in rec.disk_full),
                                     "of": len(rec.disk_full),
                                     "met": all(d.get("verified") for d in rec.disk_full) if rec.disk_full else None}
    return {
        "wall_s": wall_s, "rounds": getattr(soak, "rounds", None),
        "requests": counts,
        "unexpected_failures": unexpected,
        "expected_failures": expected_reasons,
        "busy_answers": rec.busy_answers,
        "refused_train_steps": rec.refused_steps,
        "restarts": {"count": len(rec.restarts), "failed_to_start": sum(not r["started"] for r in rec.restarts),
                     "start_s_median": float(np.median([r["start_s"] for r in rec.restarts if r["started"]]))
                     if any(r["started"] for r in rec.restarts) else None,
                     "stores_used": soak.stores, "events": rec.restarts},
        "rss": {**rss, "raw": [(round(t, 2), life, int(b)) for t, life, _, b in rec.rss]},
        "windows_s": {"start": list(start), "end": list(end),
                      "rule": "first and last quarter of the run after --warmup-s"},
        "latency_p95_ms": latency,
        "reply_bytes_median": sizes,
        "idle_clients": {"count": len(rec.idle), "dropped_by_server": len(idle_dropped),
                         "held_past_cap": len(idle_held),
                         "dropped_after_s_median": float(np.median([i["held_s"] for i in idle_dropped]))
                         if idle_dropped else None, "events": rec.idle},
        "garbage_clients": rec.garbage_clients,
        "disk_full": rec.disk_full,
        "targets": targets,
    }


def report(payload: dict) -> None:
    r = payload["results"]
    c = payload["config"]
    print(f"soak: {r['wall_s'] / 60:.1f} min, {r['rounds']} rounds, gap {c['gap_s']} s, clock rate "
          f"{c['clock_rate']:g} ({payload['clock']}), {r['restarts']['count']} restarts, "
          f"{len(r['disk_full'])} disk-full phases, {r['idle_clients']['count']} idle + "
          f"{r['garbage_clients']} garbage clients, {r['busy_answers']} busy answers")
    print(f"{'kind':<22} {'ok':>6} {'expected':>9} {'unexpected':>11} {'p95 ms start':>13} {'p95 ms end':>11} "
          f"{'bytes start':>12} {'bytes end':>10}")
    lat, size = r["latency_p95_ms"], r["reply_bytes_median"]
    for kind, n in sorted(r["requests"].items()):
        lt, sz = lat.get(kind, {}), size.get(kind, {})
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"{kind:<22} {n['ok']:>6} {n['expected']:>9} {n['unexpected']:>11} {fmt(lt.get('start'), '.2f'):>13} "
              f"{fmt(lt.get('end'), '.2f'):>11} {fmt(sz.get('start'), '.0f'):>12} {fmt(sz.get('end'), '.0f'):>10}")
    rss = r["rss"]["mib_per_h"]
    print(f"server RSS growth: {'-' if rss is None else f'{rss:.2f}'} MiB/h ({r['rss']['method']})")
    for u in r["unexpected_failures"][:15]:
        print(f"  UNEXPECTED t={u['t_s']:.1f}s {u['kind']} [{u['phase']}]: {u['error']}")
    if len(r["unexpected_failures"]) > 15:
        print(f"  ... and {len(r['unexpected_failures']) - 15} more (see the JSON)")
    for name, t in r["targets"].items():
        verdict = "not judged (too few samples)" if t["met"] is None else "met" if t["met"] else "NOT met"
        value = t["value"]
        shown = "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"  {name}: {shown} (target <= {t.get('max', 'all')}): {verdict}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    length = ap.add_mutually_exclusive_group()
    length.add_argument("--hours", type=float, default=None, help="length of the run (default 2)")
    length.add_argument("--minutes", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bundle", type=Path, default=None, help="the good bundle (default: train + export a small one)")
    ap.add_argument("--clock-rate", type=float, default=1.0,
                    help="the server's clock runs this many times faster than real time (86400: a day per second)")
    ap.add_argument("--gap-s", type=float, nargs=2, default=(0.5, 2.0), metavar=("MIN", "MAX"),
                    help="pause between actions, uniform in [MIN, MAX] seconds (default 0.5 2)")
    ap.add_argument("--kill-every-s", type=float, default=None,
                    help="SIGKILL + restart this often (default: a third of the run, at most 900)")
    ap.add_argument("--disk-full-every-s", type=float, default=None,
                    help="a disk-full phase this often (default: a quarter of the run, at most 600)")
    ap.add_argument("--warmup-s", type=float, default=None,
                    help="left out of the start window and of each lifetime's RSS fit (default: 10%% of the run, "
                         "at most 120 s)")
    ap.add_argument("--rss-interval-s", type=float, default=5.0)
    ap.add_argument("--idle-cap-s", type=float, default=120.0,
                    help="an idle client the server has not dropped by then is closed and counted as held")
    ap.add_argument("--busy-wait-s", type=float, default=120.0, help="ask again after a 'busy' answer this long")
    ap.add_argument("--reply-timeout-s", type=float, default=60.0)
    ap.add_argument("--start-timeout-s", type=float, default=60.0)
    ap.add_argument("--device-threads", type=int, default=1)
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (stores, server logs)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak.json")
    args = ap.parse_args(argv)
    args.duration_s = 60 * args.minutes if args.minutes is not None else 3600 * (args.hours or 2.0)
    if args.kill_every_s is None:
        args.kill_every_s = min(900.0, args.duration_s / 3)
    if args.disk_full_every_s is None:
        args.disk_full_every_s = min(600.0, args.duration_s / 4)
    if args.warmup_s is None:
        args.warmup_s = min(120.0, 0.1 * args.duration_s)
    if not (args.duration_s > 0 and 0 <= args.gap_s[0] <= args.gap_s[1] and args.clock_rate > 0):
        ap.error("the run's length and --clock-rate must be > 0, and --gap-s MIN <= MAX")

    machine = machine_info({"device_ort_intra_op": args.device_threads})
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="edgefa_soak_")
    work = args.keep or Path(tmp.name)
    soak, interrupted = None, False
    try:
        soak = Soak(args, work)
        t0 = time.monotonic()
        try:
            soak.run()
        except Exception as exc:   # noqa: BLE001 - a soak that stops early still reports what it saw
            soak.rec.add("soak", "unexpected", note=f"the soak stopped early: {type(exc).__name__}: {exc}"[:400])
        except KeyboardInterrupt:  # Ctrl-C in a long run: report what was seen so far
            interrupted = True
        finally:
            wall_s = time.monotonic() - t0
            soak.close()
        results = summarize(soak, soak.rec.now())
    finally:
        if tmp is not None:
            tmp.cleanup()
    payload = {
        "benchmark": "soak",
        "what": "one real device server under a seeded mix of requests, broken deploys, idle and garbage clients, "
                "SIGKILL + restart and disk full; failed requests, RSS growth, reply sizes and p95 latency",
        "command": " ".join([Path(sys.executable).name, *(sys.argv if argv is None else [__file__, *argv])]),
        "server_command": " ".join(["python", "benchmarks/_soak_server.py", "--store", "STORE", "--listen",
                                    "127.0.0.1:0", "--clock-rate", repr(args.clock_rate), "--checkpoint-every",
                                    str(CHECKPOINT_EVERY), "--threads", str(args.device_threads)]),
        "clock": soak.clock_line,
        "machine": machine,
        "config": {"duration_s": args.duration_s, "seed": args.seed, "clock_rate": args.clock_rate,
                   "gap_s": list(args.gap_s), "deck": DECK, "kill_every_s": args.kill_every_s,
                   "kill_variants": list(KILL_VARIANTS), "disk_full_every_s": args.disk_full_every_s,
                   "disk_full": f"RLIMIT_FSIZE={DISK_FULL_FSIZE_BYTES} B set on the running server with prlimit(2); "
                                "SIGXFSZ ignored there, so writes fail with EFBIG as on a full disk with ENOSPC",
                   "warmup_s": args.warmup_s, "rss_interval_s": args.rss_interval_s,
                   "idle_cap_s": args.idle_cap_s, "idle_variants": list(IDLE_VARIANTS),
                   "busy_wait_s": args.busy_wait_s, "checkpoint_every": CHECKPOINT_EVERY, "batch": BATCH,
                   "device_threads": args.device_threads,
                   "bundle": str(args.bundle) if args.bundle else "trained: digits 64-64-64-10 DFA, 2 epochs",
                   "latency": "a fresh connection (HELLO) + the request, as one CLI command makes it; train_step: "
                              "one step's round trip inside a fine-tune",
                   "reply_bytes": "bytes the host received on the request's connection (WELCOME + reply frames)"},
        "interrupted": interrupted,
        "results": results,
        "wall_s_including_close": wall_s,
        "load_at_end": load_now(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    report(payload)
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
