"""`edgefa profile`, `profile compare`, `budget` and `profiles` end to end: the real CLI in second
processes, real bundles, data files and reports, a real device server over TCP (torch made
unimportable there), and the reports rendered in headless Chromium.

The profiling runs that several tests read are made once per module and side by side (the
local runs without torch, the comparisons with it), since process start-up dominates them.
Few steps and the small bundle of conftest; seeded and offline.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_error_line, run_edgefa
from test_link_live import device_server
from test_report_html import assert_rendered, chromium_binary, render_in_chromium

LOCAL_STEPS, LINK_STEPS, COMPARE_STEPS = 40, 30, 30
DEFAULT_WARMUP = 5
PROFILE_PLOTS = {"latency", "phases", "memory", "energy"}       # no "power": estimates have no timeline
COMPARE_PLOTS = {"compare-step-time", "compare-peak-rss", "compare-energy", "compare-phases"}
PROFILES = ["generic-x86", "jetson-agx-orin-64gb", "jetson-nano-4gb", "jetson-orin-nano-8gb",
            "jetson-xavier-nx", "raspberry-pi-5"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path) with its sha256, and every directory."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return out


def ok(proc) -> str:
    """Exit 0 and no traceback; the output for the failure message otherwise."""
    everything = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in everything, everything
    return everything


def expected_energy_method() -> str:
    """'estimated' where no energy sensor is readable (this machine), 'measured' where one is."""
    from edgefa.profiling.machine import open_profiler

    _, machine = open_profiler()
    return "estimated" if machine.energy_line.startswith("energy: estimated") else "measured"


def in_parallel(calls: dict[str, tuple[tuple, dict]]) -> dict:
    """run_edgefa(*args, **kwargs) for every entry at once; the CompletedProcesses by key."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = {key: pool.submit(run_edgefa, *args, **kwargs) for key, (args, kwargs) in calls.items()}
        return {key: future.result() for key, future in futures.items()}


# --- the profiling runs several tests read: made once, side by side ---------------------------

@pytest.fixture(scope="module")
def runs(tiny_bundle_master, digits_npz, tmp_path_factory) -> dict:
    """A local torch-free profile (synthetic data and digits) and two compares (synthetic and digits)
    of a private copy of the tiny bundle, with the bundle's listing before and after."""
    root = tmp_path_factory.mktemp("profile-cli")
    bundle = root / "bundle"
    shutil.copytree(tiny_bundle_master, bundle)
    before = snapshot(bundle)
    out = {key: root / key for key in ("local", "local_digits", "compare", "compare_digits")}
    # the digits runs name their device profile: detecting this host measures its copy bandwidth in
    # a probe process (about 10 s a run here), which the loss comparison does not need
    data = ("--data", f"npz:{digits_npz}", "--profile", "generic-x86")
    procs = in_parallel({
        "local": (("profile", bundle, "--steps", LOCAL_STEPS, "--out", out["local"]), {"without_torch": True}),
        "local_digits": (("profile", bundle, "--steps", COMPARE_STEPS, *data, "--out", out["local_digits"]),
                         {"without_torch": True}),
        "compare": (("profile", "compare", bundle, "--steps", COMPARE_STEPS, "--out", out["compare"]), {}),
        "compare_digits": (("profile", "compare", bundle, "--steps", COMPARE_STEPS, *data,
                            "--out", out["compare_digits"]), {}),
    })
    return {"bundle": bundle, "before": before, "after": snapshot(bundle), "out": out, "procs": procs}


def profile_of(runs: dict, key: str) -> dict:
    ok(runs["procs"][key])
    return json.loads((runs["out"][key] / "profile.json").read_text())


def compare_of(runs: dict, key: str) -> dict:
    ok(runs["procs"][key])
    return json.loads((runs["out"][key] / "compare.json").read_text())


def dfa_bp(compare: dict) -> tuple[dict, dict]:
    (dfa_name, dfa), (bp_name, bp) = compare["runs"].items()
    assert dfa_name.startswith("dfa") and bp_name.startswith("bp"), list(compare["runs"])
    return dfa, bp


def assert_percentiles_ordered(latency: dict, what: str) -> None:
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"], (what, latency)


# --- 1. a local profile, torch-free ------------------------------------------------------------

