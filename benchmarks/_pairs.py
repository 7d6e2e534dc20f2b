"""Shared by the benchmarks: paired timing, per-pair ratio statistics, machine info, JSON output.

numpy and the standard library only: the device benchmark's runtime worker imports this module,
and it must never pull in torch.

Why pairs: on a small shared machine the same step's time drifts by 30 % or more from minute to
minute. Timing A and B back to back and taking the ratio *within* each pair cancels most of that
drift; the median of the per-pair ratios is then far steadier than a ratio of two medians.

Why stalled pairs are set aside: the VM these were written on also freezes for 300-1500 ms at a
time, several times a second when the host is busy (a 30 ms step then takes 400+ ms; about a
quarter of steps were hit while this was written). That is not the step's cost, and it is not
fair either: the longer contender is hit more often, which biases the per-pair median towards the
shorter one. Step times are bimodal (30-60 ms vs 300+ ms), so a pair counts as *stalled* when
either step took more than STALL_FACTOR x that contender's fastest step in the run -- a bar that
ordinary drift (the slower of two runs of one step is at most ~1.7x the faster) does not reach.
Stalled pairs are kept in the JSON and replaced by extra pairs until `pairs` clean ones exist;
the headline statistics use the clean pairs, and the all-pairs statistics are reported beside them.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

# run_all.py --quick points this at results/quick/ so that smoke runs never overwrite full results
RESULTS_DIR = Path(os.environ.get("EDGEFA_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
STALL_FACTOR = 2.0     # a step over 2x its contender's fastest step was hit by a VM stall
MAX_EXTRA_FACTOR = 4   # give up after pairs * 4 pairs in all, clean or not


# --- statistics -------------------------------------------------------------------------------

def spread(values) -> dict:
    """Median with its 25th-75th percentile and min-max (plus n), as plain floats for JSON."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"n": 0}
    p25, med, p75 = np.percentile(v, [25, 50, 75])
    return {"median": float(med), "p25": float(p25), "p75": float(p75),
            "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def ms(values) -> dict:
    """`spread` of times given in seconds, reported in milliseconds."""
    return spread(np.asarray(values, dtype=np.float64) * 1e3)


def ratio_summary(a_times, b_times, a_name: str, b_name: str, clean) -> dict:
    """Per-pair ratio a/b over the clean pairs (the headline: median and spread) and each side's
    times; the same over all pairs; and, as a cross-check that needs no stall rule at all, the
    ratio of each side's 10th-percentile and minimum times over all pairs."""
    a, b = np.asarray(a_times, np.float64), np.asarray(b_times, np.float64)
    c = np.asarray(clean, bool)
    return {"ratio": f"{a_name}/{b_name} per pair",
            "ratio_stats": spread(a[c] / b[c]), f"{a_name}_ms": ms(a[c]), f"{b_name}_ms": ms(b[c]),
            "all_pairs": {"ratio_stats": spread(a / b), f"{a_name}_ms": ms(a), f"{b_name}_ms": ms(b)},
            "cross_check": {"p10_time_ratio": float(np.percentile(a, 10) / np.percentile(b, 10)),
                            "min_time_ratio": float(a.min() / b.min())},
            "raw_ms": {a_name: [round(t * 1e3, 3) for t in a], b_name: [round(t * 1e3, 3) for t in b],
                       "clean": c.tolist()}}


# --- alternation ------------------------------------------------------------------------------

def stalled(times: dict[str, list[float]]) -> list[bool]:
    """Per pair: did either step take more than STALL_FACTOR x its contender's fastest step?"""
    limits = {n: STALL_FACTOR * min(ts) for n, ts in times.items()}
    k = len(next(iter(times.values())))
    return [any(times[n][i] > limits[n] for n in times) for i in range(k)]


def run_pairs(contenders: dict[str, Callable[[], object]], pairs: int, warmup: int, seed: int = 0,
              time_of: Callable[[object], float] = lambda r: r) -> tuple[dict[str, list], dict]:
    """Call each contender once per pair, in an order shuffled per pair by a seeded RNG (so neither
    side always runs right after the other's cache footprint). Warm-up pairs are run the same way
    and discarded. Pairs continue until `pairs` of them are clean (see the module doc), or
    pairs * MAX_EXTRA_FACTOR were run.

    Calls follow each other with no pause: an idle gap lets the vCPUs halt and the thread pools
    fall asleep, and the next step then pays for waking them (measured here: BP's median went
    from 34 to 52 ms with a 60 ms quiet wait before each step), which a training loop never does.

    Returns {name: [result per pair]} for every pair after warm-up and per-pair info: the order
    and `clean` (not stalled, judged with the fastest steps of the whole run)."""
    rng = np.random.default_rng(seed)
    names = list(contenders)
    results = {n: [] for n in names}
    info = {"order": [], "stall_factor": STALL_FACTOR}
    i = 0
    while True:
        kept = len(info["order"])
        if kept >= pairs:
            n_clean = kept - sum(stalled({n: [time_of(r) for r in results[n]] for n in names}))
            if n_clean >= pairs or kept >= pairs * MAX_EXTRA_FACTOR:
                break
        order = [names[j] for j in rng.permutation(len(names))]
        got = {n: contenders[n]() for n in order}
        if i >= warmup:
            info["order"].append(order)
            for n in names:
                results[n].append(got[n])
        i += 1
    info["clean"] = [not s for s in stalled({n: [time_of(r) for r in results[n]] for n in names})]
    info["pairs_run"] = len(info["order"])
    info["pairs_clean"] = sum(info["clean"])
    if info["pairs_run"] and not info["pairs_clean"]:
        # Every pair stalled (a machine busy with other work): the headline then uses every pair,
        # and says so, rather than reporting nothing.
        info["clean"] = [True] * info["pairs_run"]
        info["no_clean_pairs"] = "every pair stalled (the machine was busy): the statistics use all pairs"
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


def load_now() -> dict:
    """Load average and CPU pressure (PSI 'some': % of time a task waited for a CPU), so the JSON
    says how busy the machine was."""
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


def machine_info(threads: dict) -> dict:
    """CPU, core count, library versions (read from package metadata, so nothing gets imported),
    the thread counts the benchmark set, the load at the start, and the date."""
    return {"cpu_model": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(),
            "versions": {d: _version(d) for d in ("torch", "onnxruntime", "numpy", "onnx")},
            "threads": threads,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "load_at_start": load_now()}


def write_json(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def fmt(stats: dict, unit: str = "") -> str:
    """One line for the console: median [p25-p75] (min-max)."""
    if not stats.get("n"):
        return "n/a (no pairs)"
    return (f"{stats['median']:.3f}{unit} [{stats['p25']:.3f}-{stats['p75']:.3f}] "
            f"(min {stats['min']:.3f}, max {stats['max']:.3f})")
