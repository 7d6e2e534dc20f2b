"""Device profiles as data: what a board can compute, move and draw, with a source for each figure.

Each supported device is one TOML file in `data/` (one per profile name), every figure carrying its
source in a comment: a data sheet, a developer guide, "derived: a x b", or "assumed: ...". This
module reads those files into a frozen `DeviceProfile`, and recognizes the board it runs on:

    load_profile("jetson-orin-nano-8gb")    a known name, or a path to a .toml of the same schema
    detect_profile()                         (profile, one-line reason it was chosen)

Detection matches /proc/device-tree/model against each profile's `model_contains` (the longest
match wins, so "Orin Nano" never becomes "AGX Orin"); failing that it guesses from the L4T
release in /etc/nv_tegra_release; on an x86-64 host it starts from generic-x86.toml and fills in
the CPU, memory and runtime figures it can read or measure, saying which in `detected`.

Device side: standard library and numpy only.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:             # Python 3.10
    import tomli as tomllib

from ..errors import EdgefaError

KINDS = ("jetson", "sbc", "host")
SENSOR_BACKENDS = ("ina3221-hwmon", "ina3221-iio", "tegrastats", "rapl", "nvml", "none")
GENERIC = "generic-x86"
DETECTED_SOURCE = f"detected on this host (defaults from {GENERIC}.toml)"
COPY_MIB = 256                          # size of each array in the host bandwidth measurement
GIB, MIB = 2 ** 30, 2 ** 20


class ProfileError(EdgefaError):
    """An unknown profile name, or a profile file that is unreadable or breaks the schema."""


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    display_name: str
    kind: str                                   # jetson | sbc | host
    cpu_name: str
    cpu_cores: int
    cpu_max_clock_ghz: float
    cpu_fp32_flops_per_cycle: float             # per core, at peak
    gpu_name: str | None
    gpu_fp32_tflops: float | None               # CUDA cores only, no tensor cores
    gpu_fp16_tflops: float | None
    memory_bytes: int
    memory_type: str
    memory_bandwidth_gbps: float                # GB/s, 1e9 bytes
    idle_power_w: float
    power_modes: tuple[dict, ...]               # {"id", "name", "budget_w"}, ids as nvpmodel -q prints
    pj_per_flop: float                          # for the ESTIMATED energy fallback only
    pj_per_dram_byte: float
    sensor_backend: str
    sensor_paths: tuple[str, ...]
    sensor_rails: tuple[str, ...]
    total_rail: str | None                      # None where no rail measures the module input
    providers: tuple[str, ...]                  # onnxruntime execution providers to expect
    runtime_overhead_bytes: int                 # python + numpy + onnxruntime (+ CUDA) before a model
    detect_model_contains: tuple[str, ...]
    source: str                                 # the file it came from, or DETECTED_SOURCE
    detected: dict = field(default_factory=dict)    # field -> how detection filled it ({} if not detected)
    cpu_llc_bytes: int | None = None            # last-level cache, where known
    detect_nv_tegra_release: tuple[str, ...] = ()   # L4T majors ("R35") the module runs, for guessing

    @property
    def cpu_peak_flops(self) -> float:
        """fp32 FLOP/s of all cores at peak: an upper bound, so a roofline is a lower bound on time."""
        return self.cpu_cores * self.cpu_max_clock_ghz * 1e9 * self.cpu_fp32_flops_per_cycle

    @property
    def gpu_peak_flops(self) -> float | None:
        """fp32 FLOP/s of the GPU's CUDA cores; None without a usable GPU."""
        return None if self.gpu_fp32_tflops is None else self.gpu_fp32_tflops * 1e12

    def as_dict(self) -> dict:
        """JSON-ready: tuples become lists, and the two peaks are included."""
        d = asdict(self)
        for key, value in d.items():
            if isinstance(value, tuple):
                d[key] = list(value)
        d["cpu_peak_flops"] = self.cpu_peak_flops
        d["gpu_peak_flops"] = self.gpu_peak_flops
        return d


# --- loading -----------------------------------------------------------------------------------

def _data_dir():
    return resources.files(__name__) / "data"