def test_local_profile_without_torch_writes_the_profile(runs):
    proc = runs["procs"]["local"]
    ok(proc)
    p = profile_of(runs, "local")
    assert p["schema"] == "edgefa.profile/1" and p["where"] == "local" and p["link"] is None
    assert p["config"]["steps"] == LOCAL_STEPS and p["config"]["warmup"] == DEFAULT_WARMUP
    assert {"load", "train_step", "checkpoint"} <= set(p["phases"]), list(p["phases"])

    step = p["phases"]["train_step"]
    assert step["count"] == LOCAL_STEPS - DEFAULT_WARMUP and step["warmup"] == DEFAULT_WARMUP, step
    assert len(step["samples_ms"]) == step["count"]
    for name, phase in p["phases"].items():
        assert_percentiles_ordered(phase["latency_ms"], name)
    assert p["finetune"]["steps_run"] == LOCAL_STEPS and np.isfinite(p["finetune"]["loss_first"])

    memory = p["memory"]
    assert memory["peak_rss_bytes"] > 0
    timeline = memory["timeline"]
    assert len(timeline["t_s"]) == len(timeline["rss_bytes"]) >= 2, timeline
    assert timeline["t_s"] == sorted(timeline["t_s"]) and all(r > 0 for r in timeline["rss_bytes"])
    assert max(timeline["rss_bytes"]) <= memory["peak_rss_bytes"]

    method = expected_energy_method()
    energy = p["energy"]
    assert energy["method"] == method, energy
    if method == "estimated":     # this machine: no readable sensor, so every figure says so
        for name, phase in p["phases"].items():
            assert phase["energy_j"]["method"] == "estimated", (name, phase["energy_j"])
            assert phase["energy_j"]["per_window_p50"] > 0, (name, phase["energy_j"])
        assert energy["per_step_j"] > 0 and energy["timeline"] == {"t_s": [], "power_w": []}
        assert "estimated" in proc.stdout, proc.stdout

    budget = p["budget"]
    assert budget["batch"] == 32 and budget["peak_bytes"] > 0 and budget["step_lower_bound_s"] > 0, budget
    assert (runs["out"]["local"] / "report.html").is_file()
    assert "profile.json" in proc.stdout and "report.html" in proc.stdout


def test_local_profile_leaves_the_users_bundle_alone(runs):
    ok(runs["procs"]["local"])
    assert not (runs["bundle"] / "state").exists()
    assert runs["after"] == runs["before"]          # every file byte for byte, nothing added


# --- 2 and 4. the reports render in a real browser ---------------------------------------------

@pytest.fixture(scope="module")
def rendered(runs, tmp_path_factory) -> dict:
    """report.html (local) and compare.html rendered in headless Chromium at once."""
    binary = chromium_binary()        # skips, saying how to install it, where there is none
    pages = {"report": runs["out"]["local"] / "report.html", "compare": runs["out"]["compare"] / "compare.html"}
    for key, path in pages.items():
        ok(runs["procs"]["local" if key == "report" else "compare"])
        assert path.is_file(), path
    root = tmp_path_factory.mktemp("chromium-profile-cli")
    with ThreadPoolExecutor(max_workers=len(pages)) as pool:
        futures = {key: pool.submit(render_in_chromium, binary, path.read_text(encoding="utf-8"), root / key)
                   for key, path in pages.items()}
        return {key: future.result() for key, future in futures.items()}


def test_profile_report_renders_in_chromium(rendered):
    assert_rendered(rendered["report"], PROFILE_PLOTS)


def test_compare_report_renders_in_chromium(rendered):
    assert_rendered(rendered["compare"], COMPARE_PLOTS)


# --- 3. over the link, against a real torch-free device server --------------------------------

@pytest.fixture
def server(tmp_path):
    """`python -m edgefa.without_torch device serve --listen 127.0.0.1:0`; always terminated."""
    with device_server(tmp_path / "store", listen="127.0.0.1:0") as s:
        yield s


def device_step(url: str) -> int:
    proc = run_edgefa("device", "info", url, "--json", without_torch=True)
    ok(proc)
    return json.loads(proc.stdout)["step"]


