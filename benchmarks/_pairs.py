"""Shared by the benchmarks: paired timing, per-pair ratio statistics, machine info, JSON output.

numpy and the standard library only: the device benchmark's runtime worker imports this module,
and it must never pull in torch.

Why pairs: on a small shared machine the same step's time drifts by 30 % or more from minute to
minute. Timing A and B back to back and taking the ratio *within* each pair cancels most of that
drift; the median of the per-pair ratios is then far steadier than a ratio of two medians.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --- statistics -------------------------------------------------------------------------------

def spread(values) -> dict:
    """Median with its 25th-75th percentile and min-max (plus n), as plain floats for JSON."""
    v = np.asarray(values, dtype=np.float64)
    p25, med, p75 = np.percentile(v, [25, 50, 75])
    return {"median": float(med), "p25": float(p25), "p75": float(p75),
            "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def ms(values) -> dict:
    """`spread` of times given in seconds, reported in milliseconds."""
    return spread(np.asarray(values, dtype=np.float64) * 1e3)


def ratio_summary(a_times, b_times, a_name: str, b_name: str) -> dict:
    """Per-pair ratio a/b (the number that answers 'how much faster') and each side's times."""
    a, b = np.asarray(a_times, np.float64), np.asarray(b_times, np.float64)
    return {"ratio": f"{a_name}/{b_name} per pair", "ratio_stats": spread(a / b),
            f"{a_name}_ms": ms(a), f"{b_name}_ms": ms(b)}


# --- alternation ------------------------------------------------------------------------------

def procs_running() -> int | None:
    """Runnable tasks system-wide right now (/proc/stat), this reader included."""
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("procs_running"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def wait_for_quiet(max_wait: float = 3.0, need: int = 3, poll: float = 0.02) -> float:
    """Wait (at most `max_wait` s) until nothing but this reader is runnable for `need` polls in a
    row, so a pair starts when no other process competes for the cores. Both contenders of a pair
    run after the same gate, so it favours neither; it only cuts how often a pair is disturbed.
    Returns the seconds waited (== max_wait when the machine never went quiet)."""
    t0 = time.perf_counter()
    quiet = 0
    while time.perf_counter() - t0 < max_wait:
        n = procs_running()
        if n is None:
            return 0.0
        quiet = quiet + 1 if n <= 1 else 0
        if quiet >= need:
            break
        time.sleep(poll)
    return time.perf_counter() - t0


def run_pairs(contenders: dict[str, Callable[[], object]], pairs: int, warmup: int,
              seed: int = 0, gate_s: float = 3.0) -> tuple[dict[str, list], dict]:
    """Call each contender once per pair, in an order shuffled per pair by a seeded RNG (so neither
    side always runs right after the other's cache footprint). Warm-up pairs are run the same way
    and discarded. Before each pair, `wait_for_quiet(gate_s)` (0 disables the gate).
    Returns {name: [result per kept pair]} and per-pair info: the order and the gate's wait."""
    rng = np.random.default_rng(seed)
    names = list(contenders)
    results = {n: [] for n in names}
    info = {"order": [], "gate_wait_s": [], "gate_max_s": gate_s}
    for i in range(warmup + pairs):
        order = [names[j] for j in rng.permutation(len(names))]
        waited = wait_for_quiet(gate_s) if gate_s > 0 else 0.0
        got = {n: contenders[n]() for n in order}
        if i >= warmup:
            info["order"].append(order)
            info["gate_wait_s"].append(round(waited, 4))
            for n in names:
                results[n].append(got[n])
    info["pairs_started_quiet"] = sum(w < gate_s for w in info["gate_wait_s"])
    return results, info


# --- machine info and output ------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info(threads: dict) -> dict:
    """CPU, core count, library versions (read from package metadata, so nothing gets imported),
    the thread counts the benchmark set, the load average at the start, and the date."""
    info = {"cpu_model": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(),
            "versions": {d: _version(d) for d in ("torch", "onnxruntime", "numpy", "onnx")},
            "threads": threads,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    info["load_at_start"] = load_now()
    return info


def load_now() -> dict:
    """Load average and CPU pressure (PSI 'some', % of time a task waited for a CPU): other
    processes on a 2-core machine swing step times a lot, so the JSON says how busy it was."""
    out = {}
    try:
        out["loadavg"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        with open("/proc/pressure/cpu") as f:
            some = f.readline().split()[1:4]  # avg10=.. avg60=.. avg300=..
        out["cpu_pressure_some_pct"] = {k: float(v) for k, v in (kv.split("=") for kv in some)}
    except (OSError, ValueError, IndexError):
        pass
    return out


def write_json(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def fmt(stats: dict, unit: str = "") -> str:
    """One line for the console: median [p25-p75] (min-max)."""
    return (f"{stats['median']:.3f}{unit} [{stats['p25']:.3f}-{stats['p75']:.3f}] "
            f"(min {stats['min']:.3f}, max {stats['max']:.3f})")
