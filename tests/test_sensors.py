"""Energy sensors against files in the real sysfs layout under a temporary root, and a real
`tegrastats` subprocess (a small script printing lines captured on Jetsons)."""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest
from test_tegrastats import AGX_ORIN_JP5, NANO_JP4, ORIN_NANO_JP6

from edgefa.profiling.sensors import DEFAULT_ORDER, SensorError, Tegrastats, open_energy_source

I2C = "sys/devices/platform/bus@0/c240000.i2c/i2c-1"


def write(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{value}\n")
    return path


def link_driver(root: Path, driver: str, device: Path) -> None:
    """/sys/bus/i2c/drivers/<driver>/<chip> is a relative symlink to the device, as on a Jetson."""
    entry = root / "sys/bus/i2c/drivers" / driver / device.name
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.symlink_to(os.path.relpath(device, entry.parent))


def hwmon_chip(root: Path, chip: str, channels: dict[int, tuple[str, int, int]]) -> Path:
    """An INA3221 under hwmon (JetPack 5/6): channel N -> (label, bus mV, mA)."""
    device = root / I2C / chip
    folder = device / "hwmon" / "hwmon3"
    for n, (label, mv, ma) in channels.items():
        write(folder / f"in{n}_label", label)
        write(folder / f"in{n}_input", mv)
        write(folder / f"curr{n}_input", ma)
    link_driver(root, "ina3221", device)
    return root / "sys/bus/i2c/drivers/ina3221" / chip / "hwmon/hwmon3"      # the path sensors name


def iio_chip(root: Path, chip: str, channels: dict[int, tuple[str, int]]) -> Path:
    """An INA3221 under IIO (JetPack 4): channel N -> (rail name, mW)."""
    device = root / "sys/devices/7000c400.i2c/i2c-6" / chip
    folder = device / "iio:device0"
    for n, (rail, mw) in channels.items():
        write(folder / f"rail_name_{n}", rail)
        write(folder / f"in_power{n}_input", mw)
        write(folder / f"in_voltage{n}_input", 5000)
        write(folder / f"in_current{n}_input", mw // 5)
    link_driver(root, "ina3221x", device)
    return root / "sys/bus/i2c/drivers/ina3221x" / chip / "iio:device0"


def orin_nano(root: Path) -> Path:
    return hwmon_chip(root, "1-0040", {1: ("VDD_IN", 5080, 1123), 2: ("VDD_CPU_GPU_CV", 5072, 227),
                                       3: ("VDD_SOC", 5072, 290)})


def rapl_domain(root: Path, name: str, energy_uj, max_uj: int = 262143328850, label: str = "package-0") -> Path:
    folder = root / "sys/devices/virtual/powercap/intel-rapl" / name
    write(folder / "energy_uj", energy_uj)
    write(folder / "max_energy_range_uj", max_uj)
    write(folder / "name", label)
    link = root / "sys/class/powercap" / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(folder, link.parent))
    return folder


# --- INA3221 through hwmon (Orin) -------------------------------------------------------------

def test_orin_nano_vdd_in_is_the_total_and_power_is_millivolts_times_milliamps(tmp_path):
    orin_nano(tmp_path)
    source, notes = open_energy_source(tmp_path)
    assert notes == []
    assert (source.name, source.kind) == ("ina3221-hwmon", "power")
    assert source.what == "module input rail VDD_IN (INA3221 1-0040)"
    assert source.read() == pytest.approx(5080 * 1123 / 1e6)             # 5.705 W, not the sum of rails
    assert source.rails() == pytest.approx({"VDD_IN": 5.70484, "VDD_CPU_GPU_CV": 5072 * 227 / 1e6,
                                            "VDD_SOC": 5072 * 290 / 1e6})


def test_agx_orin_two_chips_skip_nc_and_say_plainly_that_the_figure_is_a_sum(tmp_path):
    hwmon_chip(tmp_path, "1-0040", {1: ("VDD_GPU_SOC", 19960, 120), 2: ("VDD_CPU_CV", 19960, 20),
                                    3: ("VIN_SYS_5V0", 4984, 600)})
    hwmon_chip(tmp_path, "1-0041", {1: ("NC", 0, 0), 2: ("VDDQ_VDD2_1V8AO", 1800, 168)})   # no channel 3
    source, notes = open_energy_source(tmp_path)
    assert notes == [] and source.name == "ina3221-hwmon"
    assert list(source.rails()) == ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"]
    assert source.what == ("sum of rails VDD_GPU_SOC+VDD_CPU_CV+VIN_SYS_5V0+VDDQ_VDD2_1V8AO "
                           "(no input-rail sensor on this module)")
    assert source.read() == pytest.approx((19960 * 120 + 19960 * 20 + 4984 * 600 + 1800 * 168) / 1e6)


def test_the_device_profile_names_the_total_rail(tmp_path):
    orin_nano(tmp_path)
    source, _ = open_energy_source(tmp_path, total_rail="VDD_SOC")
    assert source.read() == pytest.approx(5072 * 290 / 1e6)
    assert source.what == "rail VDD_SOC (INA3221 1-0040), the total named by the device profile"

    source, notes = open_energy_source(tmp_path, order=["ina3221-hwmon"], total_rail="VDD_GPU")
    assert source is None
    assert notes == ["ina3221-hwmon: no rail VDD_GPU (the device profile's total) among "
                     "VDD_IN, VDD_CPU_GPU_CV, VDD_SOC"]


def test_every_read_reads_the_files_again(tmp_path):
    folder = orin_nano(tmp_path)
    source, _ = open_energy_source(tmp_path)
    assert source.read() == pytest.approx(5.70484)
    write(folder / "curr1_input", 2000)
    write(folder / "in1_input", 5000)
    assert source.read() == pytest.approx(10.0)
    write(folder / "curr3_input", 0)
    assert source.rails()["VDD_SOC"] == 0.0


def test_a_label_without_its_input_file_fails_naming_the_file(tmp_path):
    folder = orin_nano(tmp_path)
    (folder / "in1_input").unlink()
    source, notes = open_energy_source(tmp_path, order=["ina3221-hwmon"])
    assert source is None
    assert notes == [f"ina3221-hwmon: {folder / 'in1_input'}: missing"]


# --- INA3221 through IIO (JetPack 4) ----------------------------------------------------------

def test_nano_pom_5v_in_is_the_total_never_added_to_the_other_rails(tmp_path):
    folder = iio_chip(tmp_path, "6-0040", {0: ("POM_5V_IN", 4096), 1: ("POM_5V_GPU", 0), 2: ("POM_5V_CPU", 1096)})
    source, notes = open_energy_source(tmp_path)
    assert notes == [f"ina3221-hwmon: no {tmp_path}/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*"]
    assert (source.name, source.kind) == ("ina3221-iio", "power")
    assert source.what == "module input rail POM_5V_IN (INA3221 6-0040)"
    assert source.read() == pytest.approx(4.096)                        # not 4.096 + 0 + 1.096
    assert source.rails() == pytest.approx({"POM_5V_IN": 4.096, "POM_5V_GPU": 0.0, "POM_5V_CPU": 1.096})
    write(folder / "in_power0_input", 7250)
    assert source.read() == pytest.approx(7.25)


def test_xavier_nx_vdd_in_is_the_total(tmp_path):
    iio_chip(tmp_path, "7-0040", {0: ("VDD_IN", 4091), 1: ("VDD_CPU_GPU_CV", 656), 2: ("VDD_SOC", 1269)})
    source, _ = open_energy_source(tmp_path, order=["ina3221-iio"])
    assert source.what == "module input rail VDD_IN (INA3221 7-0040)"
    assert source.read() == pytest.approx(4.091)


def test_iio_garbage_and_empty_files_fail_naming_the_file(tmp_path):
    folder = iio_chip(tmp_path, "6-0040", {0: ("POM_5V_IN", 4096)})
    write(folder / "in_power0_input", "4096 mW")
    assert open_energy_source(tmp_path, order=["ina3221-iio"]) == (
        None, [f"ina3221-iio: {folder / 'in_power0_input'}: not an integer: '4096 mW'"])
    write(folder / "in_power0_input", "")
    assert open_energy_source(tmp_path, order=["ina3221-iio"]) == (
        None, [f"ina3221-iio: {folder / 'in_power0_input'}: empty"])


# --- RAPL -------------------------------------------------------------------------------------

def test_rapl_sums_packages_in_joules_since_open_and_ignores_subdomains(tmp_path):
    pkg0 = rapl_domain(tmp_path, "intel-rapl:0", 5_000_000)
    pkg1 = rapl_domain(tmp_path, "intel-rapl:1", 9_000_000, label="package-1")
    core = rapl_domain(tmp_path, "intel-rapl:0:0", 1_000_000, label="core")       # part of package 0
    rapl_domain(tmp_path, "intel-rapl-mmio:0", 0, label="package-0")              # the same package again
    source, notes = open_energy_source(tmp_path)
    assert source.name == "rapl" and source.kind == "energy"
    assert source.what == "CPU package domains intel-rapl:0, intel-rapl:1 (RAPL)"
    assert [n.split(":")[0] for n in notes] == ["ina3221-hwmon", "ina3221-iio", "tegrastats", "nvml"]
    assert source.read() == 0.0
    write(pkg0 / "energy_uj", 7_500_000)
    write(pkg1 / "energy_uj", 10_000_000)
    write(core / "energy_uj", 99_000_000)
    assert source.read() == pytest.approx(2.5 + 1.0)
    assert source.rails() == {}


def test_rapl_carries_the_counter_across_its_wrap(tmp_path):
    # The counter runs 0..max_energy_range_uj inclusive: from 999_000 to 500 past max=1_000_000 is
    # 1_000 uJ up to the top, 1 over it to 0, then 500: 1_501 uJ.
    pkg = rapl_domain(tmp_path, "intel-rapl:0", 990_000, max_uj=1_000_000)
    source, _ = open_energy_source(tmp_path, order=["rapl"])
    write(pkg / "energy_uj", 999_000)
    assert source.read() == pytest.approx(0.009)
    write(pkg / "energy_uj", 500)
    assert source.read() == pytest.approx(0.009 + 0.001501)
    write(pkg / "energy_uj", 990_000)                                  # a second wrap period, no wrap
    assert source.read() == pytest.approx(0.010501 + 0.9895)
    write(pkg / "energy_uj", 0)
    assert source.read() == pytest.approx(0.010501 + 0.9895 + 0.010001)


def _as_nobody(fn) -> str:
    """fn() in a forked child running as `nobody`, so file modes bind even when tests run as root."""
    if os.geteuid() != 0:
        return fn()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                                                   # the child: never return into pytest
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            out = fn()
        except BaseException as e:                                 # noqa: BLE001 - reported to the parent
            out = f"child failed: {type(e).__name__}: {e}"
        finally:
            os.write(write_end, out.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


def test_rapl_energy_readable_only_by_root_gives_a_permission_denied_note():
    # A world-traversable folder (pytest's tmp_path sits under a 0700 folder of root's), then
    # energy_uj mode 0400 root, as kernels since 2020 make it; read by an unprivileged process.
    root = Path(tempfile.mkdtemp(prefix="edgefa-rapl-"))
    try:
        pkg = rapl_domain(root, "intel-rapl:0", 5_000_000)
        for path in [root, *root.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        (pkg / "energy_uj").chmod(0o400 if os.geteuid() == 0 else 0o000)
        out = _as_nobody(lambda: "\n".join(open_energy_source(root, order=["rapl"])[1]))
        assert out == f"rapl: {root}/sys/class/powercap/intel-rapl:0/energy_uj: permission denied"
    finally:
        shutil.rmtree(root)


def test_rapl_unreadable_or_garbage_energy_gives_a_note_naming_the_file(tmp_path):
    pkg = rapl_domain(tmp_path, "intel-rapl:0", 5_000_000)
    energy = tmp_path / "sys/class/powercap/intel-rapl:0/energy_uj"

    def note():
        source, notes = open_energy_source(tmp_path, order=["rapl"])
        assert source is None and len(notes) == 1 and "\n" not in notes[0]
        return notes[0]

    write(pkg / "energy_uj", "garbage\nmore")
    assert note() == f"rapl: {energy}: not an integer: 'garbage\\nmore'"
    write(pkg / "energy_uj", "")
    assert note() == f"rapl: {energy}: empty"
    (pkg / "energy_uj").unlink()
    (pkg / "energy_uj").symlink_to(pkg / "gone")                    # a dangling link
    assert note() == f"rapl: {energy}: missing"
    (pkg / "energy_uj").unlink()
    (pkg / "energy_uj").mkdir()                                     # unreadable even by root
    assert note() == f"rapl: {energy}: is a directory, not a file"


def test_a_failing_read_after_open_raises_sensor_error(tmp_path):
    pkg = rapl_domain(tmp_path, "intel-rapl:0", 5_000_000)
    source, _ = open_energy_source(tmp_path, order=["rapl"])
    write(pkg / "energy_uj", "-")
    with pytest.raises(SensorError, match=r"intel-rapl:0/energy_uj: not an integer: '-'$"):
        source.read()


# --- choosing a backend -----------------------------------------------------------------------

@pytest.fixture
def no_tegrastats_nor_nvml(monkeypatch, tmp_path):
    monkeypatch.delenv("EDGEFA_TEGRASTATS", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    monkeypatch.setitem(sys.modules, "pynvml", None)                # `import pynvml` fails


def test_an_empty_root_gives_no_source_and_one_note_per_backend(tmp_path, no_tegrastats_nor_nvml):
    source, notes = open_energy_source(tmp_path, work_on_gpu=True)
    assert source is None
    assert notes == [
        f"ina3221-hwmon: no {tmp_path}/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*",
        f"ina3221-iio: no {tmp_path}/sys/bus/i2c/drivers/ina3221x/*/iio:device*",
        f"tegrastats: no tegrastats executable ({tmp_path}/usr/bin/tegrastats missing, none on PATH)",
        "nvml: nvidia-ml-py not installed",
        f"rapl: no {tmp_path}/sys/class/powercap/intel-rapl:<N> package domains",
    ]


def test_a_broken_hwmon_falls_back_to_rapl_with_a_note(tmp_path, no_tegrastats_nor_nvml):
    folder = orin_nano(tmp_path)
    (folder / "curr1_input").unlink()
    rapl_domain(tmp_path, "intel-rapl:0", 1)
    source, notes = open_energy_source(tmp_path)
    assert source.name == "rapl"
    assert notes[0] == f"ina3221-hwmon: {folder / 'curr1_input'}: missing"
    assert len(notes) == 4


def test_unknown_backend_names_are_refused(tmp_path):
    with pytest.raises(SensorError, match=r"unknown energy sensor 'ina219'; known: ina3221-hwmon, "):
        open_energy_source(tmp_path, order=["rapl", "ina219"])
    assert DEFAULT_ORDER == ("ina3221-hwmon", "ina3221-iio", "tegrastats", "nvml", "rapl")


# --- tegrastats as a real subprocess ----------------------------------------------------------

# Prints the lines of lines.txt (read again each round), one every --interval ms as tegrastats
# does. A shell script, so it starts in milliseconds even on a loaded machine; it names `sleep` by
# its full path, as some tests empty PATH.
FAKE_TEGRASTATS = """#!/bin/sh
here=${0%/*}
[ "$1" = --interval ] || exit 2
ms=$2
echo "$$ $*" > "$here/started"
while :; do
    while IFS= read -r line; do
        printf '%s\\n' "$line"
        {sleep} "$((ms / 1000)).$(printf %03d $((ms % 1000)))"
    done < "$here/lines.txt"
done
"""
SLEEP = shutil.which("sleep")                                       # found before a test empties PATH


def fake_tegrastats(folder: Path, *lines: str) -> Path:
    exe = folder / "tegrastats"
    write(exe, FAKE_TEGRASTATS.replace("{sleep}", SLEEP))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    write(folder / "lines.txt", "\n".join(lines))
    return exe


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_tegrastats_jetpack4_unitless_rails_and_close_ends_the_process(tmp_path, no_tegrastats_nor_nvml):
    bin_dir = tmp_path / "usr/bin"
    fake_tegrastats(bin_dir, "RAM 1215/3964MB (lfb 482x4MB) SWAP 0/1982MB (cached 0MB)", NANO_JP4)
    source, notes = open_energy_source(tmp_path)
    assert len(notes) == 2 and source.name == "tegrastats" and source.kind == "power"
    assert source.read() == pytest.approx(4.096)                        # POM_5V_IN, not the sum
    assert source.what == "module input rail POM_5V_IN (tegrastats)"
    assert source.rails() == pytest.approx({"POM_5V_IN": 4.096, "POM_5V_GPU": 0.0, "POM_5V_CPU": 1.096})
    pid, *args = (bin_dir / "started").read_text().split()
    assert args == ["--interval", "100"]

    # the latest line counts
    write(bin_dir / "lines.txt", NANO_JP4.replace("POM_5V_IN 4096/3500", "POM_5V_IN 6000/3600"))
    wait_for(lambda: source.read() == pytest.approx(6.0))

    source.close()
    with pytest.raises(ProcessLookupError):                             # ended and reaped
        os.kill(int(pid), 0)


def test_tegrastats_jetpack6_milliwatts_from_the_env_override(tmp_path, monkeypatch):
    exe = fake_tegrastats(tmp_path / "elsewhere", ORIN_NANO_JP6)
    monkeypatch.setenv("EDGEFA_TEGRASTATS", str(exe))
    source, notes = open_energy_source(tmp_path, order=["tegrastats"])
    try:
        assert notes == []
        assert source.read() == pytest.approx(5.704)
        assert source.what == "module input rail VDD_IN (tegrastats)"
    finally:
        source.close()


def test_tegrastats_without_an_input_rail_is_an_honest_sum_without_nc(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFA_TEGRASTATS", str(fake_tegrastats(tmp_path, AGX_ORIN_JP5)))
    source, _ = open_energy_source(tmp_path, order=["tegrastats"])
    try:
        assert source.read() == pytest.approx((2390 + 398 + 2991 + 302) / 1000)
        assert source.what == ("sum of rails VDD_GPU_SOC+VDD_CPU_CV+VIN_SYS_5V0+VDDQ_VDD2_1V8AO "
                               "(no input-rail sensor on this module)")
        assert "NC" not in source.rails()
    finally:
        source.close()


def test_tegrastats_that_exits_or_stays_silent_gives_a_note(tmp_path, monkeypatch):
    exe = write(tmp_path / "tegrastats", "#!/bin/sh\necho 'Error: tegrastats needs root'\nexit 3\n")
    exe.chmod(0o755)
    monkeypatch.setenv("EDGEFA_TEGRASTATS", str(exe))
    assert open_energy_source(tmp_path, order=["tegrastats"]) == (None, [
        f"tegrastats: {exe}: exited with status 3 before printing power rails: Error: tegrastats needs root"])

    write(exe, "#!/bin/sh\nexec sleep 30\n")
    source = Tegrastats(tmp_path, first_line_timeout_s=0.3)
    with pytest.raises(SensorError, match=r"no line with power rails within 0.3 s$"):
        source.read()
    started = time.monotonic()
    source.close()
    assert time.monotonic() - started < 1.5

    monkeypatch.setenv("EDGEFA_TEGRASTATS", str(tmp_path / "missing"))
    assert open_energy_source(tmp_path, order=["tegrastats"])[1] == [
        f"tegrastats: EDGEFA_TEGRASTATS={tmp_path / 'missing'}: no such executable"]


# --- NVML (a third-party library: absent here, or a small fake of it) -------------------------

def fake_pynvml(energy_mj: list[int], supported: bool = True) -> types.ModuleType:
    nvml = types.ModuleType("pynvml")
    nvml.calls = []

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):                            # noqa: N801 - pynvml's name
        def __str__(self):
            return "Not Supported"

    def energy(handle):
        assert handle == "gpu0"
        if not supported:
            raise NVMLError_NotSupported()
        return energy_mj.pop(0)

    nvml.NVMLError, nvml.NVMLError_NotSupported = NVMLError, NVMLError_NotSupported
    nvml.nvmlInit = lambda: nvml.calls.append("init")
    nvml.nvmlShutdown = lambda: nvml.calls.append("shutdown")
    nvml.nvmlDeviceGetHandleByIndex = lambda index: f"gpu{index}"
    nvml.nvmlDeviceGetTotalEnergyConsumption = energy
    return nvml


def test_nvml_without_the_library_gives_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert open_energy_source(tmp_path, order=["nvml"]) == (None, ["nvml: nvidia-ml-py not installed"])


def test_nvml_millijoules_since_driver_load_become_joules_since_open(tmp_path, monkeypatch):
    nvml = fake_pynvml([1_000_000, 1_002_500, 1_012_345])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    source, notes = open_energy_source(tmp_path, order=["nvml", "rapl"])
    assert notes == [] and (source.name, source.kind, source.what) == ("nvml", "energy", "GPU 0 board (NVML)")
    assert source.read() == pytest.approx(12.345)
    source.close()
    assert nvml.calls == ["init", "shutdown"]


def test_a_gpu_meter_is_not_used_for_work_on_the_cpu(tmp_path, monkeypatch, no_tegrastats_nor_nvml):
    """On an H200 host the device server ran on the CPU and NVML, next in line, metered the idle
    GPU: 0 J per step, labelled measured. Work on the CPU now skips it for RAPL (or the estimate)."""
    nvml = fake_pynvml([1_000_000] * 10)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    rapl_domain(tmp_path, "intel-rapl:0", 1_000_000)
    source, notes = open_energy_source(tmp_path)
    assert source.name == "rapl" and nvml.calls == []
    assert notes[-1] == "nvml: skipped: it meters the GPU board only, and the work runs on the CPU"
    on_gpu, _ = open_energy_source(tmp_path, work_on_gpu=True)
    assert on_gpu.name == "nvml"
    on_gpu.close()
    asked_for, _ = open_energy_source(tmp_path, order=["nvml", "rapl"])    # a profile that names it
    assert asked_for.name == "nvml"
    asked_for.close()


def test_nvml_not_supported_gives_a_note_and_shuts_nvml_down(tmp_path, monkeypatch):
    nvml = fake_pynvml([], supported=False)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    source, notes = open_energy_source(tmp_path, order=["nvml"])
    assert source is None
    assert notes == ["nvml: GPU 0 nvmlDeviceGetTotalEnergyConsumption: Not Supported"]
    assert nvml.calls == ["init", "shutdown"]
