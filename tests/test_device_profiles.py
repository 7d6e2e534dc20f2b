"""Device profiles: every TOML loads and sources its figures, the figures agree with each other,
detection recognizes each board from a fake root, and broken files fail with one clear line."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest

import edgefa.device_profiles as dp
from edgefa.device_profiles import host_probe
from edgefa.device_profiles import (DETECTED_SOURCE, DeviceProfile, ProfileError, detect_profile,
                                    list_profiles, load_profile)
from edgefa.errors import EdgefaError

DATA = Path(dp.__file__).parent / "data"
EXPECTED = {"jetson-nano-4gb", "jetson-xavier-nx", "jetson-orin-nano-8gb", "jetson-agx-orin-64gb",
            "raspberry-pi-5", "generic-x86"}
JETSONS = ["jetson-nano-4gb", "jetson-xavier-nx", "jetson-orin-nano-8gb", "jetson-agx-orin-64gb"]
NUMERIC = ["cpu_cores", "cpu_max_clock_ghz", "cpu_fp32_flops_per_cycle", "memory_bytes",
           "memory_bandwidth_gbps", "idle_power_w", "pj_per_flop", "pj_per_dram_byte",
           "runtime_overhead_bytes"]
SOURCE_WORDS = ("data sheet", "derived", "assumed", "guide", "http", "measured", "[", "horowitz")


def _profiles() -> list[DeviceProfile]:
    return [load_profile(name) for name in list_profiles()]


# --- the files ---------------------------------------------------------------------------------

def test_the_shipped_profiles_are_exactly_the_six_devices():
    assert set(list_profiles()) == EXPECTED
    assert sorted(p.stem for p in DATA.glob("*.toml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_profile_loads_with_positive_finite_figures(name):
    p = load_profile(name)
    assert p.name == name and p.source == f"{name}.toml" and p.detected == {}
    for attr in NUMERIC:
        value = getattr(p, attr)
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (attr, value)
    for attr in ("gpu_fp32_tflops", "gpu_fp16_tflops", "cpu_llc_bytes"):
        value = getattr(p, attr)
        assert value is None or (math.isfinite(value) and value > 0), (attr, value)
    for mode in p.power_modes:
        assert set(mode) == {"id", "name", "budget_w"}
        assert mode["budget_w"] > 0 and math.isfinite(mode["budget_w"])
    assert p.cpu_peak_flops > 0
    assert json.loads(json.dumps(p.as_dict()))["name"] == name


@pytest.mark.parametrize("path", sorted(DATA.glob("*.toml")), ids=lambda p: p.stem)
def test_every_figure_line_names_its_source(path):
    """Every `key = number` line (and every power-mode list) in a figures table carries a comment
    saying where the number comes from."""
    figure_tables = {"cpu", "gpu", "memory", "power", "energy_model", "runtime"}
    table, checked, missing = "", 0, []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        header = re.match(r"\s*\[([A-Za-z_]+)\]", line)
        if header:
            table = header[1]
            continue
        if table not in figure_tables:
            continue
        if re.match(r"\s*\w+\s*=\s*[-+]?(\d|\.\d|inf|nan)", line) or re.match(r"\s*modes\s*=", line):
            checked += 1
            comment = line.partition("#")[2].strip().lower()
            if len(comment) < 8 or not any(w in comment for w in SOURCE_WORDS):
                missing.append(f"{path.name}:{lineno}: {line.strip()}")
    assert checked >= 10, f"{path.name}: only {checked} figure lines found"
    assert not missing, "figures without a source comment:\n" + "\n".join(missing)


# --- cross-checks from the data ----------------------------------------------------------------

def test_gpu_figures_agree_with_each_other():
    for p in _profiles():
        if p.kind == "jetson":
            assert p.gpu_name and p.gpu_fp32_tflops and p.gpu_fp16_tflops, p.name
            assert p.gpu_fp16_tflops >= p.gpu_fp32_tflops, p.name
            assert p.gpu_peak_flops == pytest.approx(p.gpu_fp32_tflops * 1e12)
        else:
            assert (p.gpu_name, p.gpu_fp32_tflops, p.gpu_fp16_tflops, p.gpu_peak_flops) == (None,) * 4
    # fp32 = CUDA cores x 2 (FMA) x clock, as the files derive it
    assert load_profile("jetson-orin-nano-8gb").gpu_peak_flops == pytest.approx(1024 * 2 * 0.625e9)
    assert load_profile("jetson-agx-orin-64gb").gpu_peak_flops == pytest.approx(2048 * 2 * 1.3e9, rel=1e-3)
    assert load_profile("jetson-xavier-nx").gpu_peak_flops == pytest.approx(384 * 2 * 1.1e9, rel=1e-3)
    assert load_profile("jetson-nano-4gb").gpu_peak_flops == pytest.approx(128 * 2 * 0.9216e9, rel=1e-3)


def test_cpu_peaks_and_memory_order():
    nano = load_profile("jetson-nano-4gb")
    assert nano.cpu_peak_flops == pytest.approx(4 * 1.43e9 * 8)
    assert load_profile("raspberry-pi-5").cpu_peak_flops == pytest.approx(4 * 2.4e9 * 16)
    bandwidth = [load_profile(n).memory_bandwidth_gbps for n in JETSONS]
    assert bandwidth == sorted(bandwidth)                       # each Jetson generation moves more
    assert load_profile("jetson-agx-orin-64gb").memory_bandwidth_gbps == pytest.approx(256 / 8 * 6.4)
    assert load_profile("raspberry-pi-5").memory_bandwidth_gbps == pytest.approx(32 / 8 * 4.267, rel=1e-2)
    assert load_profile("jetson-agx-orin-64gb").memory_bytes == 64 * 2 ** 30


def test_power_rails_and_modes():
    assert load_profile("jetson-nano-4gb").total_rail == "POM_5V_IN"
    assert load_profile("jetson-xavier-nx").total_rail == "VDD_IN"
    assert load_profile("jetson-orin-nano-8gb").total_rail == "VDD_IN"
    agx = load_profile("jetson-agx-orin-64gb")
    assert agx.total_rail is None and "VDD_IN" not in agx.sensor_rails      # no input-rail sensor
    assert len(agx.sensor_paths) == 2 and {"1-0040", "1-0041"} <= {p.split("/")[-3] for p in agx.sensor_paths}
    for p in _profiles():
        assert p.total_rail is None or p.total_rail in p.sensor_rails
        if p.sensor_backend == "ina3221-iio":
            assert all("iio:device" in path for path in p.sensor_paths)
        if p.sensor_backend == "ina3221-hwmon":
            assert all("/hwmon/" in path for path in p.sensor_paths)
        if p.kind == "jetson":
            ids = [m["id"] for m in p.power_modes]
            assert ids and len(ids) == len(set(ids)) and 0 in ids, p.name
            assert all(m["budget_w"] > p.idle_power_w for m in p.power_modes), p.name
        assert p.providers[-1] == "CPUExecutionProvider"
    pi = load_profile("raspberry-pi-5")
    assert (pi.sensor_backend, pi.sensor_paths, pi.sensor_rails, pi.providers) == \
        ("none", (), (), ("CPUExecutionProvider",))
    assert "CUDAExecutionProvider" in load_profile("jetson-orin-nano-8gb").providers


def test_generic_x86_by_name_is_the_undetected_defaults():
    p = load_profile("generic-x86")
    assert (p.kind, p.source, p.detected, p.detect_model_contains) == ("host", "generic-x86.toml", {}, ())


# --- detection from a fake root ----------------------------------------------------------------

def _write(root: Path, rel: str, text: str | bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


@pytest.mark.parametrize("model, expected", [
    ("NVIDIA Jetson Nano Developer Kit", "jetson-nano-4gb"),
    ("NVIDIA Jetson Xavier NX Developer Kit", "jetson-xavier-nx"),
    ("NVIDIA Jetson Orin Nano Developer Kit", "jetson-orin-nano-8gb"),
    ("Jetson AGX Orin Developer Kit", "jetson-agx-orin-64gb"),
    ("NVIDIA Jetson AGX Orin Developer Kit", "jetson-agx-orin-64gb"),
    ("Raspberry Pi 5 Model B Rev 1.0", "raspberry-pi-5"),
])
def test_detect_recognizes_each_board_from_its_device_tree_model(tmp_path, model, expected):
    _write(tmp_path, "proc/device-tree/model", model.encode() + b"\0")
    profile, reason = detect_profile(tmp_path, machine="aarch64")
    assert profile.name == expected, reason
    assert repr(model) in reason and profile.source == f"{expected}.toml"


def test_detect_reads_the_sysfs_copy_of_the_model_too(tmp_path):
    _write(tmp_path, "sys/firmware/devicetree/base/model", b"NVIDIA Jetson Orin Nano Developer Kit\0")
    assert detect_profile(tmp_path, machine="aarch64")[0].name == "jetson-orin-nano-8gb"


@pytest.mark.parametrize("release, mem_kb, expected", [
    ("# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64, DATE: Sat Feb 19 17:05:08 UTC 2022",
     4051104, "jetson-nano-4gb"),
    ("# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t186ref, EABI: aarch64, DATE: Sat Feb 19 17:07:09 UTC 2022",
     7999452, "jetson-xavier-nx"),
    ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 19:57:35 UTC 2023",
     7471952, "jetson-orin-nano-8gb"),
    ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025",
     64335836, "jetson-agx-orin-64gb"),
])
def test_without_a_model_the_l4t_release_gives_a_labelled_guess(tmp_path, release, mem_kb, expected):
    _write(tmp_path, "etc/nv_tegra_release", release + "\n")
    _write(tmp_path, "proc/meminfo", f"MemTotal:       {mem_kb} kB\nMemFree:         1000 kB\n")
    profile, reason = detect_profile(tmp_path, machine="aarch64")
    assert profile.name == expected, reason
    major = release.split()[1]
    assert "guess" in reason and f"L4T {major}" in reason and "no device-tree model" in reason


def test_an_unknown_model_on_a_jetson_still_guesses_and_says_which_model(tmp_path):
    _write(tmp_path, "proc/device-tree/model", b"NVIDIA Jetson Orin NX Engineering Reference Developer Kit\0")
    _write(tmp_path, "etc/nv_tegra_release", "# R36 (release), REVISION: 4.0, GCID: 1, BOARD: generic\n")
    profile, reason = detect_profile(tmp_path, machine="aarch64")
    assert profile.name in ("jetson-orin-nano-8gb", "jetson-agx-orin-64gb")
    assert "guess" in reason and "Orin NX" in reason and "R36" in reason


def test_an_unknown_machine_falls_back_to_the_undetected_defaults(tmp_path):
    profile, reason = detect_profile(tmp_path, machine="aarch64")
    assert profile == load_profile("generic-x86")
    assert "unknown machine 'aarch64'" in reason and profile.detected == {}


_CPUINFO = """\
processor\t: {n}
vendor_id\t: GenuineIntel
model name\t: Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz
cpu MHz\t\t: {mhz}
physical id\t: 0
core id\t\t: {core}
flags\t\t: fpu sse sse2 avx avx2 fma f16c

