"""The shipped device profiles: one TOML file per device in data/, read into a DeviceProfile with
every field checked (a wrong one is one ProfileError line naming the file and the dotted field)."""

from __future__ import annotations

import math
import os
from importlib import resources
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:             # Python 3.10
    import tomli as tomllib

from .profile import GIB, KINDS, MIB, SENSOR_BACKENDS, DeviceProfile, ProfileError


def _data_dir():
    return resources.files(__package__) / "data"


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