def list_profiles() -> list[str]:
    """Names of the profiles shipped with edgefa (the TOML file stems), sorted."""
    return sorted(p.name[:-len(".toml")] for p in _data_dir().iterdir() if p.name.endswith(".toml"))


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A shipped profile by name, or any .toml file of the same schema by path.

    "generic-x86" gives the file's defaults; `detect_profile` is what fills them in for a host.
    """
    text = str(name_or_path)
    known = list_profiles()
    if text in known:
        resource = _data_dir() / f"{text}.toml"
        return _parse(resource.read_bytes(), f"{text}.toml")
    path = Path(text).expanduser()
    if text.endswith(".toml") or os.sep in text or "/" in text:
        if not path.is_file():
            raise ProfileError(f"device profile file {path} does not exist (or is not a file)")
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ProfileError(f"device profile file {path} cannot be read: {exc.strerror or exc}") from None
        return _parse(raw, str(path))
    raise ProfileError(f"unknown device profile {text!r}; known profiles: {', '.join(known)} "
                       f"(or give a path to a .toml file)")


class _Reader:
    """Typed access to one TOML document; every error names the file and the dotted field."""

    def __init__(self, doc: dict, source: str):
        self.doc, self.source = doc, source

    def fail(self, where: str, problem: str):
        raise ProfileError(f"device profile {self.source}: field '{where}' {problem}")

    def table(self, name: str, optional: bool = False) -> dict | None:
        value = self.doc.get(name)
        if value is None:
            if optional:
                return None
            self.fail(name, "is missing (a [table] is required)")
        if not isinstance(value, dict):
            self.fail(name, "must be a [table]")
        return value

    def get(self, table: dict, prefix: str, key: str, kind: str, optional: bool = False):
        where = f"{prefix}.{key}" if prefix else key
        if key not in table:
            if optional:
                return None
            self.fail(where, "is missing")
        value = table[key]
        if kind == "str":
            if not isinstance(value, str) or not value.strip():
                self.fail(where, f"must be a non-empty string, got {value!r}")
            return value
        if kind == "strs":
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                self.fail(where, f"must be a list of strings, got {value!r}")
            return tuple(value)
        if kind in ("int", "number"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.fail(where, f"must be a number, got {value!r}")
            if kind == "int" and not isinstance(value, int):
                self.fail(where, f"must be a whole number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                self.fail(where, f"must be positive and finite, got {value!r}")
            return value
        raise AssertionError(kind)


def _parse(raw: bytes, source: str) -> DeviceProfile:
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(f"device profile {source}: not valid TOML ({exc})") from None
    r = _Reader(doc, source)

    name = r.get(doc, "", "name", "str")
    kind = r.get(doc, "", "kind", "str")
    if kind not in KINDS:
        r.fail("kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    detect, cpu, memory = r.table("detect"), r.table("cpu"), r.table("memory")
    power, energy = r.table("power"), r.table("energy_model")
    sensors, runtime = r.table("sensors"), r.table("runtime")
    gpu = r.table("gpu", optional=True)

    backend = r.get(sensors, "sensors", "backend", "str")
    if backend not in SENSOR_BACKENDS:
        r.fail("sensors.backend", f"must be one of {', '.join(SENSOR_BACKENDS)}, got {backend!r}")
    rails = r.get(sensors, "sensors", "rails", "strs")
    total_rail = r.get(sensors, "sensors", "total_rail", "str", optional=True)
    if total_rail is not None and total_rail not in rails:
        r.fail("sensors.total_rail", f"must be one of sensors.rails, got {total_rail!r}")

    gpu_fields = (None, None, None)
    if gpu is not None:
        gpu_fields = (r.get(gpu, "gpu", "name", "str"),
                      float(r.get(gpu, "gpu", "fp32_tflops", "number")),
                      float(r.get(gpu, "gpu", "fp16_tflops", "number")))
    llc_mib = r.get(cpu, "cpu", "last_level_cache_mib", "number", optional=True)

    return DeviceProfile(
        name=name,
        display_name=r.get(doc, "", "display_name", "str"),
        kind=kind,
        cpu_name=r.get(cpu, "cpu", "name", "str"),
        cpu_cores=r.get(cpu, "cpu", "cores", "int"),
        cpu_max_clock_ghz=float(r.get(cpu, "cpu", "max_clock_ghz", "number")),
        cpu_fp32_flops_per_cycle=float(r.get(cpu, "cpu", "fp32_flops_per_cycle", "number")),
        gpu_name=gpu_fields[0], gpu_fp32_tflops=gpu_fields[1], gpu_fp16_tflops=gpu_fields[2],
        memory_bytes=int(r.get(memory, "memory", "size_gib", "number") * GIB),
        memory_type=r.get(memory, "memory", "type", "str"),
        memory_bandwidth_gbps=float(r.get(memory, "memory", "bandwidth_gbps", "number")),
        idle_power_w=float(r.get(power, "power", "idle_w", "number")),
        power_modes=_power_modes(r, power),
        pj_per_flop=float(r.get(energy, "energy_model", "pj_per_flop", "number")),
        pj_per_dram_byte=float(r.get(energy, "energy_model", "pj_per_dram_byte", "number")),
        sensor_backend=backend,
        sensor_paths=r.get(sensors, "sensors", "paths", "strs"),
        sensor_rails=rails,
        total_rail=total_rail,
        providers=r.get(runtime, "runtime", "providers", "strs"),
        runtime_overhead_bytes=int(r.get(runtime, "runtime", "overhead_mib", "number") * MIB),
        detect_model_contains=r.get(detect, "detect", "model_contains", "strs"),
        source=source,
        detected={},
        cpu_llc_bytes=None if llc_mib is None else int(llc_mib * MIB),
        detect_nv_tegra_release=r.get(detect, "detect", "nv_tegra_release", "strs", optional=True) or (),
    )


def _power_modes(r: _Reader, power: dict) -> tuple[dict, ...]:
    modes = power.get("modes")
    if modes is None:
        r.fail("power.modes", "is missing (use [] where there is no nvpmodel)")
    if not isinstance(modes, list) or not all(isinstance(m, dict) for m in modes):
        r.fail("power.modes", "must be a list of { id, name, budget_w } tables")
    out = []
    for i, mode in enumerate(modes):
        where = f"power.modes[{i}]"
        mode_id = mode.get("id")
        if isinstance(mode_id, bool) or not isinstance(mode_id, int) or mode_id < 0:
            r.fail(f"{where}.id", f"must be a whole number >= 0, got {mode_id!r}")
        out.append({"id": mode_id, "name": r.get(mode, where, "name", "str"),
                    "budget_w": float(r.get(mode, where, "budget_w", "number"))})
    return tuple(out)


# --- detection ---------------------------------------------------------------------------------

def detect_profile(root: str | Path = "/", *, machine: str | None = None,
                   measure: bool = True) -> tuple[DeviceProfile, str]:
    """The profile of the machine under `root`, and one line saying how it was recognized.

    `machine` overrides platform.machine() (for tests); `measure=False` skips the host
    measurements (copy bandwidth, runtime overhead) and keeps the generic defaults for them.
    """
    root = Path(root)
    profiles = [load_profile(n) for n in list_profiles()]

    model = _device_tree_model(root)
    if model:
        match = _match_model(model, profiles)
        if match:
            profile, needle = match
            return profile, f"device-tree model {model!r} contains {needle!r}"

    release = _read_text(root / "etc/nv_tegra_release")
    if release:
        return _guess_from_l4t(release, model, root, profiles)

    machine = machine or platform.machine()
    if machine.lower() in ("x86_64", "amd64"):
        profile = _detect_host(root, measure)
        return profile, f"x86-64 host ({machine}): {GENERIC} defaults filled in by detection"
    seen = f"device-tree model {model!r}" if model else "no device-tree model"
    return (load_profile(GENERIC),
            f"unknown machine {machine!r} ({seen}, no /etc/nv_tegra_release): "
            f"falling back to the undetected {GENERIC} defaults")


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return None


def _device_tree_model(root: Path) -> str | None:
    """The board model string (NUL-terminated in the device tree), or None."""
    for rel in ("proc/device-tree/model", "sys/firmware/devicetree/base/model"):
        text = _read_text(root / rel)
        if text is not None:
            text = text.split("\0", 1)[0].strip()
            if text:
                return text
    return None


def _match_model(model: str, profiles: list[DeviceProfile]) -> tuple[DeviceProfile, str] | None:
    """The profile whose longest `model_contains` substring occurs in the model (case-insensitive)."""
    best = None
    for profile in profiles:
        for needle in profile.detect_model_contains:
            if needle.lower() in model.lower() and (best is None or len(needle) > len(best[1])):
                best = (profile, needle)
    return best


_L4T = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([0-9.]+)")


def _guess_from_l4t(release: str, model: str | None, root: Path,
                    profiles: list[DeviceProfile]) -> tuple[DeviceProfile, str]:
    """Best guess among the Jetsons whose TOML lists this L4T major release.

    The closest memory size to MemTotal wins; on a tie (or without MemTotal) the newer module
    family wins, i.e. the one whose hints reach the higher release.
    """
    m = _L4T.search(release)
    major = f"R{m[1]}" if m else None
    label = f"{major} (REVISION {m[2]})" if m else "an unrecognized release line"
    hints = {p.name: p.detect_nv_tegra_release for p in profiles}
    candidates = [p for p in profiles if major and major in hints[p.name]]
    if not candidates:          # a newer L4T than any hint: Orin-class is the best bet
        newest = max((max(h, key=_release_number) for h in hints.values() if h), key=_release_number)
        candidates = [p for p in profiles if newest in hints[p.name]]
    mem_total = _meminfo_bytes(root)

    def score(p: DeviceProfile):
        gap = abs(p.memory_bytes - mem_total) if mem_total else 0
        return (gap, -max(_release_number(h) for h in hints[p.name]))

    choice = min(candidates, key=score)
    why = f"device-tree model {model!r} matches no profile" if model else "no device-tree model"
    mem = f", MemTotal {mem_total / GIB:.1f} GiB" if mem_total else ""
    return choice, (f"a guess: {why}; /etc/nv_tegra_release says L4T {label}{mem}; "
                    f"candidates {', '.join(p.name for p in candidates)}")


def _release_number(release: str) -> int:
    return int(release.lstrip("Rr") or 0)


def _meminfo_bytes(root: Path) -> int | None:
    text = _read_text(root / "proc/meminfo") or ""
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(m[1]) * 1024 if m else None


# --- the x86-64 host ---------------------------------------------------------------------------

def _detect_host(root: Path, measure: bool) -> DeviceProfile:
    """generic-x86.toml with the figures this host shows filled in; `detected` says which and how."""
    base = load_profile(GENERIC)
    changes, detected = {}, {}
    cpus = _cpuinfo(root)
    first = cpus[0] if cpus else {}

    if first.get("model name"):
        changes["cpu_name"] = first["model name"]
        changes["display_name"] = f"{first['model name']} host"
        detected["cpu_name"] = "proc/cpuinfo: model name"

    physical = {(c.get("physical id", "0"), c["core id"]) for c in cpus if "core id" in c}
    if physical:
        changes["cpu_cores"] = len(physical)
        detected["cpu_cores"] = (f"proc/cpuinfo: {len(physical)} physical cores "
                                 f"({len(cpus)} logical CPUs; SMT threads share the FMA pipes)")
    elif cpus:
        changes["cpu_cores"] = len(cpus)
        detected["cpu_cores"] = f"proc/cpuinfo: {len(cpus)} processors"
    elif os.cpu_count():
        changes["cpu_cores"] = os.cpu_count()
        detected["cpu_cores"] = f"os.cpu_count(): {os.cpu_count()}"

    clock = _max_clock_ghz(root, cpus)
    if clock:
        changes["cpu_max_clock_ghz"], detected["cpu_max_clock_ghz"] = clock

    flags = set(first.get("flags", "").split())
    if flags:
        per_cycle, why = _flops_per_cycle(flags)
        changes["cpu_fp32_flops_per_cycle"] = per_cycle
        detected["cpu_fp32_flops_per_cycle"] = f"proc/cpuinfo flags: {why}"

    mem_total = _meminfo_bytes(root)
    if mem_total:
        changes["memory_bytes"] = mem_total
        detected["memory_bytes"] = "proc/meminfo: MemTotal"
    changes["memory_type"] = "host DRAM (type not detected)"

    llc = _parse_size(_read_text(root / "sys/devices/system/cpu/cpu0/cache/index3/size"))
    if llc:
        changes["cpu_llc_bytes"] = llc
        detected["cpu_llc_bytes"] = "sys/devices/system/cpu/cpu0/cache/index3/size"

    if measure:
        bandwidth, overhead, providers, note = _measure_host(COPY_MIB)
        if bandwidth:
            changes["memory_bandwidth_gbps"] = bandwidth
            detected["memory_bandwidth_gbps"] = (f"measured copy bandwidth, not a spec peak: numpy copy "
                                                 f"of {COPY_MIB} MiB into {COPY_MIB} MiB, best of 3, "
                                                 f"bytes read + written / time, in a probe process (once per machine, "
                                                 f"kept in the user's cache directory)")
        else:
            detected["memory_bandwidth_gbps"] = f"default from {GENERIC}.toml ({note})"
        if overhead:
            changes["runtime_overhead_bytes"] = overhead
            detected["runtime_overhead_bytes"] = ("measured: VmRSS of a fresh python after "
                                                  "`import numpy, onnxruntime`")
        else:
            detected["runtime_overhead_bytes"] = f"default from {GENERIC}.toml ({note})"
        if providers:
            changes["providers"] = providers
            detected["providers"] = "measured: onnxruntime.get_available_providers() in that python"
    else:
        detected["memory_bandwidth_gbps"] = f"default from {GENERIC}.toml (not measured)"
        detected["runtime_overhead_bytes"] = f"default from {GENERIC}.toml (not measured)"

    return replace(base, **changes, source=DETECTED_SOURCE, detected=detected)


def _cpuinfo(root: Path) -> list[dict[str, str]]:
    """One dict per logical CPU ("processor" block) of /proc/cpuinfo."""
    blocks, current = [], {}
    for line in (_read_text(root / "proc/cpuinfo") or "").splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
            current = {}
            continue
        key, _, value = line.partition(":")
        current[key.strip()] = value.strip()
    if current:
        blocks.append(current)
    return [b for b in blocks if "processor" in b]


def _max_clock_ghz(root: Path, cpus: list[dict[str, str]]) -> tuple[float, str] | None:
    """Max CPU clock from cpufreq (kHz), else the highest "cpu MHz", else the model name's "@ x GHz"."""
    khz = (_read_text(root / "sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") or "").strip()
    if khz.isdigit() and int(khz) > 0:
        return int(khz) / 1e6, "sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq"
    mhz = [float(c["cpu MHz"]) for c in cpus if _is_number(c.get("cpu MHz"))]
    if mhz and max(mhz) > 0:
        return max(mhz) / 1e3, "proc/cpuinfo: highest 'cpu MHz' (a current clock, may be below turbo)"
    m = re.search(r"@\s*([0-9.]+)\s*GHz", cpus[0].get("model name", "") if cpus else "")
    if m and _is_number(m[1]):
        return float(m[1]), "proc/cpuinfo: model name '@ x GHz' (the base clock)"
    return None


