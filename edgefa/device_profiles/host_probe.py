"""The host probe: copy bandwidth, the runtime's resident memory and onnxruntime's providers,
measured in a fresh python once per machine and kept in the user's cache directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

COPY_MIB = 256                          # size of each array in the host bandwidth measurement


# Run in a fresh python: its VmRSS right after the imports is the runtime overhead, and the copy
# that measures bandwidth allocates 2 x COPY_MIB there, never in the caller (whose peak RSS may be
# what is being profiled).
_HOST_PROBE = """
import json, sys, time, numpy, onnxruntime
rss = None
try:
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
except (OSError, StopIteration, ValueError):
    pass
n = int(sys.argv[1]) * 1024 * 1024 // 8
src = numpy.ones(n)
dst = numpy.zeros(n)
dst[:] = 1.0                                    # touch the pages before timing
best = float("inf")
for _ in range(3):
    start = time.perf_counter()
    numpy.copyto(dst, src)
    best = min(best, time.perf_counter() - start)
print(json.dumps({"vmrss_bytes": rss, "providers": onnxruntime.get_available_providers(),
                  "copy_gbps": 2 * n * 8 / max(best, 1e-9) / 1e9}))
"""
# onnxruntime's Azure provider calls a cloud endpoint; it computes nothing here.
NOT_COMPUTE_PROVIDERS = ("AzureExecutionProvider",)


@lru_cache(maxsize=None)
def measure_host(copy_mib: int, machine: tuple) -> tuple[float | None, int | None, tuple[str, ...] | None, str]:
    """(copy GB/s, runtime overhead bytes, onnxruntime providers, why the probe gave nothing).

    The probe takes seconds on a small VM (most of it the kernel handing over 512 MiB of pages),
    so its figures are kept per machine in the user's cache directory, keyed by what they depend
    on: `machine` (what identifies this host: CPU model, CPU count, memory size), python and
    onnxruntime. Delete the file to measure again."""
    cache = _probe_cache_path(copy_mib, machine)
    try:
        cached = json.loads(cache.read_text()) if cache else None
        if cached:
            return cached["copy_gbps"], cached["vmrss_bytes"], tuple(cached["providers"]) or None, ""
    except (OSError, ValueError, KeyError, TypeError):
        pass
    result = _run_probe(copy_mib)
    if cache and result[0] and result[1]:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"copy_gbps": result[0], "vmrss_bytes": result[1],
                                       "providers": list(result[2] or ())}))
            os.replace(tmp, cache)
        except OSError:
            pass     # a read-only home: measure again next time
    return result


def _probe_cache_path(copy_mib: int, machine: tuple) -> Path | None:
    import hashlib
    from importlib import metadata

    base = os.environ.get("EDGEFA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgefa")
    try:
        ort_version = metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:
        ort_version = "none"
    key = json.dumps([*machine, sys.version, sys.executable, ort_version, copy_mib])
    return Path(base) / f"host-probe-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _run_probe(copy_mib: int) -> tuple[float | None, int | None, tuple[str, ...] | None, str]:
    try:
        proc = subprocess.run([sys.executable, "-c", _HOST_PROBE, str(copy_mib)], capture_output=True,
                              text=True, timeout=120)
        result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        return None, None, None, f"probe failed: {exc}"
    if not result:
        return None, None, None, f"probe failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}"
    providers = tuple(p for p in result.get("providers") or () if p not in NOT_COMPUTE_PROVIDERS) or None
    rss = result.get("vmrss_bytes")
    return result.get("copy_gbps"), rss, providers, "" if rss else "VmRSS unavailable on this system"
