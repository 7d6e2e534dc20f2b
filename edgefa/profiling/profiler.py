"""Measurement as named windows: `with profiler.window("train_step"): ...` (after Zeus).

A window costs two clock reads and an append, about a microsecond, so the runtime wraps every
phase in one (load, batch, train_step, forward, checkpoint, transfer) whether or not anyone looks.
Everything slower happens off the hot path:

- A sampler thread reads the energy source and the process RSS every `sample_interval_s` on the
  same clock (perf_counter_ns). A power sensor (watts) is integrated into cumulative joules by the
  trapezoid rule; an energy counter (RAPL, NVML) already is cumulative.
- A window's energy is the cumulative energy interpolated linearly at its end minus at its start.
  A 0.4 ms step is much shorter than a 20 ms sample interval, so one window's figure is an
  apportioned share of the energy of its sample interval; summed over many windows it is the
  energy spent while they ran. The summary therefore reports totals and per-window means.
- Where no sensor is readable, energy is estimated from the device profile (FLOPs and bytes the
  window declares times per-operation energies, plus idle power times its duration), and the
  method says "estimated" wherever it appears.

Latency statistics drop the first `warmup` windows of each repeated phase (first runs allocate
arenas and fill caches) and report p50/p95/p99 with the aggregation named.

numpy only: this runs on the device.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .memory import peak_rss_bytes, rss_bytes

LATENCY_AGGREGATION = "percentiles over windows after warm-up"


@dataclass(frozen=True)
class EnergyEstimate:
    """The estimated fallback: per-operation energies and idle power from a device profile."""
    profile: str
    idle_power_w: float
    pj_per_flop: float
    pj_per_dram_byte: float

    def joules(self, seconds: float, flops: float, bytes_moved: float) -> float:
        return self.idle_power_w * seconds + (flops * self.pj_per_flop + bytes_moved * self.pj_per_dram_byte) * 1e-12

    @classmethod
    def from_profile(cls, profile) -> "EnergyEstimate":
        return cls(profile.name, profile.idle_power_w, profile.pj_per_flop, profile.pj_per_dram_byte)


class _Window:
    """The context manager `Profiler.window` returns: records (start, end) into one list."""
    __slots__ = ("_spans", "_start")

    def __init__(self, spans: deque):
        self._spans = spans

    def __enter__(self):
        self._start = time.perf_counter_ns()
        return self

    def __exit__(self, *exc):
        self._spans.append((self._start, time.perf_counter_ns()))
        return False


class _NoWindow:
    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NO_WINDOW = _NoWindow()


class Profiler:
    """Named windows plus a background sampler of energy and memory.

    `energy` is an EnergySource from profiling.sensors (kind "power" in watts or "energy" in
    cumulative joules), or None; `estimate` is used when it is None. `enabled=False` makes every
    window a shared no-op (the "profiling off" side of the overhead benchmark)."""

    def __init__(self, energy=None, estimate: EnergyEstimate | None = None, *, warmup: int = 3,
                 sample_interval_s: float = 0.02, max_samples: int = 50_000, max_windows: int = 100_000,
                 notes: list[str] | None = None,
                 enabled: bool = True, gpu_memory: Callable[[], dict | None] | None = None):
        self.energy, self.estimate, self.warmup = energy, estimate, warmup
        self.sample_interval_s, self.notes, self.enabled = sample_interval_s, list(notes or []), enabled
        self.gpu_memory = gpu_memory
        # the last max_windows (start, end) per phase: a device serving for weeks stays bounded
        self.spans: dict[str, deque[tuple[int, int]]] = {}
        self.max_windows = max_windows
        self.work: dict[str, tuple[float, float]] = {}     # name -> (flops, bytes) per window, for estimates
        self.extra: dict[str, object] = {}                 # figures measured elsewhere, e.g. runtime growth
        self._open: dict[str, int] = {}
        self._max_samples = max_samples
        self._samples = deque(maxlen=max_samples)          # (t_ns, cumulative J or nan, rss bytes)
        self._cum_j, self._last = 0.0, None                # integration state for power sensors
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.t0_ns = time.perf_counter_ns()

    # --- windows ---------------------------------------------------------------------------

    def window(self, name: str, flops: float = 0.0, bytes_moved: float = 0.0):
        """A context manager timing one window of `name`. The work it declares (FLOPs, bytes
        moved) is only used by the estimated energy fallback; it is per window and constant per name."""
        if not self.enabled:
            return _NO_WINDOW
        spans = self.spans.get(name)
        if spans is None:
            spans = self.spans[name] = deque(maxlen=self.max_windows)
        if flops or bytes_moved:
            self.work[name] = (flops, bytes_moved)
        return _Window(spans)

    def begin_window(self, name: str) -> None:
        if self.enabled:
            self._open[name] = time.perf_counter_ns()

    def end_window(self, name: str) -> None:
        if self.enabled:
            start = self._open.pop(name)
            self.window(name)._spans.append((start, time.perf_counter_ns()))

    def seconds(self, name: str, skip_warmup: bool = True) -> np.ndarray:
        """Durations of the closed windows of `name`, in seconds (after warm-up by default)."""
        spans = list(self.spans.get(name, ()))
        spans = spans[self.warmup_of(len(spans)) if skip_warmup else 0:]
        kept = np.array(spans, dtype=np.int64).reshape(-1, 2)
        return (kept[:, 1] - kept[:, 0]) * 1e-9

    def last_seconds(self, name: str) -> float:
        """Duration of the last closed window of `name` (O(1): the server reports it every step)."""
        start, end = self.spans[name][-1]
        return (end - start) * 1e-9

    def warmup_of(self, count: int) -> int:
        """Windows dropped as warm-up from a phase seen `count` times: `warmup`, but none from a
        phase seen too few times to have a steady state (load, an occasional checkpoint)."""
        return self.warmup if count > 2 * self.warmup else 0

    def clear(self) -> None:
        """Forget every window and sample (a fresh measurement on a long-running device)."""
        with self._lock:
            self.spans.clear()
            self._open.clear()
            self._samples.clear()
            self._cum_j, self._last = 0.0, None
            self.t0_ns = time.perf_counter_ns()
        self.sample_now()

    # --- the sampler -----------------------------------------------------------------------

    def start(self) -> "Profiler":
        """Start sampling in a daemon thread (idempotent)."""
        if self._thread is None and self.enabled:
            self.sample_now()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="edgefa-profiler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.sample_now()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.sample_interval_s):
            self.sample_now()

    def sample_now(self) -> None:
        """Take one sample of energy and RSS now (the sampler thread calls this every interval)."""
        t = time.perf_counter_ns()
        cum = float("nan")
        if self.energy is not None:
            try:
                value = self.energy.read()
            except Exception as exc:  # a sensor that fails mid-run: keep the run, stop measuring energy
                self.notes.append(f"{self.energy.name}: stopped reading ({exc}); energy after this is missing")
                self.energy = None
            else:
                with self._lock:
                    if self.energy.kind == "energy":
                        cum = value
                    else:   # watts: trapezoid between the last two samples
                        if self._last is not None:
                            t_prev, w_prev = self._last
                            self._cum_j += 0.5 * (w_prev + value) * (t - t_prev) * 1e-9
                        self._last = (t, value)
                        cum = self._cum_j
        with self._lock:
            self._samples.append((t, cum, rss_bytes() or 0))

    # --- the summary -----------------------------------------------------------------------

    def _energy_method(self) -> str:
        if self.energy is not None or self._measured_samples():
            return "measured"
        return "estimated" if self.estimate is not None else "none"

    def _measured_samples(self) -> bool:
        return any(not np.isnan(c) for _, c, _ in self._samples)

    def summary(self, include_samples: bool = True) -> dict:
        """Everything measured so far, JSON-ready (the `phases`, `memory` and `energy` of profile.json)."""
        self.sample_now()   # so that the sampled span covers every window closed so far
        with self._lock:
            samples = np.array(self._samples, dtype=np.float64).reshape(-1, 3)
        t_ns, cum, rss = samples[:, 0], samples[:, 1], samples[:, 2]
        valid = ~np.isnan(cum)
        method = self._energy_method()
        source = (f"{self.energy.name}: {self.energy.what}" if self.energy is not None
                  else f"estimate from device profile {self.estimate.profile}" if self.estimate else "none")

        phases = {}
        for name, spans in self.spans.items():
            skip = self.warmup_of(len(spans))
            kept = np.array(list(spans)[skip:], dtype=np.int64).reshape(-1, 2)
            seconds = (kept[:, 1] - kept[:, 0]) * 1e-9
            ms = seconds * 1e3
            phase = {"count": int(len(kept)), "warmup": skip,
                     "latency_ms": latency_stats(ms), "total_s": float(seconds.sum())}
            if include_samples:
                phase["samples_ms"] = [round(float(v), 6) for v in ms]
            phase["energy_j"] = self._window_energy(name, kept, seconds, t_ns[valid], cum[valid], method, source)
            phases[name] = phase

        headline = phases.get("train_step") or (max(phases.values(), key=lambda p: p["count"]) if phases else None)
        energy_total = headline["energy_j"]["total"] if headline else None
        energy = {"method": method, "backend": self.energy.name if self.energy is not None else
                  (f"estimate from profile {self.estimate.profile}" if self.estimate else "none"),
                  "what": self.energy.what if self.energy is not None else
                  ("idle power x time + FLOPs x pJ/FLOP + bytes x pJ/byte" if self.estimate else "nothing"),
                  "notes": list(self.notes),
                  # the median, like the step time beside it: a VM stall or a page-cache flush in
                  # a few windows should not set the figure for every step (the mean is per_window)
                  "per_step_j": headline["energy_j"]["per_window_p50"] if headline else None,
                  "per_step_aggregation": "median over train_step windows after warm-up",
                  "average_power_w": (energy_total / headline["total_s"]
                                      if energy_total is not None and headline["total_s"] > 0 else None),
                  "timeline": self._power_timeline(t_ns[valid], cum[valid])}
        # The kernel's high-water mark (VmHWM) is folded from per-thread counters and can lag the
        # sampled VmRSS by 64 pages per thread (4 MiB with 16 threads, seen on a 16-core machine),
        # so the peak is the larger of the two: both are resident bytes that were really reached.
        highest = [v for v in (peak_rss_bytes(), max((int(r) for r in rss), default=None)) if v is not None]
        memory = {"peak_rss_bytes": max(highest, default=None),
                  "rss_bytes": rss_bytes(),
                  "timeline": {"t_s": [round((t - self.t0_ns) * 1e-9, 4) for t in t_ns],
                               "rss_bytes": [int(r) for r in rss]},
                  "runtime_growth_bytes": self.extra.get("runtime_growth_bytes"),
                  "onnxruntime_arena": "not exposed by onnxruntime's Python API; included in runtime_growth_bytes",
                  "gpu": self.gpu_memory() if self.gpu_memory else None}
        return {"phases": phases, "memory": memory, "energy": energy}

    def _window_energy(self, name, kept, seconds, t_ns, cum, method, source) -> dict:
        out = {"per_window": None, "per_window_p50": None, "total": None, "method": method, "source": source}
        if not len(kept):
            return out
        if method == "measured":
            if len(t_ns) < 2 or kept[0, 0] < t_ns[0] or kept[-1, 1] > t_ns[-1]:
                out["method"], out["source"] = "none", "windows outside the sampled span"
                return out
            joules = np.interp(kept[:, 1], t_ns, cum) - np.interp(kept[:, 0], t_ns, cum)
        elif method == "estimated":
            flops, nbytes = self.work.get(name, (0.0, 0.0))
            joules = np.array([self.estimate.joules(s, flops, nbytes) for s in seconds])
        else:
            return out
        out["total"] = float(joules.sum())
        out["per_window"] = float(joules.mean())
        out["per_window_p50"] = float(np.median(joules))
        return out

    def _power_timeline(self, t_ns: np.ndarray, cum: np.ndarray) -> dict:
        """Average power between consecutive samples (measured only)."""
        if len(t_ns) < 2:
            return {"t_s": [], "power_w": []}
        dt = np.diff(t_ns) * 1e-9
        ok = dt > 0
        power = np.diff(cum)[ok] / dt[ok]
        mid = ((t_ns[1:] + t_ns[:-1]) / 2)[ok]
        return {"t_s": [round((t - self.t0_ns) * 1e-9, 4) for t in mid], "power_w": [round(float(p), 4) for p in power]}


def latency_stats(ms: np.ndarray) -> dict:
    """p50/p95/p99 (numpy's linear interpolation), mean, min and max of per-window milliseconds."""
    if not len(ms):
        return {"aggregation": LATENCY_AGGREGATION}
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(ms.mean()),
            "min": float(ms.min()), "max": float(ms.max()), "aggregation": LATENCY_AGGREGATION}
