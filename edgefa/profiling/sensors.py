"""Energy sensors on the device: the Jetson's INA3221 rails, tegrastats, NVML or Intel RAPL.

`open_energy_source` tries the backends in order and returns the first that really reads, with one
short note per backend that did not, so a report can say why a figure is missing. Every path is
taken under `root`, so tests build the real sysfs layout in a temporary folder.

Two kinds of source: "power" (INA3221, tegrastats) reads watts now; "energy" (NVML, RAPL) reads
joules accumulated since it was opened. A module's total is its input rail (VDD_IN, POM_5V_IN),
which already includes every other rail; where a module has no input-rail sensor (AGX Orin) the
figure is the sum of its rails and `what` says so, never passing the sum off as the total.

Standard library only: this runs on the device, without torch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Callable, Sequence

from edgefa.errors import EdgefaError
from edgefa.profiling.tegrastats import TOTAL_RAILS, TegrastatsSample, parse_tegrastats

DEFAULT_ORDER = ("ina3221-hwmon", "ina3221-iio", "tegrastats", "nvml", "rapl")
TEGRASTATS_INTERVAL_MS = 100
NOT_CONNECTED = "NC"                    # the label of an INA3221 channel with nothing on it


class SensorError(EdgefaError):
    """A sensor that is absent, unreadable or returns garbage; the message is one line naming the cause."""


class EnergySource:
    """What the profiler reads: watts now ("power") or joules since open ("energy")."""

    name: str = ""                      # backend id, one of DEFAULT_ORDER
    what: str = ""                      # what the figure measures, in words, for reports
    kind: str = "power"                 # "power": read() is W now; "energy": J since open

    def read(self) -> float:
        raise NotImplementedError

    def rails(self) -> dict[str, float]:
        """Watts per rail now, for power sensors that have rails."""
        return {}

    def close(self) -> None:
        pass

    def __enter__(self) -> EnergySource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- reading sysfs files ----------------------------------------------------------------------

def _under(root: str | Path, path: str) -> Path:
    """An absolute device path inside `root` ("/" on the device, a temporary folder in tests)."""
    return Path(root) / path.lstrip("/")


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except PermissionError:
        raise SensorError(f"{path}: permission denied") from None
    except FileNotFoundError:
        raise SensorError(f"{path}: missing") from None
    except IsADirectoryError:
        raise SensorError(f"{path}: is a directory, not a file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SensorError(f"{path}: unreadable ({getattr(e, 'strerror', None) or e})") from None


def _read_int(path: Path) -> int:
    text = _read_text(path)
    if not text:
        raise SensorError(f"{path}: empty")
    try:
        return int(text)
    except ValueError:
        raise SensorError(f"{path}: not an integer: {text[:40]!r}") from None


def _pick_total(rails: Sequence[str], total_rail: str | None) -> str | None:
    """The rail that is the module's total: the device profile's choice, else the input rail, else None (sum)."""
    if total_rail is not None:
        if total_rail not in rails:
            raise SensorError(f"no rail {total_rail} (the device profile's total) among {', '.join(rails)}")
        return total_rail
    return next((r for r in TOTAL_RAILS if r in rails), None)


def _describe(total: str | None, rails: Sequence[str], total_rail: str | None, where: str) -> str:
    if total is None:
        return f"sum of rails {'+'.join(rails)} (no input-rail sensor on this module)"
    if total_rail is not None:
        return f"rail {total} ({where}), the total named by the device profile"
    return f"module input rail {total} ({where})"


# --- INA3221 rails in sysfs: hwmon (JetPack 5/6) and IIO (JetPack 4) --------------------------

class _Ina3221(EnergySource):
    """INA3221 rails, each file read afresh at every call (sysfs values change; nothing is cached).
    The two drivers differ only in where the chips are, how channels are numbered and named, and
    how a channel's power is read; the subclasses say those four things."""

    kind = "power"
    DRIVER: str          # the driver's folder in sysfs
    GLOB: str            # one folder per chip below it
    CHANNELS: tuple[int, ...]

    def __init__(self, root: str | Path = "/", total_rail: str | None = None):
        pattern = _under(root, f"{self.DRIVER}/{self.GLOB}")
        folders = sorted(_under(root, self.DRIVER).glob(self.GLOB))
        if not folders:
            raise SensorError(f"no {pattern}")
        channels = {}
        for folder in folders:                              # AGX Orin has two chips, 1-0040 and 1-0041
            for n in self.CHANNELS:
                label = folder / self.label_file(n)
                if not label.exists():
                    continue
                rail = _read_text(label)
                if rail in ("", NOT_CONNECTED):
                    continue
                channels[rail] = (self.chip(folder), self.channel(folder, n))
        if not channels:
            raise SensorError(f"{pattern}: no labelled rails")
        self._watts = {rail: watts for rail, (_, watts) in channels.items()}
        self._total = _pick_total(list(channels), total_rail)
        where = f"INA3221 {channels[self._total][0]}" if self._total else "INA3221"
        self.what = _describe(self._total, list(channels), total_rail, where)

    def read(self) -> float:
        if self._total is not None:
            return self._watts[self._total]()
        return sum(self.rails().values())

    def rails(self) -> dict[str, float]:
        return {rail: watts() for rail, watts in self._watts.items()}


