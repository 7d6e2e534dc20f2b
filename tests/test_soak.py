"""The compressed soak: benchmarks/soak.py itself, for about a minute, with the server's clock
advancing an hour per second (injected into the profiler and the server's peer timeouts), every
fault on a short timer, and the targets a short run can judge: no request that should have
succeeded failed, broken deploys were refused and the old bundle kept serving, the server came
back from every SIGKILL on its own store (also in the middle of a fine-tune), disk full was
really felt and survived, idle clients were dropped, and replies stayed small."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

REPLY_CEILING_BYTES = 32 << 10     # info / status / profile without samples: bounded, far under 64 KiB


def test_compressed_soak_meets_its_targets(tmp_path, tiny_bundle_master):
    out = tmp_path / "soak.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "benchmarks" / "soak.py"), "--minutes", "0.75", "--seed", "3",
           "--bundle", str(tiny_bundle_master), "--clock-rate", "3600", "--gap-s", "0.05", "0.2",
           "--kill-every-s", "11", "--disk-full-every-s", "17", "--idle-cap-s", "20", "--busy-wait-s", "30",
           "--rss-interval-s", "1", "--keep", str(tmp_path / "work"), "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    payload = json.loads(out.read_text())
    r, log = payload["results"], done.stdout

    assert "applied to the profiler (clock_ns) and the server's timeouts (clock)" in payload["clock"], payload["clock"]
    assert r["unexpected_failures"] == [], log
    assert r["targets"]["unexpected_failures"]["met"] is True

    n = r["requests"]
    # the ordinary mix ran, and succeeded
    for kind in ("info", "status", "profile", "profile_samples", "finetune", "evaluate", "checkpoint", "pull",
                 "deploy", "train_step"):
        assert n[kind]["ok"] >= 1, (kind, n)
    # broken deploys were refused, and the old bundle answered after each one
    assert n["deploy_truncated"]["expected"] >= 1 and n["deploy_truncated"]["ok"] == 0, n
    assert n["deploy_corrupt"]["expected"] >= 1 and n["deploy_corrupt"]["ok"] == 0, n
    assert n["serving_check"]["ok"] >= n["deploy_truncated"]["expected"] + n["deploy_corrupt"]["expected"], n
    assert "deploy_truncated_accepted" not in n and "deploy_corrupt_accepted" not in n
    # every SIGKILL was followed by a start on the same store, whatever state it was left in
    restarts = r["restarts"]
    whys = {e["why"] for e in restarts["events"]}
    assert {"SIGKILL between requests", "SIGKILL right after a broken deploy", "SIGKILL during a fine-tune"} <= whys
    assert restarts["failed_to_start"] == 0 and restarts["stores_used"] == 1, restarts
    assert n["finetune_across_kill"]["ok"] >= 1, n
    # disk full: the writes failed (so the mechanism bit), the server lived through it
    assert r["disk_full"] and all(d["verified"] and d["server_survived"] for d in r["disk_full"]), r["disk_full"]
    # idle clients were dropped by the server, none held it; garbage was survived
    idle = r["idle_clients"]
    assert idle["count"] >= 1 and idle["held_past_cap"] == 0, idle
    assert r["garbage_clients"] >= 1
    # replies that must not grow with uptime stayed small
    for kind in ("info", "status", "profile"):
        assert 0 < r["reply_bytes_median"][kind]["max"] <= REPLY_CEILING_BYTES, (kind, r["reply_bytes_median"][kind])
    assert r["rss"]["samples_used"] > 0 and "least squares" in r["rss"]["method"]
