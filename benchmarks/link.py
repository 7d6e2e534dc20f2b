"""Link benchmark: upload goodput, frame overhead and round-trip overhead of the device link.

    .venv/bin/python benchmarks/link.py [--bundle DIR] [--reps N] [--steps N] [--quick] [--out FILE]

The device is a real second process per transport, started the way a user starts it:

    python -m edgefa.without_torch device serve --listen 127.0.0.1:0 --store DIR    (TCP)
    python -m edgefa.without_torch device serve --port pty --store DIR             (pseudo-terminal)

and the host is edgefa's DeviceClient in this process. Three transports run side by side: TCP
over loopback (socket://HOST:PORT), the same with a shared key (every frame carries an HMAC-SHA256
tag), and a pseudo-terminal (the path the server prints, opened with pyserial as a serial port).
Every measurement takes one turn per transport per round, in an order shuffled per round (seeded),
so the minute-to-minute drift of a shared machine hits all three alike.

1. Upload goodput. The bundle archive is deployed --reps times per transport (after one warm-up
   deploy). A device keeps a bundle it already holds ("already deployed"), so two bundles that
   differ only in one manifest field alternate, and every deploy is a real upload. Goodput =
   archive bytes / time of the chunk transfers (first to last upload_chunk, from deploy's own
   progress callback); the whole deploy (packing, upload_begin, chunks, and upload_end, where the
   device verifies the sha256, unpacks and loads the bundle) is reported beside it.
2. Frame overhead. From the client's LinkStats over each whole deploy: wire bytes in both
   directions (frames sent + received) against archive bytes, split into the message layer
   (request headers), the frame layer (headers, CRCs, tags) and what came back (ACKs, replies).
3. Round-trip overhead. After the uploads, --steps train steps (batch 32 from sklearn's digits,
   after --warmup discarded) per transport: the client's wall time of train_step() minus the
   step_ms the device reports for its engine step. The device checkpoints every 10 steps (the
   server's default) right after replying, so the request after a checkpoint may wait for it;
   the steps around checkpoints are also reported apart. Then the
   same number of `status` calls (no compute): a pure link round trip.

Targets (the issue): frame overhead <= 2 % of bytes; round-trip overhead <= 1 ms on loopback
(judged on the median over all train steps on TCP without a key).
Writes benchmarks/results/link.json (or --out).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's edgefa first

import numpy as np  # noqa: E402

from _pairs import load_now, machine_info, spread  # noqa: E402
from edgefa.bundle import read_bundle  # noqa: E402
from edgefa.shared.datasets import load_digits  # noqa: E402
from edgefa.link.client import ClientConfig, DeviceClient, read_key  # noqa: E402
from edgefa.shared.batches import batch_indices  # noqa: E402

TRANSPORTS = ("tcp", "tcp_hmac", "pty")
BATCH, SEED, CHECKPOINT_EVERY = 32, 0, 10
OVERHEAD_TARGET_PCT, RTT_OVERHEAD_TARGET_MS = 2.0, 1.0
READY_PREFIX = "edgefa device server: "


def stats_ms(values) -> dict:
    """`spread` (median, p25-p75, min-max) plus the 95th percentile, of values in ms."""
    v = np.asarray(values, dtype=np.float64)
    out = spread(v)
    if v.size:
        out["p95"] = float(np.percentile(v, 95))
    return out


def shuffled(rng, names=TRANSPORTS) -> list[str]:
    return [names[i] for i in rng.permutation(len(names))]


# --- the bundles ------------------------------------------------------------------------------

def run_cli(args: list[str], commands: list[str], tmp: Path) -> None:
    """Run `python -m edgefa.cli ARGS` and record the command (with the temp dir as $TMP)."""
    cmd = [sys.executable, "-m", "edgefa.cli", *args]
    commands.append(" ".join(["python", *cmd[1:]]).replace(str(tmp), "$TMP"))
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed (rc {done.returncode}):\n{done.stderr[-2000:]}")


def make_bundles(given: Path | None, tmp: Path, commands: list[str]) -> tuple[Path, Path]:
    """The bundle (given, or trained 1 epoch and exported via the CLI) and a twin of it that
    differs only by one extra manifest field: a different archive, same size to a few bytes."""
    if given is None:
        run_cli(["train", "--epochs", "1", "--hidden", "256,256", "--out", str(tmp / "run")], commands, tmp)
        run_cli(["export", str(tmp / "run"), "--out", str(tmp / "bundle")], commands, tmp)
        given = tmp / "bundle"
    read_bundle(given)
    twin = tmp / "bundle_twin"
    shutil.copytree(given, twin, ignore=shutil.ignore_patterns("state", ".*"))
    manifest = json.loads((twin / "manifest.json").read_text())
    manifest["benchmark_twin"] = True    # the manifest lists the payload files' sha256, not its own
    (twin / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    read_bundle(twin)
    return Path(given), twin


# --- the devices ------------------------------------------------------------------------------

class Device:
    """One device server process and the host's client for it."""

    def __init__(self, name: str, tmp: Path, threads: int | None):
        self.name, self.dir = name, tmp / f"device_{name}"
        self.dir.mkdir()
        how = ["--port", "pty"] if name == "pty" else ["--listen", "127.0.0.1:0"]
        cmd = [sys.executable, "-m", "edgefa.without_torch", "device", "serve", *how,
               "--store", str(self.dir / "store"), "--checkpoint-every", str(CHECKPOINT_EVERY)]
        if threads:
            cmd += ["--threads", str(threads)]
        key = None
        if name == "tcp_hmac":
            (self.dir / "key").write_text(os.urandom(32).hex() + "\n")
            cmd += ["--key-file", str(self.dir / "key")]
            key = read_key(self.dir / "key")
        self.command = " ".join(["python", *cmd[1:]]).replace(str(tmp), "$TMP")
        self.log = open(self.dir / "server.log", "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline().strip()   # one line: "listening on H:P" / "serving on PATH"
        if not line.startswith(READY_PREFIX):
            self.stop()
            raise SystemExit(f"{name} server did not start: {line!r}\n{(self.dir / 'server.log').read_text()[-2000:]}")
        where = line.rsplit(" ", 1)[1]
        self.url = where if name == "pty" else f"socket://{where}"
        self.client = DeviceClient(self.url, ClientConfig(key=key))
        self.client.status()                          # the session's HELLO/WELCOME, before any count

    def stop(self) -> None:
        if getattr(self, "client", None) is not None:
            self.client.close()
        self.proc.terminate()                          # SIGTERM: the server checkpoints and exits
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# --- 1 + 2: uploads ---------------------------------------------------------------------------

def upload_once(client: DeviceClient, bundle: Path) -> dict:
    """One deploy, timed by phase from deploy's progress callback, with the LinkStats it cost."""
    marks: dict = {}

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        marks.setdefault("first", (now, done))       # right after upload_begin
        if done == total:
            marks["last"] = now                       # right after the last chunk's reply

    before = client.stats.as_dict()
    t0 = time.perf_counter()
    result = client.deploy(bundle, on_progress=progress)
    t1 = time.perf_counter()
    d = {k: v - before[k] for k, v in client.stats.as_dict().items()}
    size = result["archive_bytes"]
    (t_first, first_offset), t_last = marks["first"], marks["last"]
    if first_offset != 0 or result.get("deployed"):
        raise RuntimeError(f"deploy of {bundle} was not a full upload (first offset {first_offset})")
    wire = d["bytes_sent"] + d["bytes_received"]
    return {"archive_bytes": size, "chunks_s": t_last - t_first, "deploy_s": t1 - t0,
            "pack_and_begin_s": t_first - t0, "end_s": t1 - t_last,
            "wire_bytes": wire, "overhead_pct": 100.0 * (wire - size) / size,
            "message_header_bytes": d["payload_bytes_sent"] - size,
            "frame_bytes_sent": d["bytes_sent"] - d["payload_bytes_sent"],
            "bytes_received": d["bytes_received"],
            "frames_sent": d["frames_sent"], "frames_received": d["frames_received"],
            "retransmits": d["retransmits"]}


def measure_uploads(devices: dict[str, Device], bundles: tuple[Path, Path], reps: int, rng) -> dict:
    """Warm-up deploy, then `reps` rounds; the two bundles alternate so each deploy uploads."""
    runs = {n: [] for n in devices}
    for r in range(reps + 1):
        for name in shuffled(rng):
            run = upload_once(devices[name].client, bundles[r % 2])
            if r:                                     # round 0 is the warm-up
                runs[name].append(run)
    out = {}
    for name, rs in runs.items():
        size = rs[0]["archive_bytes"]
        mbps = [r["archive_bytes"] / r["chunks_s"] / 1e6 for r in rs]
        out[name] = {
            "goodput_MBps": spread(mbps),
            "deploy_MBps": spread([r["archive_bytes"] / r["deploy_s"] / 1e6 for r in rs]),
            "phases_ms": {k: stats_ms([r[f"{k}_s"] * 1e3 for r in rs])
                          for k in ("pack_and_begin", "chunks", "end", "deploy")},
            "archive_bytes": size,
            "overhead_pct": spread([r["overhead_pct"] for r in rs]),
            "bytes_per_deploy": {k: int(np.median([r[k] for r in rs]))
                                 for k in ("wire_bytes", "message_header_bytes", "frame_bytes_sent",
                                           "bytes_received", "frames_sent", "frames_received")},
            "retransmits": sum(r["retransmits"] for r in rs),
            "raw": rs,
        }
    return out


# --- 3: round trips ---------------------------------------------------------------------------

def measure_train_steps(devices: dict[str, Device], steps: int, warmup: int, rng) -> dict:
    """Train steps, one per transport per round: client round trip vs the device's step_ms."""
    data = load_digits()
    step = {n: d.client.status()["step"] for n, d in devices.items()}
    rows = {n: [] for n in devices}
    gc.collect()
    gc.disable()
    try:
        for i in range(warmup + steps):
            for name in shuffled(rng):
                idx = batch_indices(len(data.y), BATCH, SEED, step[name])
                x, y = data.X[idx], data.y[idx]
                t0 = time.perf_counter()
                reply = devices[name].client.train_step(step[name], x, y)
                rtt_ms = (time.perf_counter() - t0) * 1e3
                if reply.get("duplicate") or reply["step"] != step[name] + 1:
                    raise RuntimeError(f"{name}: unexpected train reply {reply.fields}")
                step[name] = reply["step"]
                if i >= warmup:
                    rows[name].append((rtt_ms, reply["step_ms"], reply["step"] % CHECKPOINT_EVERY in (0, 1),
                                       reply["accepted"], reply["loss"]))
    finally:
        gc.enable()
    out = {}
    for name, rs in rows.items():
        rtt, dev = np.array([r[0] for r in rs]), np.array([r[1] for r in rs])
        ckpt = np.array([r[2] for r in rs])
        over = rtt - dev
        out[name] = {"overhead_ms": stats_ms(over),
                     "overhead_ms_without_checkpoint_steps": stats_ms(over[~ckpt]),
                     "overhead_ms_checkpoint_steps": stats_ms(over[ckpt]),
                     "round_trip_ms": stats_ms(rtt), "device_step_ms": stats_ms(dev),
                     "refused_steps": int(sum(not r[3] for r in rs)),
                     "loss_first_last": [rs[0][4], rs[-1][4]],
                     "raw_round_trip_ms": [round(v, 4) for v in rtt],
                     "raw_device_step_ms": [round(v, 4) for v in dev]}
    return out


def measure_status(devices: dict[str, Device], calls: int, warmup: int, rng) -> dict:
    """`status` calls (no compute on the device): the link's own round trip."""
    rows = {n: [] for n in devices}
    gc.collect()
    gc.disable()
    try:
        for i in range(warmup + calls):
            for name in shuffled(rng):
                t0 = time.perf_counter()
                devices[name].client.status()
                if i >= warmup:
                    rows[name].append((time.perf_counter() - t0) * 1e3)
    finally:
        gc.enable()
    return {n: {"round_trip_ms": stats_ms(v), "raw_ms": [round(x, 4) for x in v]} for n, v in rows.items()}


# --- output -----------------------------------------------------------------------------------

def targets(uploads: dict, steps: dict) -> dict:
    out = {f"overhead_pct_{n}": {"value": u["overhead_pct"]["median"], "max": OVERHEAD_TARGET_PCT,
                                 "met": bool(u["overhead_pct"]["median"] <= OVERHEAD_TARGET_PCT)}
           for n, u in uploads.items()}
    med = steps["tcp"]["overhead_ms"]["median"]
    out["round_trip_overhead_ms_tcp_loopback_median"] = {"value": med, "max": RTT_OVERHEAD_TARGET_MS,
                                                         "met": bool(med <= RTT_OVERHEAD_TARGET_MS)}
    return out


def report(payload: dict) -> None:
    c, up, st, ss = payload["config"], payload["uploads"], payload["train_steps"], payload["status"]
    size = next(iter(up.values()))["archive_bytes"]
    print(f"link: archive {size} B, {c['upload_reps']} deploys (+1 warm-up), {c['train_steps']} train steps "
          f"(+{c['warmup']}), batch {BATCH}, {c['status_calls']} status calls; device threads "
          f"{c['device_threads']}, checkpoint every {CHECKPOINT_EVERY} steps")
    print(f"{'transport':<10} {'goodput MB/s':>13} {'deploy MB/s':>12} {'overhead %':>11} "
          f"{'step rtt-step ms med/p95':>25} {'(no ckpt) med/p95':>18} {'status ms med/p95':>18}")
    for n in TRANSPORTS:
        o, oc, s = st[n]["overhead_ms"], st[n]["overhead_ms_without_checkpoint_steps"], ss[n]["round_trip_ms"]
        print(f"{n:<10} {up[n]['goodput_MBps']['median']:>13.2f} {up[n]['deploy_MBps']['median']:>12.2f} "
              f"{up[n]['overhead_pct']['median']:>11.3f} {o['median']:>12.3f} / {o['p95']:<10.3f} "
              f"{oc['median']:>7.3f} / {oc['p95']:<8.3f} {s['median']:>7.3f} / {s['p95']:<8.3f}")
    for name, t in payload["targets"].items():
        print(f"  {name}: {t['value']:.3f} (target <= {t['max']}): {'met' if t['met'] else 'NOT met'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None, help="bundle to upload (default: train + export one)")
    ap.add_argument("--reps", type=int, default=5, help="timed deploys per transport (default 5)")
    ap.add_argument("--steps", type=int, default=300, help="timed train steps per transport (default 300)")
    ap.add_argument("--warmup", type=int, default=20, help="discarded train steps / status calls (default 20)")
    ap.add_argument("--status-calls", type=int, default=300, help="timed status calls per transport")
    ap.add_argument("--device-threads", type=int, default=1,
                    help="onnxruntime intra-op threads of each device server (default 1: three servers and "
                         "the host share this machine; 0: the server's default)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "link.json")
    ap.add_argument("--quick", action="store_true", help="smoke check: 2 deploys, 30 steps, 30 status calls")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.steps, args.warmup, args.status_calls = 2, 30, 5, 30

    rng = np.random.default_rng(SEED)
    commands: list[str] = []
    machine = machine_info({"device_ort_intra_op": args.device_threads or "server default"})
    with tempfile.TemporaryDirectory(prefix="edgefa_link_bench_") as tmp_name:
        tmp = Path(tmp_name)
        bundles = make_bundles(args.bundle, tmp, commands)
        devices: dict[str, Device] = {}
        try:
            for name in TRANSPORTS:
                devices[name] = Device(name, tmp, args.device_threads)
            commands += [d.command for d in devices.values()]
            uploads = measure_uploads(devices, bundles, args.reps, rng)
            steps = measure_train_steps(devices, args.steps, args.warmup, rng)
            status = measure_status(devices, args.status_calls, args.warmup, rng)
            reconnects = {n: d.client.reconnects for n, d in devices.items()}
            link_stats = {n: d.client.stats.as_dict() for n, d in devices.items()}
        finally:
            for d in devices.values():
                d.stop()

    payload = {
        "benchmark": "link",
        "what": "device link (edgefa.link) over loopback TCP, TCP with HMAC tags, and a pseudo-terminal: "
                "upload goodput, frame overhead in % of bytes, train-step round trip minus the device's step",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commands": commands,
        "machine": machine,
        "config": {"transports": list(TRANSPORTS), "upload_reps": args.reps, "upload_warmup": 1,
                   "train_steps": args.steps, "warmup": args.warmup, "status_calls": args.status_calls,
                   "batch": BATCH, "data": "sklearn digits (edgefa.shared.datasets.load_digits), batch_indices seed 0",
                   "device_threads": args.device_threads or "server default",
                   "checkpoint_every": CHECKPOINT_EVERY, "bundle": str(args.bundle) if args.bundle else "trained",
                   "order": "one turn per transport per round, order shuffled per round (seeded)",
                   "goodput": "archive bytes / time from the first to the last upload_chunk reply, MB = 1e6 B",
                   "overhead": "(bytes sent + bytes received over a whole deploy - archive bytes) / archive bytes",
                   "round_trip_overhead": "client wall time of train_step() - the device's step_ms (engine step "
                                          "only); the device writes its checkpoint right after replying to a checkpoint step"},
        "uploads": uploads,
        "train_steps": steps,
        "status": status,
        "targets": targets(uploads, steps),
        "reconnects": reconnects,
        "link_stats_at_end": link_stats,
        "load_at_end": load_now(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    report(payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