class Ina3221Hwmon(_Ina3221):
    """JetPack 5/6 (Orin): in{N}_label, in{N}_input (bus mV) and curr{N}_input (mA), N = 1..3."""

    name = "ina3221-hwmon"
    DRIVER, GLOB, CHANNELS = "/sys/bus/i2c/drivers/ina3221", "*/hwmon/hwmon*", (1, 2, 3)

    @staticmethod
    def label_file(n: int) -> str:
        return f"in{n}_label"

    @staticmethod
    def chip(folder: Path) -> str:
        return folder.parent.parent.name                   # 1-0040/hwmon/hwmon3

    @staticmethod
    def channel(folder: Path, n: int) -> Callable[[], float]:
        millivolts, milliamps = folder / f"in{n}_input", folder / f"curr{n}_input"
        return lambda: _read_int(millivolts) * _read_int(milliamps) / 1e6


class Ina3221Iio(_Ina3221):
    """JetPack 4 (Nano, Xavier NX): rail_name_N and in_power{N}_input (mW), N = 0..2."""

    name = "ina3221-iio"
    DRIVER, GLOB, CHANNELS = "/sys/bus/i2c/drivers/ina3221x", "*/iio:device*", (0, 1, 2)

    @staticmethod
    def label_file(n: int) -> str:
        return f"rail_name_{n}"

    @staticmethod
    def chip(folder: Path) -> str:
        return folder.parent.name                          # 6-0040/iio:device0

    @staticmethod
    def channel(folder: Path, n: int) -> Callable[[], float]:
        milliwatts = folder / f"in_power{n}_input"
        return lambda: _read_int(milliwatts) / 1000


# --- tegrastats, the fallback on any Jetson ---------------------------------------------------

def _find_tegrastats(root: str | Path) -> str:
    """$EDGEFA_TEGRASTATS, else ROOT/usr/bin/tegrastats (where JetPack puts it), else PATH."""
    override = os.environ.get("EDGEFA_TEGRASTATS")
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise SensorError(f"EDGEFA_TEGRASTATS={override}: no such executable")
        return override
    standard = _under(root, "/usr/bin/tegrastats")
    if standard.is_file() and os.access(standard, os.X_OK):
        return str(standard)
    found = shutil.which("tegrastats")
    if found is None:
        raise SensorError(f"no tegrastats executable ({standard} missing, none on PATH)")
    return found