def test_profile_over_the_link_and_again(server, tiny_bundle, tmp_path):
    assert server.url.startswith("socket://127.0.0.1:")
    # the device serves no bundle: refused in one line, unless --deploy (which deploys it first)
    refused = run_edgefa("profile", tiny_bundle, "--device", server.url, "--steps", 2, "--out", tmp_path / "no")
    assert_one_error_line(refused, "serves no bundle", "--deploy")
    profiles = []
    for attempt in (1, 2):
        out = tmp_path / f"out{attempt}"
        proc = run_edgefa("profile", tiny_bundle, "--device", server.url, "--steps", LINK_STEPS, "--out", out,
                          *(["--deploy"] if attempt == 1 else []))
        ok(proc)
        p = json.loads((out / "profile.json").read_text())
        profiles.append(p)
        assert p["schema"] == "edgefa.profile/1" and p["where"] == f"device {server.url}", p["where"]
        assert (out / "report.html").is_file()
        assert device_step(server.url) == 0                         # the steps ran in a scratch session
        assert p["device_state"]["step_before"] == p["device_state"]["step_after"] == 0
        assert p["device_state"]["restored"] and bool(p["device_state"]["deployed"]) == (attempt == 1)

        # the server's profile was cleared before each run: this run's steps only, never 60
        step, warmup = p["phases"]["train_step"], p["config"]["warmup"]
        assert step["count"] == LINK_STEPS - warmup and step["warmup"] == warmup, (attempt, step)
        assert p["finetune"]["steps_run"] == LINK_STEPS
        assert_percentiles_ordered(step["latency_ms"], "train_step")

        rtt = p["link"]["round_trip_ms"]
        assert rtt["p50"] > 0 and rtt["p50"] >= step["latency_ms"]["p50"], (rtt, step["latency_ms"])
        assert_percentiles_ordered(rtt, "round trip")
        assert p["memory"]["peak_rss_bytes"] > 0
        assert p["energy"]["method"] in ("estimated", "measured")
    first, second = profiles
    assert {"transfer", "load", "train_step"} <= set(first["phases"]), list(first["phases"])
    assert first["link"]["archive_bytes"] > 0 and second["link"]["archive_bytes"] is None
    # the second run started from the state the first one left alone: the same losses
    assert (second["finetune"]["loss_first"], second["finetune"]["loss_last"]) == (
        first["finetune"]["loss_first"], first["finetune"]["loss_last"])
    assert not (tiny_bundle / "state").exists()
    assert server.proc.poll() is None, server.stderr()                 # still serving


# --- 4. DFA against BP, locally -----------------------------------------------------------------

def test_compare_writes_ratios_and_bp_costs_more_memory(runs):
    c = compare_of(runs, "compare")
    assert c["schema"] == "edgefa.compare/1" and len(c["runs"]) == 2
    dfa, bp = dfa_bp(c)
    for run in (dfa, bp):
        assert run["schema"] == "edgefa.profile/1"
        assert run["phases"]["train_step"]["count"] == COMPARE_STEPS - DEFAULT_WARMUP
        assert run["finetune"]["steps_run"] == COMPARE_STEPS
    ratios = c["ratios"]
    for key in ("step_time_p50", "peak_rss"):
        assert isinstance(ratios[key], float) and ratios[key] > 0, ratios
    assert ratios["peak_rss"] == pytest.approx(dfa["memory"]["peak_rss_bytes"] / bp["memory"]["peak_rss_bytes"])
    assert bp["memory"]["peak_rss_bytes"] > dfa["memory"]["peak_rss_bytes"]      # torch costs memory
    assert c["energy_method"] == expected_energy_method()
    assert c["model"] == {"layers": [64, 32, 16, 10], "batch_size": 32, "steps": COMPARE_STEPS}
    assert (runs["out"]["compare"] / "compare.html").is_file()


# --- 5. the same data gives the same first batch ---------------------------------------------------

def test_same_data_same_seed_same_first_batch(runs):
    local = profile_of(runs, "local_digits")
    dfa, bp = dfa_bp(compare_of(runs, "compare_digits"))
    losses = {"local dfa": local["finetune"]["loss_first"], "compare dfa": dfa["finetune"]["loss_first"],
              "compare bp": bp["finetune"]["loss_first"]}
    assert all(isinstance(v, float) and np.isfinite(v) for v in losses.values()), losses
    assert losses["local dfa"] == pytest.approx(losses["compare dfa"], abs=1e-6), losses
    # BP in torch sees the same first batch with the same weights: the same loss up to float32 rounding
    assert losses["compare bp"] == pytest.approx(losses["compare dfa"], abs=1e-5), losses
    # and the digits are not the synthetic default: the data file was really used
    assert losses["local dfa"] != pytest.approx(profile_of(runs, "local")["finetune"]["loss_first"], abs=1e-3)


# --- 6. bad input: one line, exit 2, nothing written -------------------------------------------------