"""


def _fake_host(root: Path, *, cpufreq: bool = True, mhz: str = "800.000") -> None:
    # 4 logical CPUs on 2 physical cores (SMT)
    _write(root, "proc/cpuinfo", "".join(_CPUINFO.format(n=n, core=n // 2, mhz=mhz) for n in range(4)))
    _write(root, "proc/meminfo", "MemTotal:       32768000 kB\nMemAvailable:   1 kB\n")
    _write(root, "sys/devices/system/cpu/cpu0/cache/index3/size", "12288K\n")
    if cpufreq:
        _write(root, "sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq", "4600000\n")


def test_x86_host_detection_fills_the_defaults_from_the_root(tmp_path):
    _fake_host(tmp_path)
    profile, reason = detect_profile(tmp_path, machine="x86_64", measure=False)
    assert "x86-64 host" in reason
    assert profile.name == "generic-x86" and profile.source == DETECTED_SOURCE
    assert profile.cpu_name == "Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz"
    assert profile.cpu_cores == 2                                  # physical cores, not SMT threads
    assert profile.cpu_max_clock_ghz == pytest.approx(4.6)         # cpufreq kHz
    assert profile.cpu_fp32_flops_per_cycle == 32                  # avx2 + fma
    assert profile.cpu_peak_flops == pytest.approx(2 * 4.6e9 * 32)
    assert profile.memory_bytes == 32768000 * 1024
    assert profile.cpu_llc_bytes == 12288 * 1024
    defaults = load_profile("generic-x86")
    assert profile.memory_bandwidth_gbps == defaults.memory_bandwidth_gbps      # not measured
    assert profile.runtime_overhead_bytes == defaults.runtime_overhead_bytes
    assert "cpuinfo_max_freq" in profile.detected["cpu_max_clock_ghz"]
    assert "not measured" in profile.detected["memory_bandwidth_gbps"]
    assert {"cpu_cores", "cpu_fp32_flops_per_cycle", "memory_bytes", "cpu_llc_bytes"} <= set(profile.detected)
    assert json.loads(json.dumps(profile.as_dict()))["detected"] == profile.detected


def test_x86_clock_falls_back_to_cpu_mhz_then_to_the_model_name(tmp_path):
    _fake_host(tmp_path, cpufreq=False, mhz="3900.125")
    profile, _ = detect_profile(tmp_path, machine="AMD64", measure=False)
    assert profile.cpu_max_clock_ghz == pytest.approx(3.900125)
    assert "cpu MHz" in profile.detected["cpu_max_clock_ghz"]

    _fake_host(tmp_path / "b", cpufreq=False, mhz="unknown")
    profile, _ = detect_profile(tmp_path / "b", machine="x86_64", measure=False)
    assert profile.cpu_max_clock_ghz == pytest.approx(3.2)
    assert "model name" in profile.detected["cpu_max_clock_ghz"]


@pytest.mark.parametrize("flags, expected", [("avx512f avx2 fma avx", 64), ("avx2 fma avx", 32),
                                             ("avx sse2", 16), ("sse sse2", 8)])
def test_flops_per_cycle_follow_the_widest_simd_flags(tmp_path, flags, expected):
    _write(tmp_path, "proc/cpuinfo", f"processor\t: 0\nflags\t\t: {flags}\n\n")
    assert detect_profile(tmp_path, machine="x86_64", measure=False)[0].cpu_fp32_flops_per_cycle == expected


def test_host_measurements_are_labelled_and_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(host_probe, "COPY_MIB", 8)                 # small arrays keep the test quick
    _fake_host(tmp_path)
    profile, _ = detect_profile(tmp_path, machine="x86_64")
    assert profile.memory_bandwidth_gbps > 0
    assert profile.detected["memory_bandwidth_gbps"].startswith("measured copy bandwidth, not a spec peak")
    assert profile.runtime_overhead_bytes > 10 * 2 ** 20     # python + numpy + onnxruntime
    assert profile.detected["runtime_overhead_bytes"].startswith("measured")
    assert "CPUExecutionProvider" in profile.providers
    start = time.perf_counter()
    again, _ = detect_profile(tmp_path, machine="x86_64")
    assert time.perf_counter() - start < 0.5                # measured once per process
    assert again.memory_bandwidth_gbps == profile.memory_bandwidth_gbps


# --- errors ------------------------------------------------------------------------------------

def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(ProfileError) as err:
        load_profile("jetson-tx2")
    message = str(err.value)
    assert isinstance(err.value, EdgefaError) and "\n" not in message
    assert "'jetson-tx2'" in message and all(name in message for name in EXPECTED)


def test_a_profile_loads_from_a_path(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text((DATA / "raspberry-pi-5.toml").read_text().replace('name = "raspberry-pi-5"',
                                                                        'name = "my-pi"'))
    p = load_profile(str(path))
    assert p.name == "my-pi" and p.source == str(path)


@pytest.mark.parametrize("edit, fragments", [
    (lambda t: re.sub(r"(?m)^cores = .*\n", "", t), ["'cpu.cores'", "missing"]),
    (lambda t: re.sub(r"(?m)^bandwidth_gbps = .*$", 'bandwidth_gbps = "fast"', t),
     ["'memory.bandwidth_gbps'", "must be a number", "'fast'"]),
    (lambda t: re.sub(r"(?m)^idle_w = .*$", "idle_w = -1", t), ["'power.idle_w'", "positive"]),
    (lambda t: re.sub(r"(?m)^cores = .*$", "cores = 4.5", t), ["'cpu.cores'", "whole number"]),
    (lambda t: re.sub(r"(?m)^total_rail = .*$", 'total_rail = "VDD_NOPE"', t), ["'sensors.total_rail'"]),
    (lambda t: re.sub(r"(?m)^backend = .*$", 'backend = "magic"', t), ["'sensors.backend'", "magic"]),
    (lambda t: re.sub(r"(?ms)^\[energy_model\].*?(?=^\[sensors\])", "", t), ["'energy_model'", "missing"]),
    (lambda t: t.replace("budget_w = 15 }", 'budget_w = "x" }', 1), ["'power.modes[0].budget_w'"]),
    (lambda t: t + "\n[cpu\n", ["not valid TOML"]),
])
def test_a_broken_profile_names_the_file_and_the_field(tmp_path, edit, fragments):
    path = tmp_path / "broken.toml"
    path.write_text(edit((DATA / "jetson-orin-nano-8gb.toml").read_text()))
    with pytest.raises(ProfileError) as err:
        load_profile(str(path))
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(str(tmp_path / "nope.toml"))
