"""The window API: latency windows, warm-up, and energy integrated per window from real sensor
files (an INA3221 in the hwmon layout, a RAPL counter) that change while the windows run."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgefa.link.messages import MAX_HEADER, MessageError, arrays_to_lists, decode, encode, lists_to_arrays
from edgefa.profiling.profiler import MAX_PHASES, EnergyEstimate, Profiler
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


# --- bounded by design: a device up for weeks ---------------------------------------------------

class DaysClock:
    """An injected clock (nanoseconds) that the test advances by hand."""

    def __init__(self):
        self.ns = 10 ** 12

    def __call__(self) -> int:
        return self.ns

    def advance(self, seconds: float) -> None:
        self.ns += int(seconds * 1e9)


def run_for_days(p: Profiler, clock: DaysClock, days: int) -> None:
    """Each simulated minute: a few windows of three phases, one sample (the sampler's pace,
    compressed: 30 ms of windows and a sample a minute)."""
    for _ in range(days * 24 * 60):
        for name in ("train_step", "forward", "transfer"):
            with p.window(name):
                clock.advance(0.01)
        clock.advance(59.97)
        p.sample_now()


def header_values(value):
    """Every leaf of a decoded JSON header."""
    if isinstance(value, dict):
        for v in value.values():
            yield from header_values(v)
    elif isinstance(value, list):
        for v in value:
            yield from header_values(v)
    else:
        yield value


def profile_reply(p: Profiler) -> tuple[int, int, dict]:
    """(header bytes, message bytes, summary) of the profile reply the device would send."""
    fields, arrays = lists_to_arrays(p.summary())
    data = encode({"ok": True, **fields}, arrays)
    header = int.from_bytes(data[:4], "big")
    return header, len(data), fields


def test_a_profiler_up_for_days_sends_a_reply_of_fixed_size():
    """The summary's series are downsampled (timelines to at most 512 buckets, samples_ms to the
    last 512 windows), every container is bounded, and the reply after 20 days is no larger than
    after 2: it used to grow with uptime until its JSON header passed 64 KiB (about 3 minutes)."""
    clock = DaysClock()
    p = Profiler(warmup=0, max_samples=20_000, max_windows=10_000, clock_ns=clock)
    run_for_days(p, clock, 2)
    header_2, size_2, fields_2 = profile_reply(p)
    run_for_days(p, clock, 18)
    header_20, size_20, fields_20 = profile_reply(p)
    assert header_20 < MAX_HEADER and size_20 <= size_2 + 1024, (header_2, size_2, header_20, size_20)
    assert len(p._samples) == 20_000 and all(len(spans) == 10_000 for spans in p.spans.values())

    s = p.summary()
    timeline = s["memory"]["timeline"]
    assert len(timeline["t_s"]) == len(timeline["rss_bytes"]) == 512
    assert s["memory"]["timeline_samples"] == 20_000 and "max RSS" in s["memory"]["timeline_aggregation"]
    # the timeline spans the samples kept: the last 20 000 (one a minute, and one at each summary),
    # ending now; a bucket holds 39 or 40 of them and is stamped with its last
    now = 20 * 86400
    assert timeline["t_s"][-1] == pytest.approx(now, rel=1e-9)
    assert now - 20_000 * 60 <= timeline["t_s"][0] <= now - 20_000 * 60 + 43 * 60
    step = s["phases"]["train_step"]
    assert step["count"] == 10_000 and len(step["samples_ms"]) == 512
    assert step["samples_ms_of"] == "the last 512 of 10000 windows after warm-up"
    assert step["latency_ms"]["p50"] == pytest.approx(10.0)
    # the header holds plain JSON only: no numpy scalar (json.dumps writes np.float64 as a float,
    # which is how a list of them once stayed in the header)
    for v in header_values(fields_20):
        assert type(v) in (str, int, float, bool, type(None)), (type(v), v)


def test_a_power_timeline_over_days_is_the_mean_power_of_each_bucket(tmp_path):
    """A rail at 5 W for the first half and 10 W for the second: 4 000 samples become at most 512
    buckets whose power is energy / duration, so every bucket reads 5 W, 10 W or in between."""
    folder = ina3221_hwmon(tmp_path, 5000, 1000)
    source, _ = open_energy_source(tmp_path, order=["ina3221-hwmon"])
    clock = DaysClock()
    p = Profiler(source, warmup=0, clock_ns=clock)
    for i in range(4_000):
        if i == 2_000:
            set_power(folder, 5000, 2000)
        clock.advance(30)
        p.sample_now()
    power = p.summary()["energy"]["timeline"]["power_w"]
    assert 256 <= len(power) <= 512
    assert power[0] == pytest.approx(5) and power[-1] == pytest.approx(10)
    assert all(5 - 1e-9 <= w <= 10 + 1e-9 for w in power)


def test_containers_stay_bounded_whatever_the_caller_does():
    """Window names past MAX_PHASES are not recorded (one note, not one per window), and a note
    repeated is kept once."""
    p = Profiler(warmup=0, notes=["sensor x: unreadable"] * 100)
    for i in range(MAX_PHASES + 50):
        for _ in range(3):
            with p.window(f"phase{i}"):
                pass
    s = p.summary()
    assert len(s["phases"]) == MAX_PHASES
    assert s["energy"]["notes"] == ["sensor x: unreadable",
                                    f"more than {MAX_PHASES} window names: windows after that are not recorded"]


def test_summary_while_the_sampler_and_the_serving_thread_append():
    """The sampler thread samples as fast as it can and a second thread closes windows while
    summary() runs in a loop. It raised `RuntimeError: deque mutated during iteration`."""
    p = Profiler(warmup=0, sample_interval_s=0.0, max_samples=200, max_windows=500)
    stop = threading.Event()
    errors = []

    def serve_windows():
        try:
            while not stop.is_set():
                with p.window("train_step"):
                    pass
                with p.window(f"phase{len(p.spans) % 8}"):
                    pass
        except Exception as exc:      # noqa: BLE001 -- reported by the assertion below
            errors.append(exc)

    server = threading.Thread(target=serve_windows)
    with p:
        server.start()
        # at least 1.5 s, and on until both bounds are reached (about 1000 samples in 1.5 s on two
        # busy cores; a loaded CI machine may need longer), at most 30 s
        start, summaries = time.monotonic(), 0
        try:
            while time.monotonic() < start + 30:
                s = p.summary()
                t = s["memory"]["timeline"]["t_s"]
                assert t == sorted(t) and len(t) <= 512      # samples stay in time order
                summaries += 1
                full = len(p._samples) == 200 and len(p.spans["train_step"]) == 500
                if full and time.monotonic() > start + 1.5:
                    break
        finally:
            stop.set()
            server.join()
    assert errors == [] and summaries >= 5
    assert len(p._samples) == 200 and len(p.spans["train_step"]) == 500     # reached, never passed


def test_numpy_numbers_never_stay_in_the_header():
    """lists_to_arrays moves a list of numpy floats (the old memory timeline) to an array and turns
    a numpy scalar into a plain number."""
    fields = {"t_s": [np.float64(0.25)] * 10_000, "peak": np.int64(7), "mixed": ["a", np.float32(1.5)]}
    header, arrays = lists_to_arrays(fields)
    assert header["t_s"] == {"$array": "/t_s"} and arrays["/t_s"].shape == (10_000,)
    assert type(header["peak"]) is int and header["mixed"] == ["a", 1.5] and type(header["mixed"][1]) is float
    msg = decode(encode({"ok": True, **header}, arrays))
    assert arrays_to_lists(msg.fields, msg.arrays)["t_s"] == [0.25] * 10_000


def test_a_header_over_the_limit_is_refused_by_its_sender():
    with pytest.raises(MessageError, match="exceeds 65536"):
        encode({"ok": True, "notes": ["x" * 100] * 1000})
