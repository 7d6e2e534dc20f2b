"""The window API: latency windows, warm-up, and energy integrated per window from real sensor
files (an INA3221 in the hwmon layout, a RAPL counter) that change while the windows run."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from edgefa.link.messages import arrays_to_lists, decode, encode, lists_to_arrays
from edgefa.profiling.profiler import EnergyEstimate, Profiler
from edgefa.profiling.sensors import open_energy_source


def ina3221_hwmon(root: Path, millivolts: int, milliamps: int) -> Path:
    """A JetPack 5/6 INA3221 with VDD_IN on channel 1, as the kernel lays it out."""
    folder = root / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    folder.mkdir(parents=True)
    (folder / "in1_label").write_text("VDD_IN\n")
    set_power(folder, millivolts, milliamps)
    return folder


def set_power(folder: Path, millivolts: int, milliamps: int) -> None:
    for name, value in (("in1_input", millivolts), ("curr1_input", milliamps)):
        tmp = folder / f".{name}"
        tmp.write_text(f"{value}\n")
        tmp.replace(folder / name)        # atomic, so the sampler never reads a half-written file


def sleep_window(profiler: Profiler, name: str, seconds: float) -> None:
    with profiler.window(name):
        time.sleep(seconds)


def test_windows_record_every_phase_and_drop_warmup_only_from_repeated_ones():
    p = Profiler(warmup=2)
    for _ in range(10):
        with p.window("step"):
            pass
    p.begin_window("load")
    time.sleep(0.01)
    p.end_window("load")
    s = p.summary()
    assert s["phases"]["step"]["count"] == 8 and s["phases"]["step"]["warmup"] == 2
    assert s["phases"]["load"]["count"] == 1 and s["phases"]["load"]["warmup"] == 0   # seen once: kept
    lat = s["phases"]["load"]["latency_ms"]
    assert lat["p50"] >= 10 and lat["aggregation"] == "percentiles over windows after warm-up"
    step = s["phases"]["step"]
    assert len(step["samples_ms"]) == 8
    assert step["latency_ms"]["p99"] == pytest.approx(np.percentile(step["samples_ms"], 99), rel=1e-6)


def test_a_disabled_profiler_records_nothing():
    p = Profiler(enabled=False)
    with p.window("step"):
        pass
    assert p.summary()["phases"] == {}


def test_power_sensor_energy_is_integrated_per_window(tmp_path):
    """Samples taken at known moments (no thread), so the expected energy is exact under any load."""
    folder = ina3221_hwmon(tmp_path, 5000, 1000)              # 5 V x 1 A = 5 W
    source, notes = open_energy_source(tmp_path, order=["ina3221-hwmon"])
    assert notes == []
    p = Profiler(source, warmup=0)
    p.sample_now()
    sleep_window(p, "five_watts", 0.05)
    p.sample_now()
    set_power(folder, 5000, 2000)                             # 10 W from here on
    p.sample_now()
    sleep_window(p, "ten_watts", 0.05)
    s = p.summary()
    five, ten = (s["phases"][n]["energy_j"] for n in ("five_watts", "ten_watts"))
    seconds = {n: s["phases"][n]["total_s"] for n in ("five_watts", "ten_watts")}
    assert five["method"] == ten["method"] == "measured" and "VDD_IN" in five["source"]
    assert five["per_window"] == pytest.approx(5 * seconds["five_watts"], rel=1e-6)
    assert ten["per_window"] == pytest.approx(10 * seconds["ten_watts"], rel=1e-6)
    power = s["energy"]["timeline"]["power_w"]
    assert min(power) == pytest.approx(5, rel=1e-6) and max(power) == pytest.approx(10, rel=1e-6)


def test_the_sampler_thread_integrates_a_steady_rail(tmp_path):
    ina3221_hwmon(tmp_path, 19000, 250)                       # 4.75 W, steady
    source, _ = open_energy_source(tmp_path, order=["ina3221-hwmon"])
    with Profiler(source, sample_interval_s=0.005, warmup=0) as p:
        for _ in range(5):
            sleep_window(p, "step", 0.02)
    s = p.summary()
    phase = s["phases"]["step"]
    assert phase["energy_j"]["total"] == pytest.approx(4.75 * phase["total_s"], rel=1e-6)
    assert len(s["energy"]["timeline"]["t_s"]) >= 2 and s["energy"]["average_power_w"] == pytest.approx(4.75)


def test_energy_counter_windows_follow_the_counter(tmp_path):
    """A RAPL package counter (cumulative microjoules), advanced by the test between samples."""
    domain = tmp_path / "sys/class/powercap/intel-rapl:0"
    domain.mkdir(parents=True)
    (domain / "name").write_text("package-0\n")
    (domain / "max_energy_range_uj").write_text("262143328850\n")
    (domain / "energy_uj").write_text("1000\n")
    source, _ = open_energy_source(tmp_path, order=["rapl"])
    p = Profiler(source, warmup=0)
    p.sample_now()
    sleep_window(p, "step", 0.01)
    (domain / "energy_uj").write_text("3001000\n")           # 3 J during that window
    p.sample_now()
    phase = p.summary()["phases"]["step"]
    assert phase["energy_j"]["method"] == "measured"
    assert 0 < phase["energy_j"]["total"] <= 3.0 + 1e-9       # the window is a share of the interval


def test_without_a_sensor_energy_is_estimated_and_says_so():
    est = EnergyEstimate("test-device", idle_power_w=2.0, pj_per_flop=10.0, pj_per_dram_byte=100.0)
    p = Profiler(None, est, warmup=0)
    with p.window("train_step", flops=1e9, bytes_moved=1e7):  # 10 mJ + 1 mJ of work
        time.sleep(0.05)
    s = p.summary()
    e = s["phases"]["train_step"]["energy_j"]
    seconds = s["phases"]["train_step"]["total_s"]
    assert e["method"] == s["energy"]["method"] == "estimated"
    assert "test-device" in e["source"]
    assert e["per_window"] == pytest.approx(2.0 * seconds + 0.010 + 0.001, rel=1e-9)
    assert s["energy"]["timeline"] == {"t_s": [], "power_w": []}      # nothing was measured


def test_a_sensor_that_vanishes_mid_run_leaves_a_note_not_a_crash(tmp_path):
    folder = ina3221_hwmon(tmp_path, 5000, 1000)
    source, _ = open_energy_source(tmp_path, order=["ina3221-hwmon"])
    p = Profiler(source, warmup=0)
    p.sample_now()
    sleep_window(p, "before", 0.01)
    p.sample_now()
    (folder / "curr1_input").unlink()
    p.sample_now()                                            # this read fails: a note, no exception
    sleep_window(p, "after", 0.01)
    s = p.summary()
    assert any("stopped reading" in n for n in s["energy"]["notes"])
    assert s["phases"]["before"]["energy_j"]["per_window"] > 0
    assert s["phases"]["after"]["energy_j"]["per_window"] is None


def test_memory_is_sampled_over_time():
    with Profiler(sample_interval_s=0.005) as p:
        # 48 MiB, touched: above glibc's largest mmap threshold (32 MiB), so these are fresh pages
        # even in a long test process whose heap holds freed, still-resident memory (16 MiB came
        # from such a heap once and RSS did not move)
        block = np.ones(48 << 20, dtype=np.uint8)
        time.sleep(0.05)
        del block
    mem = p.summary()["memory"]
    assert len(mem["timeline"]["t_s"]) >= 5 and len(mem["timeline"]["t_s"]) == len(mem["timeline"]["rss_bytes"])
    assert max(mem["timeline"]["rss_bytes"]) - min(mem["timeline"]["rss_bytes"]) >= 45 << 20
    # VmHWM may lag the sampled VmRSS (per-thread counters): the peak is never below a sample
    assert mem["peak_rss_bytes"] >= max(mem["timeline"]["rss_bytes"])


def test_long_series_travel_as_arrays_not_json():
    """A profile with 100 000 samples fits a message (the JSON header is limited to 64 KiB)."""
    summary = {"phases": {"train_step": {"count": 3, "samples_ms": [0.5] * 100_000}},
               "energy": {"timeline": {"t_s": [], "power_w": []}, "notes": ["x"]}}
    fields, arrays = lists_to_arrays(summary)
    msg = decode(encode({"ok": True, **fields}, arrays))
    back = arrays_to_lists(msg.fields, msg.arrays)
    assert back["phases"] == summary["phases"] and back["energy"] == summary["energy"]


def test_a_long_running_profiler_keeps_only_the_last_windows():
    p = Profiler(warmup=0, max_windows=10)
    for _ in range(25):
        with p.window("step"):
            pass
    assert p.summary()["phases"]["step"]["count"] == 10
    assert p.last_seconds("step") == p.seconds("step")[-1]
