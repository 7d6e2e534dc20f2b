"""DeviceProfile: what a board can compute, move and draw, each figure from a TOML file in data/
(loading.py) or filled in by detection on this host (detection.py). Device side: standard library only."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import EdgefaError

KINDS = ("jetson", "sbc", "host")
SENSOR_BACKENDS = ("ina3221-hwmon", "ina3221-iio", "tegrastats", "rapl", "nvml", "none")
# The onnxruntime execution providers the runtime chooses from by default, best first (it takes the
# first one available; runtime/engine.py), and so the one the budget assumes a profile runs.
AUTO_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
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