@pytest.fixture
def bad_inputs(tiny_bundle, tmp_path) -> dict:
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_bundle, corrupt)
    weights = corrupt / "weights.npz"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    weights.write_bytes(bytes(raw))
    five = tmp_path / "five.npz"
    np.savez(five, X=np.zeros((64, 5), np.float32), y=np.arange(64) % 10)
    not_a_bundle = tmp_path / "not-a-bundle"
    not_a_bundle.mkdir()
    (not_a_bundle / "notes.txt").write_text("hello")
    return {"corrupt": corrupt, "five": five, "missing": tmp_path / "missing.npz", "not_a_bundle": not_a_bundle}


def test_bad_input_is_one_error_line_and_writes_nothing(bad_inputs, tiny_bundle, tmp_path):
    outs = {key: tmp_path / f"out-{key}" for key in ("corrupt", "missing", "five", "profile", "device")}
    steps = ("--steps", "5")
    cases = {
        "corrupt": (("profile", bad_inputs["corrupt"], *steps, "--out", outs["corrupt"]),
                    ("weights.npz", "sha256 mismatch")),
        "missing": (("profile", tiny_bundle, *steps, "--data", f"npz:{bad_inputs['missing']}", "--out", outs["missing"]),
                    ("missing.npz", "no such file")),
        "five": (("profile", tiny_bundle, *steps, "--data", f"npz:{bad_inputs['five']}", "--out", outs["five"]),
                 ("(5,) features", "expects 64")),
        "profile": (("profile", tiny_bundle, *steps, "--profile", "no-such-device", "--out", outs["profile"]),
                    ("no-such-device", "jetson-orin-nano-8gb")),
        "device": (("profile", tiny_bundle, *steps, "--device", "socket://127.0.0.1:1", "--out", outs["device"]),
                   ("socket://127.0.0.1:1", "refused")),
        "budget": (("budget", bad_inputs["not_a_bundle"]), ("manifest.json", "missing")),
    }
    before = snapshot(tiny_bundle)
    procs = in_parallel({key: (args, {"timeout": 60}) for key, (args, _) in cases.items()})
    for key, (_, fragments) in cases.items():
        assert_one_error_line(procs[key], *fragments)
        if key in outs:
            assert not outs[key].exists(), (key, snapshot(outs[key]))
    assert snapshot(tiny_bundle) == before and not (tiny_bundle / "state").exists()


def test_corrupt_bundle_error_names_the_users_bundle(bad_inputs, tmp_path):
    proc = run_edgefa("profile", bad_inputs["corrupt"], "--steps", "5", "--out", tmp_path / "out")
    line = assert_one_error_line(proc, "sha256 mismatch")
    assert str(bad_inputs["corrupt"]) in line and "edgefa-profile-" not in line, line


# --- 7. device profiles -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def profiles_runs() -> dict:
    """list, show --json and detect --json, each with torch importable and without it, at once."""
    commands = {"list": ("profiles", "list"),
                "show": ("profiles", "show", "jetson-orin-nano-8gb", "--json"),
                "detect": ("profiles", "detect", "--json")}
    return in_parallel({(key, no_torch): (args, {"without_torch": no_torch})
                        for key, args in commands.items() for no_torch in (False, True)})


@pytest.mark.parametrize("no_torch", [False, True], ids=["torch", "without-torch"])
def test_profiles_list_lists_all_six(profiles_runs, no_torch):
    """Every profile, its name printed whole (it is what --profile takes), with or without torch."""
    proc = profiles_runs[("list", no_torch)]
    ok(proc)
    missing = [name for name in PROFILES if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", proc.stdout)]
    assert not missing, (missing, proc.stdout)


@pytest.mark.parametrize("no_torch", [False, True], ids=["torch", "without-torch"])
def test_profiles_show_json(profiles_runs, no_torch):
    proc = profiles_runs[("show", no_torch)]
    ok(proc)
    p = json.loads(proc.stdout)
    assert p["name"] == "jetson-orin-nano-8gb" and p["total_rail"] == "VDD_IN", p
    assert "VDD_IN" in p["sensor_rails"] and p["detected"] == {}


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="expects an x86-64 host")
@pytest.mark.parametrize("no_torch", [False, True], ids=["torch", "without-torch"])
def test_profiles_detect_json_on_this_machine(profiles_runs, no_torch):
    proc = profiles_runs[("detect", no_torch)]
    ok(proc)
    p = json.loads(proc.stdout)
    assert p["name"] == "generic-x86", p
    assert p["detected"] and all(isinstance(v, str) and v for v in p["detected"].values()), p["detected"]
    assert {"cpu_cores", "memory_bytes"} <= set(p["detected"]), p["detected"]
    assert p["how"] and p["cpu_cores"] >= 1 and p["memory_bytes"] > 0
