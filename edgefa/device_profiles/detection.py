"""Which board is this? `detect_profile()` matches the device tree's model against each profile,
guesses a Jetson from its L4T release, or fills in generic-x86.toml from what an x86-64 host shows
in /proc and /sys (and, unless told not to, measures with host_probe.py)."""

from __future__ import annotations

import math
import os
import platform
import re
from dataclasses import replace
from pathlib import Path

from . import host_probe
from .loading import list_profiles, load_profile
from .profile import GIB, MIB, DeviceProfile

GENERIC = "generic-x86"
DETECTED_SOURCE = f"detected on this host (defaults from {GENERIC}.toml)"


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
        copy_mib = host_probe.COPY_MIB          # read here, so that a test may make it small
        bandwidth, overhead, providers, note = host_probe.measure_host(copy_mib, _this_machine())
        if bandwidth:
            changes["memory_bandwidth_gbps"] = bandwidth
            detected["memory_bandwidth_gbps"] = (f"measured copy bandwidth, not a spec peak: numpy copy "
                                                 f"of {copy_mib} MiB into {copy_mib} MiB, best of 3, "
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


def _this_machine() -> tuple:
    """What identifies the host this runs on (whatever root detection reads): the probe's cache key."""
    cpus = _cpuinfo(Path("/"))
    return (cpus[0].get("model name") if cpus else platform.processor(), len(cpus), _meminfo_bytes(Path("/")))


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