def _flops_per_cycle(flags: set[str]) -> tuple[float, str]:
    """fp32 FLOPs per core per cycle, assuming two FMA (or add + mul) pipes: an upper bound,
    which keeps a roofline a lower bound on time."""
    if "avx512f" in flags:
        return 64.0, "avx512f: 2 pipes x 16 lanes x 2 (FMA) = 64 (two 512-bit FMA units assumed)"
    if "avx2" in flags and "fma" in flags:
        return 32.0, "avx2+fma: 2 pipes x 8 lanes x 2 (FMA) = 32 (two FMA units assumed)"
    if "avx" in flags:
        return 16.0, "avx: 8-lane add + 8-lane mul per cycle = 16"
    return 8.0, "sse: 4-lane add + 4-lane mul per cycle = 8"


def _is_number(text: str | None) -> bool:
    try:
        return text is not None and math.isfinite(float(text))
    except ValueError:
        return False


def _parse_size(text: str | None) -> int | None:
    """A sysfs cache size such as "32768K" or "32M", in bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)\s*", text or "")
    if not m:
        return None
    return int(m[1]) * {"": 1, "K": 1024, "M": MIB, "G": GIB}[m[2]] or None


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
def _measure_host(copy_mib: int) -> tuple[float | None, int | None, tuple[str, ...] | None, str]:
    """(copy GB/s, runtime overhead bytes, onnxruntime providers, why the probe gave nothing).

    The probe takes seconds on a small VM (most of it the kernel handing over 512 MiB of pages),
    so its figures are kept per machine in the user's cache directory, keyed by what they depend
    on: CPU model, memory size, python and onnxruntime. Delete the file to measure again."""
    cache = _probe_cache_path(copy_mib)
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


def _probe_cache_path(copy_mib: int) -> Path | None:
    import hashlib
    from importlib import metadata

    base = os.environ.get("EDGEFA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgefa")
    try:
        ort_version = metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:
        ort_version = "none"
    cpus = _cpuinfo(Path("/"))
    key = json.dumps([cpus[0].get("model name") if cpus else platform.processor(), len(cpus),
                      _meminfo_bytes(Path("/")), sys.version, sys.executable, ort_version, copy_mib])
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


