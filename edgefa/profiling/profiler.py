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

Bounded by design: a device server runs for weeks, so every container here has a fixed bound
(windows per phase, phases, samples, notes), stored compactly (16 bytes a window, 24 a sample),
and the summary has a size that does not grow with uptime: timelines are downsampled to at most
SERIES_POINTS points and `samples_ms` holds at most the last SERIES_POINTS windows. Every number in
it is a plain Python int or float (numpy scalars would stay in a link reply's JSON header).

Threads: windows close on the serving thread, the sampler thread appends samples, and `summary`
may run on either; every shared container is read and written under `_lock` only, and sampling
itself is serialized by `_sampling` (so samples stay in time order and the power integration
never sees time run backwards).

Every timestamp comes from `clock_ns` (time.perf_counter_ns unless injected: the soak benchmark
runs a clock that advances days per second, so what grows with uptime shows in seconds).

numpy only: this runs on the device.
"""

from __future__ import annotations

import threading
import time
from array import array
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .memory import peak_rss_bytes, rss_bytes

LATENCY_AGGREGATION = "percentiles over windows after warm-up"
SERIES_POINTS = 512      # the most points any series in a summary has (timelines, samples_ms)
MAX_PHASES = 64          # distinct window names kept; more is a bug in the caller, noted once
MAX_NOTES = 16           # distinct notes kept (the newest); a note repeated is kept once
MEMORY_AGGREGATION = ("max RSS per bucket of consecutive samples (at most 512 buckets); "
                      "t_s: the time of the bucket's last sample")
POWER_AGGREGATION = ("mean power per bucket of consecutive samples (at most 512 buckets): energy over "
                     "the bucket / its duration; t_s: the bucket's midpoint")


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


class _Ring:
    """The last `capacity` rows of `width` numbers in one flat array.array: it grows to its
    capacity and then overwrites its oldest row, so its memory is bounded (8 bytes a number).
    Not thread-safe by itself: the Profiler calls it under its lock."""
    __slots__ = ("_flat", "_typecode", "width", "capacity", "_numbers", "_next")

    def __init__(self, typecode: str, width: int, capacity: int):
        if capacity < 1:
            raise ValueError(f"a ring needs a capacity of at least 1, not {capacity}")
        self._typecode, self.width, self.capacity = typecode, width, capacity
        self._numbers = capacity * width
        self._flat, self._next = array(typecode), 0     # _next: where the oldest row starts, once full

    def __len__(self) -> int:
        return len(self._flat) // self.width

    def append(self, row: tuple) -> None:
        flat = self._flat
        if len(flat) < self._numbers:
            flat.extend(row)
        else:
            i = self._next
            for k, value in enumerate(row):
                flat[i + k] = value
            self._next = (i + self.width) % self._numbers

    def last(self) -> tuple:
        end = (self._next or len(self._flat)) - self.width
        return tuple(self._flat[end:end + self.width])

    def rows(self) -> np.ndarray:
        """A copy of every row, oldest first, shape (rows, width)."""
        flat = np.array(self._flat, dtype=np.int64 if self._typecode == "q" else np.float64)
        return np.roll(flat, -self._next).reshape(-1, self.width)

    def clear(self) -> None:
        self._flat, self._next = array(self._typecode), 0


class _Window:
    """The context manager `Profiler.window` returns: records (start, end) into one phase's ring."""
    __slots__ = ("_spans", "_lock", "_clock_ns", "_start")

    def __init__(self, spans: _Ring, lock: threading.Lock, clock_ns: Callable[[], int]):
        self._spans, self._lock, self._clock_ns = spans, lock, clock_ns

    def __enter__(self):
        self._start = self._clock_ns()
        return self

    def __exit__(self, *exc):
        end = self._clock_ns()
        with self._lock:
            self._spans.append((self._start, end))
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
    window a shared no-op (the "profiling off" side of the overhead benchmark). `clock_ns` is the
    clock every timestamp is read from (nanoseconds, monotonic)."""

    def __init__(self, energy=None, estimate: EnergyEstimate | None = None, *, warmup: int = 3,
                 sample_interval_s: float = 0.02, max_samples: int = 50_000, max_windows: int = 100_000,
                 notes: list[str] | None = None, enabled: bool = True,
                 gpu_memory: Callable[[], dict | None] | None = None,
                 clock_ns: Callable[[], int] = time.perf_counter_ns):
        self.energy, self.estimate, self.warmup = energy, estimate, warmup
        self.sample_interval_s, self.enabled, self.clock_ns = sample_interval_s, enabled, clock_ns
        self.gpu_memory = gpu_memory
        self._lock = threading.Lock()                      # guards spans, work, _open, notes, _samples
        self._sampling = threading.Lock()                  # one sample at a time, in time order
        self.notes: deque[str] = deque(maxlen=MAX_NOTES)
        for note in notes or ():
            self._note(note)
        # the last max_windows (start, end) per phase: a device serving for weeks stays bounded
        self.spans: dict[str, _Ring] = {}
        self.max_windows = max_windows
        self.work: dict[str, tuple[float, float]] = {}     # name -> (flops, bytes) per window, for estimates
        self.extra: dict[str, object] = {}                 # figures measured elsewhere, e.g. runtime growth
        self._open: dict[str, int] = {}
        self._samples = _Ring("d", 3, max_samples)         # (t_ns, cumulative J or nan, rss bytes)
        self._cum_j, self._last = 0.0, None                # integration state for power sensors
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.t0_ns = clock_ns()

    def _note(self, text: str) -> None:
        """Keep `text` once (a sensor failing every sample must not grow a list), newest last."""
        with self._lock:
            if text not in self.notes:
                self.notes.append(text)

    # --- windows ---------------------------------------------------------------------------

    def _phase(self, name: str) -> _Ring | None:
        """The ring of `name`, made on first use; None past MAX_PHASES names (noted once)."""
        spans = self.spans.get(name)      # a dict read is atomic; the dict only grows under _lock
        if spans is None:
            with self._lock:
                spans = self.spans.get(name)
                if spans is None and len(self.spans) < MAX_PHASES:
                    spans = self.spans[name] = _Ring("q", 2, self.max_windows)
            if spans is None:
                self._note(f"more than {MAX_PHASES} window names: windows after that are not recorded")
        return spans

    def window(self, name: str, flops: float = 0.0, bytes_moved: float = 0.0):
        """A context manager timing one window of `name`. The work it declares (FLOPs, bytes
        moved) is only used by the estimated energy fallback; it is per window and constant per name."""
        if not self.enabled:
            return _NO_WINDOW
        spans = self._phase(name)
        if spans is None:
            return _NO_WINDOW
        if (flops or bytes_moved) and self.work.get(name) != (flops, bytes_moved):
            with self._lock:
                self.work[name] = (flops, bytes_moved)
        return _Window(spans, self._lock, self.clock_ns)

    def begin_window(self, name: str) -> None:
        if self.enabled:
            start = self.clock_ns()
            with self._lock:
                self._open[name] = start

    def end_window(self, name: str) -> None:
        if self.enabled:
            end = self.clock_ns()
            spans = self._phase(name)
            with self._lock:
                start = self._open.pop(name)
                if spans is not None:
                    spans.append((start, end))

    def _spans_of(self, name: str) -> np.ndarray:
        with self._lock:
            spans = self.spans.get(name)
            return spans.rows() if spans is not None else np.zeros((0, 2), np.int64)

    def seconds(self, name: str, skip_warmup: bool = True) -> np.ndarray:
        """Durations of the closed windows of `name`, in seconds (after warm-up by default)."""
        spans = self._spans_of(name)
        kept = spans[self.warmup_of(len(spans)) if skip_warmup else 0:]
        return (kept[:, 1] - kept[:, 0]) * 1e-9

    def last_seconds(self, name: str) -> float:
        """Duration of the last closed window of `name` (O(1): the server reports it every step)."""
        with self._lock:
            start, end = self.spans[name].last()
        return (end - start) * 1e-9

    def warmup_of(self, count: int) -> int:
        """Windows dropped as warm-up from a phase seen `count` times: `warmup`, but none from a
        phase seen too few times to have a steady state (load, an occasional checkpoint)."""
        return self.warmup if count > 2 * self.warmup else 0

    def clear(self) -> None:
        """Forget every window and sample (a fresh measurement on a long-running device)."""
        with self._sampling, self._lock:
            self.spans.clear()
            self._open.clear()
            self._samples.clear()
            self._cum_j, self._last = 0.0, None
            self.t0_ns = self.clock_ns()
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
        with self._sampling:
            t = self.clock_ns()
            cum = float("nan")
            if self.energy is not None:
                try:
                    value = float(self.energy.read())
                except Exception as exc:  # a sensor that fails mid-run: keep the run, stop measuring energy
                    self._note(f"{self.energy.name}: stopped reading ({exc}); energy after this is missing")
                    self.energy = None
                else:
                    if self.energy.kind == "energy":
                        cum = value
                    else:   # watts: trapezoid between the last two samples
                        if self._last is not None:
                            t_prev, w_prev = self._last
                            self._cum_j += 0.5 * (w_prev + value) * (t - t_prev) * 1e-9
                        self._last = (t, value)
                        cum = self._cum_j
            rss = rss_bytes() or 0
            with self._lock:
                self._samples.append((t, cum, rss))

    # --- the summary -----------------------------------------------------------------------

    def _energy_method(self, energy_source, cum: np.ndarray) -> str:
        if energy_source is not None or not np.isnan(cum).all():
            return "measured"
        return "estimated" if self.estimate is not None else "none"

    def summary(self, include_samples: bool = True) -> dict:
        """Everything measured so far, JSON-ready (the `phases`, `memory` and `energy` of profile.json).
        Its size is bounded whatever the uptime (see the module doc), and every number is a plain
        Python int or float."""
        self.sample_now()   # so that the sampled span covers every window closed so far
        with self._lock:    # a consistent copy; the arithmetic runs outside the lock
            samples = self._samples.rows()
            all_spans = {name: spans.rows() for name, spans in self.spans.items()}
            notes, work, t0_ns = list(self.notes), dict(self.work), self.t0_ns
        energy_source = self.energy     # the sampler may drop a failing sensor meanwhile
        t_ns, cum, rss = samples[:, 0], samples[:, 1], samples[:, 2]
        valid = ~np.isnan(cum)
        method = self._energy_method(energy_source, cum)
        source = (f"{energy_source.name}: {energy_source.what}" if energy_source is not None
                  else f"estimate from device profile {self.estimate.profile}" if self.estimate else "none")

        phases = {}
        for name, spans in all_spans.items():
            skip = self.warmup_of(len(spans))
            kept = spans[skip:]
            seconds = (kept[:, 1] - kept[:, 0]) * 1e-9
            ms = seconds * 1e3
            phase = {"count": int(len(kept)), "warmup": skip,
                     "latency_ms": latency_stats(ms), "total_s": float(seconds.sum())}
            if include_samples:
                shown = ms[-SERIES_POINTS:]
                phase["samples_ms"] = [round(float(v), 6) for v in shown]
                phase["samples_ms_of"] = (f"the last {len(shown)} of {len(ms)} windows after warm-up"
                                          if len(shown) < len(ms) else "every window after warm-up")
            phase["energy_j"] = self._window_energy(work.get(name, (0.0, 0.0)), kept, t_ns[valid], cum[valid],
                                                    method, source)
            phases[name] = phase

        headline = phases.get("train_step") or (max(phases.values(), key=lambda p: p["count"]) if phases else None)
        headline_energy = headline["energy_j"] if headline else None
        energy = {"method": method, "backend": energy_source.name if energy_source is not None else
                  (f"estimate from profile {self.estimate.profile}" if self.estimate else "none"),
                  "what": energy_source.what if energy_source is not None else
                  ("idle power x time + FLOPs x pJ/FLOP + bytes x pJ/byte" if self.estimate else "nothing"),
                  "notes": notes,
                  # the median, like the step time beside it: a VM stall or a page-cache flush in
                  # a few windows should not set the figure for every step (the mean is per_window)
                  "per_step_j": headline_energy["per_window_p50"] if headline else None,
                  "per_step_aggregation": "median over train_step windows after warm-up",
                  "average_power_w": (headline_energy["total"] / headline_energy["seconds"]
                                      if headline and headline_energy["total"] is not None
                                      and headline_energy["seconds"] > 0 else None),
                  "timeline": self._power_timeline(t_ns[valid], cum[valid], t0_ns),
                  "timeline_aggregation": POWER_AGGREGATION}
        # The kernel's high-water mark (VmHWM) is folded from per-thread counters and can lag the
        # sampled VmRSS by 64 pages per thread (4 MiB with 16 threads, seen on a 16-core machine),
        # so the peak is the larger of the two: both are resident bytes that were really reached.
        highest = [v for v in (peak_rss_bytes(), int(rss.max()) if len(rss) else None) if v is not None]
        buckets = _buckets(len(t_ns))
        memory = {"peak_rss_bytes": max(highest, default=None),
                  "rss_bytes": rss_bytes(),
                  "timeline": {"t_s": [round((int(t_ns[b[-1]]) - t0_ns) * 1e-9, 4) for b in buckets],
                               "rss_bytes": [int(rss[b].max()) for b in buckets]},
                  "timeline_aggregation": MEMORY_AGGREGATION, "timeline_samples": int(len(t_ns)),
                  "runtime_growth_bytes": self.extra.get("runtime_growth_bytes"),
                  "onnxruntime_arena": "not exposed by onnxruntime's Python API; included in runtime_growth_bytes",
                  "gpu": self.gpu_memory() if self.gpu_memory else None}
        return {"phases": phases, "memory": memory, "energy": energy}

    def _window_energy(self, work, kept, t_ns, cum, method, source) -> dict:
        """Energy of the windows in `kept`: measured ones only inside the sampled span (the samples
        kept may cover less time than the windows kept on a device up for days); `windows` and
        `seconds` say which were counted."""
        out = {"per_window": None, "per_window_p50": None, "total": None, "windows": 0, "seconds": 0.0,
               "method": method, "source": source}
        if method == "measured":
            if len(t_ns) >= 2:
                kept = kept[(kept[:, 0] >= t_ns[0]) & (kept[:, 1] <= t_ns[-1])]
            else:
                kept = kept[:0]
            if not len(kept):
                out["method"], out["source"] = "none", "windows outside the sampled span"
                return out
            joules = np.interp(kept[:, 1], t_ns, cum) - np.interp(kept[:, 0], t_ns, cum)
        elif method == "estimated" and len(kept):
            joules = self.estimate.joules((kept[:, 1] - kept[:, 0]) * 1e-9, *work)   # per window, vectorized
        else:
            return out
        out["windows"], out["seconds"] = int(len(kept)), float((kept[:, 1] - kept[:, 0]).sum() * 1e-9)
        out["total"] = float(joules.sum())
        out["per_window"] = float(joules.mean())
        out["per_window_p50"] = float(np.median(joules))
        return out

    def _power_timeline(self, t_ns: np.ndarray, cum: np.ndarray, t0_ns: int) -> dict:
        """Mean power per bucket of consecutive samples (measured only); with few samples, a bucket
        is one interval between two samples."""
        if len(t_ns) < 2:
            return {"t_s": [], "power_w": []}
        # bucket edges: indices into the samples, first and last included
        edges = np.unique(np.linspace(0, len(t_ns) - 1, min(len(t_ns), SERIES_POINTS + 1)).round().astype(np.int64))
        dt = np.diff(t_ns[edges]) * 1e-9
        ok = dt > 0
        power = np.diff(cum[edges])[ok] / dt[ok]
        mid = ((t_ns[edges][1:] + t_ns[edges][:-1]) / 2)[ok]
        return {"t_s": [round((float(t) - t0_ns) * 1e-9, 4) for t in mid],
                "power_w": [round(float(w), 4) for w in power]}


def _buckets(n: int) -> list[np.ndarray]:
    """Indices 0..n-1 cut into at most SERIES_POINTS runs of consecutive indices, as equal as can be."""
    return [b for b in np.array_split(np.arange(n), min(n, SERIES_POINTS)) if len(b)] if n else []


def latency_stats(ms: np.ndarray) -> dict:
    """p50/p95/p99 (numpy's linear interpolation), mean, min and max of per-window milliseconds."""
    if not len(ms):
        return {"aggregation": LATENCY_AGGREGATION}
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(ms.mean()),
            "min": float(ms.min()), "max": float(ms.max()), "aggregation": LATENCY_AGGREGATION}