class Tegrastats(EnergySource):
    """The latest line of a running `tegrastats --interval MS`, read by a daemon thread."""

    name = "tegrastats"
    kind = "power"

    def __init__(self, root: str | Path = "/", total_rail: str | None = None,
                 interval_ms: int = TEGRASTATS_INTERVAL_MS, first_line_timeout_s: float = 2.0):
        self._exe = _find_tegrastats(root)
        self._total_rail = total_rail
        self._timeout = first_line_timeout_s
        self._latest: TegrastatsSample | None = None
        self._last_other = ""                               # the last line without rails: an error message?
        self._arrived = threading.Event()                   # a line with rails came, or the output ended
        self.what = "tegrastats (no line read yet)"
        try:
            self._proc = subprocess.Popen([self._exe, "--interval", str(interval_ms)], stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                          errors="replace")
        except OSError as e:
            raise SensorError(f"{self._exe}: cannot run ({e.strerror or e})") from None
        self._thread = threading.Thread(target=self._pump, name="edgefa-tegrastats", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for line in self._proc.stdout:
            sample = parse_tegrastats(line)
            if sample is None:
                self._last_other = line.strip()[:200]
                continue
            self._latest = sample
            self._arrived.set()
        self._arrived.set()                                 # end of output: wake a waiting read()

    def _sample(self) -> TegrastatsSample:
        if not self._arrived.wait(self._timeout):
            raise SensorError(f"{self._exe}: no line with power rails within {self._timeout:g} s")
        latest = self._latest
        if latest is None or self._proc.poll() is not None:
            try:
                status = self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                status = "unknown"
            said = f": {self._last_other}" if self._last_other else ""
            before = " before printing power rails" if latest is None else ""
            raise SensorError(f"{self._exe}: exited with status {status}{before}{said}")
        return latest

    def _connected(self, sample: TegrastatsSample) -> list[str]:
        return [r for r in sample.rails if r != NOT_CONNECTED]

    def read(self) -> float:
        sample = self._sample()
        rails = self._connected(sample)
        total = _pick_total(rails, self._total_rail) if self._total_rail else sample.total_rail
        self.what = _describe(total, rails, self._total_rail, "tegrastats")
        if total is not None:
            return sample.rails[total].now_mw / 1000
        return sum(sample.rails[r].now_mw for r in rails) / 1000

    def rails(self) -> dict[str, float]:
        sample = self._sample()
        return {r: sample.rails[r].now_mw / 1000 for r in self._connected(sample)}

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._thread.join(timeout=2)
        self._proc.stdout.close()


# --- NVML: a discrete NVIDIA GPU's board energy counter ---------------------------------------

class Nvml(EnergySource):
    """GPU 0's total energy counter (mJ since the driver loaded; Volta and newer), as J since open."""

    name = "nvml"
    kind = "energy"

    def __init__(self, index: int = 0):
        try:
            import pynvml                                   # nvidia-ml-py, optional
        except ImportError:
            raise SensorError("nvidia-ml-py not installed") from None
        self._nvml = pynvml
        self.what = f"GPU {index} board (NVML)"
        self._index = index
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            raise SensorError(f"nvmlInit: {e}") from None
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._start_mj = self._energy_mj()
        except SensorError:
            pynvml.nvmlShutdown()
            raise
        except pynvml.NVMLError as e:
            pynvml.nvmlShutdown()
            raise SensorError(f"GPU {index}: {e}") from None

    def _energy_mj(self) -> int:
        try:
            return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except self._nvml.NVMLError as e:
            raise SensorError(f"GPU {self._index} nvmlDeviceGetTotalEnergyConsumption: {e}") from None

    def read(self) -> float:
        return (self._energy_mj() - self._start_mj) / 1000

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError:
            pass


# --- Intel RAPL through powercap --------------------------------------------------------------

_PACKAGE_DOMAIN = re.compile(r"intel-rapl:(\d+)")          # intel-rapl:0, not subdomain intel-rapl:0:0


class Rapl(EnergySource):
    """CPU package energy (RAPL), joules since open summed over packages, carried across counter wraps.

    energy_uj counts from 0 up to max_energy_range_uj inclusive and then starts again at 0 (the
    kernel sets the range to the largest value the 32-bit register can show). So a step from
    `last` down to `raw` spans (max - last) up to the top, one count over the top to 0, then raw:
        delta = raw - last + max + 1.
    Strictly the count over the top is one RAPL energy unit (15-61 uJ, which powercap does not
    publish), not 1 uJ; tools that use `max - last + raw` are off by the same unit the other way.
    Either error is one unit per wrap (a wrap is tens of kJ), far below the counter's own accuracy.
    A wrap is only seen if read() runs at least once per wrap period (minutes at full load).
    """

    name = "rapl"
    kind = "energy"

    def __init__(self, root: str | Path = "/"):
        base = _under(root, "/sys/class/powercap")
        found = [(int(m[1]), p) for p in base.glob("intel-rapl:*") if (m := _PACKAGE_DOMAIN.fullmatch(p.name))]
        if not found:
            raise SensorError(f"no {base}/intel-rapl:<N> package domains")
        domains = [p for _, p in sorted(found)]
        self._energy = [d / "energy_uj" for d in domains]
        self._max = [_read_int(d / "max_energy_range_uj") for d in domains]
        for d, top in zip(domains, self._max):
            if top <= 0:
                raise SensorError(f"{d / 'max_energy_range_uj'}: not positive: {top}")
        self._last = [_read_int(f) for f in self._energy]
        self._total_uj = 0
        self.what = f"CPU package domains {', '.join(d.name for d in domains)} (RAPL)"

    def read(self) -> float:
        for i, path in enumerate(self._energy):
            raw, last = _read_int(path), self._last[i]
            self._total_uj += raw - last if raw >= last else raw - last + self._max[i] + 1
            self._last[i] = raw
        return self._total_uj / 1e6


# --- choosing one -----------------------------------------------------------------------------

_BACKENDS: dict[str, Callable[[Path, str | None], EnergySource]] = {
    "ina3221-hwmon": lambda root, total_rail: Ina3221Hwmon(root, total_rail),
    "ina3221-iio": lambda root, total_rail: Ina3221Iio(root, total_rail),
    "tegrastats": lambda root, total_rail: Tegrastats(root, total_rail),
    "nvml": lambda root, total_rail: Nvml(),
    "rapl": lambda root, total_rail: Rapl(root),
}


GPU_ONLY_BACKENDS = ("nvml",)           # meters that see the GPU board and nothing else


def open_energy_source(root: str | Path = "/", order: Sequence[str] | None = None,
                       total_rail: str | None = None,
                       work_on_gpu: bool = False) -> tuple[EnergySource | None, list[str]]:
    """The first backend in `order` that opens and gives a valid first read(), and one note per
    backend that failed ("rapl: /sys/.../energy_uj: permission denied"); (None, notes) if none did.
    `total_rail` (from a device profile) names the rail that is the module's total. Unless the
    work runs on the GPU, a GPU-only meter is skipped (it would report the idle GPU's energy as
    the CPU's work: seen as 0 J per step on an H200 host), except when it comes first in `order`."""
    order = DEFAULT_ORDER if order is None else ((order,) if isinstance(order, str) else tuple(order))
    unknown = [name for name in order if name not in _BACKENDS]
    if unknown:
        raise SensorError(f"unknown energy sensor {', '.join(map(repr, unknown))}; "
                          f"known: {', '.join(DEFAULT_ORDER)}")
    notes = []
    for i, name in enumerate(order):
        if name in GPU_ONLY_BACKENDS and not work_on_gpu and i > 0:
            notes.append(f"{name}: skipped: it meters the GPU board only, and the work runs on the CPU")
            continue
        source = None
        try:
            source = _BACKENDS[name](Path(root), total_rail)
            source.read()
            return source, notes
        except SensorError as e:
            if source is not None:
                source.close()
            notes.append(f"{name}: {e}")
    return None, notes
