"""The profiler for the machine this runs on: its device profile, its best energy sensor, and the
estimate to fall back to when it has none."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

from ..device_profiles import DeviceProfile, detect_profile, load_profile
from .profiler import EnergyEstimate, Profiler
from .sensors import open_energy_source


@dataclass
class Machine:
    profile: DeviceProfile
    how_recognized: str
    energy_notes: list[str]        # one line per sensor backend that was tried and failed
    energy_line: str               # one line saying what energy figures will be


def open_profiler(profile: str | None = None, root: str = "/", work_on_gpu: bool = False,
                  **profiler_options) -> tuple[Profiler, Machine]:
    """A Profiler reading the best energy sensor here for work on the CPU or, with `work_on_gpu`,
    the GPU (or estimating from the device profile), with the device profile `profile` (a name or
    TOML path) or the one detected here."""
    if profile:
        device, how = load_profile(profile), f"given: {profile}"
    else:
        device, how = detect_profile(root, measure=False)   # energy needs no bandwidth probe
    order = None if device.sensor_backend in ("none", "", None) else _backends_first(device.sensor_backend)
    source, notes = open_energy_source(root, order=order, total_rail=device.total_rail, work_on_gpu=work_on_gpu)
    if source is not None:
        line = f"energy: measured by {source.name} ({source.what})"
        estimate = None
    else:
        line = (f"energy: estimated from device profile {device.name} "
                f"(no sensor readable: {'; '.join(notes) or 'none tried'})")
        estimate = EnergyEstimate.from_profile(device)
    # NVML only where the work is on the GPU: loading the driver's library costs about 30 MiB of
    # RSS (seen on an H200 host), which would land in the peak of a step that runs on the CPU.
    gpu_memory = _nvml_memory_reader() if work_on_gpu else None
    profiler = Profiler(source, estimate, notes=notes, gpu_memory=gpu_memory, **profiler_options)
    return profiler, Machine(device, how, notes, line)


def _backends_first(preferred: str) -> tuple[str, ...]:
    from .sensors import DEFAULT_ORDER
    return (preferred,) + tuple(b for b in DEFAULT_ORDER if b != preferred)


def _nvml_memory_reader():
    """GPU memory through NVML where nvidia-ml-py and a GPU are present; None otherwise."""
    try:
        import pynvml
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:   # no library, no driver, no GPU: no GPU memory figure
        return None

    def read() -> dict | None:
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        except Exception:
            return None
        return {"source": "nvml (whole GPU, all processes)", "used_bytes": int(info.used),
                "total_bytes": int(info.total), "peak_bytes": None}
    return read


def device_description() -> dict:
    """What this machine is, as far as it can tell without a device profile."""
    model = None
    for path in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        try:
            model = Path(path).read_bytes().rstrip(b"\0").decode("utf-8", "replace").strip()
            break
        except OSError:
            pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"hostname": platform.node(), "machine": platform.machine(), "system": platform.system(),
            "model": model or platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "memory_bytes": mem}
