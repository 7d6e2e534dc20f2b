"""The HTML report: plain checks on the markup, then a real render in headless Chromium.

The Chromium tests load a copy of the report with a small probe script appended. After load the
probe measures every svg.plot (on-screen size, marks with a non-zero area or length, text labels,
anything drawn outside the plot) and writes the JSON into <pre id="render-result">, which the test
reads back from `--dump-dom`.
"""

from __future__ import annotations

import html
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edgefa.errors import EdgefaError
from edgefa.report import render_compare_report, render_profile_report, write_report

HOSTILE = "<script>alert(1)</script>"
CHROMIUM_TIMEOUT_S = 60


# --------------------------------------------------------------------------------------------
# Realistic input
# --------------------------------------------------------------------------------------------

def make_phase(rng: random.Random, median_ms: float, n: int, sigma: float, energy_w: float | None,
               method: str, warmup: int = 5) -> dict:
    """A phase with n lognormal windows; energy per window = power x latency when energy_w is set."""
    samples = [rng.lognormvariate(math.log(median_ms), sigma) for _ in range(n)]
    cuts = statistics.quantiles(samples, n=100, method="inclusive") if n > 1 else [samples[0]] * 99
    per_window = energy_w * statistics.fmean(samples) / 1000 if energy_w is not None else None
    return {
        "count": n, "warmup": warmup if n > 1 else 0,
        "latency_ms": {"p50": cuts[49], "p95": cuts[94], "p99": cuts[98], "mean": statistics.fmean(samples),
                       "min": min(samples), "max": max(samples),
                       "aggregation": "percentiles over windows after warm-up"},
        "total_s": sum(samples) / 1000,
        "samples_ms": samples,
        "energy_j": {"per_window": per_window, "total": per_window * n if per_window is not None else None,
                     "method": method if per_window is not None else "none", "source": "test"},
    }


def make_profile(energy: str = "estimated", hostname: str = "jetson-01", seed: int = 7,
                 memory_timeline: bool = True) -> dict:
    """A profile dict as `edgefa profile` writes it: 200 train steps, memory timeline, chosen energy."""
    rng = random.Random(seed)
    watts = None if energy == "none" else 6.5
    phases = {
        "load": make_phase(rng, 180.0, 1, 0.0, watts, energy),
        "batch": make_phase(rng, 0.4, 200, 0.3, watts, energy),
        "train_step": make_phase(rng, 3.2, 200, 0.35, watts, energy),
        "forward": make_phase(rng, 1.1, 200, 0.3, watts, energy),
        "checkpoint": make_phase(rng, 25.0, 4, 0.2, watts, energy, warmup=0),
    }
    t = [0.05 * i for i in range(60)]
    rss = [int((180 + 40 * (1 - math.exp(-i / 8)) + rng.uniform(-1, 1)) * 2**20) for i in range(60)]
    power_t = [0.1 * i for i in range(30)] if energy == "measured" else []
    power_w = [6.5 + rng.uniform(-0.8, 0.8) for _ in power_t]
    train = phases["train_step"]
    return {
        "schema": "edgefa.profile/1",
        "title": "edgefa profile: bundle digits-mlp",
        "where": "device socket://10.0.0.2:7000",
        "created": "2026-11-25T18:40:00Z",
        "machine": {"hostname": hostname, "model": "NVIDIA Jetson Orin Nano", "cpu_count": 6,
                    "python": "3.11.7"},
        "device_profile": {"name": "jetson-orin-nano", "display_name": "Jetson Orin Nano", "detected": True},
        "config": {"steps": 200, "batch_size": 32, "warmup": 5, "sample_interval_s": 0.05,
                   "provider": "CPUExecutionProvider"},
        "phases": phases,
        "memory": {"peak_rss_bytes": max(rss) + 3 * 2**20, "rss_bytes": rss[-1],
                   "timeline": {"t_s": t if memory_timeline else [], "rss_bytes": rss if memory_timeline else []},
                   "runtime_growth_bytes": 38 * 2**20,
                   "gpu": None},
        "energy": {
            "method": energy,
            "backend": {"measured": "ina3221-hwmon", "estimated": "estimate from profile jetson-orin-nano",
                        "none": ""}[energy],
            "what": "VDD_IN: the whole module" if energy != "none" else "",
            "notes": ["rapl: /sys/class/powercap not present"] + (
                ["ina3221-hwmon: permission denied"] if energy != "measured" else []),
            "average_power_w": watts,
            "per_step_j": train["energy_j"]["per_window"],
            "timeline": {"t_s": power_t, "power_w": power_w},
        },
        "link": {"round_trip_ms": {"p50": 1.8, "p95": 3.1, "p99": 4.4}, "overhead_ms_p50": 0.9,
                 "bytes_sent": 1_250_000, "bytes_received": 98_000},
    }


def make_compare(dfa_energy: str = "estimated", bp_energy: str = "estimated") -> dict:
    dfa, bp = make_profile(dfa_energy, seed=1), make_profile(bp_energy, seed=2)
    bp["where"] = "local"
    for phase in bp["phases"].values():
        for key in ("p50", "p95", "p99", "mean", "min", "max"):
            phase["latency_ms"][key] *= 1.8
    bp["memory"]["peak_rss_bytes"] *= 3
    ratio_e = (dfa["energy"]["per_step_j"] / bp["energy"]["per_step_j"]
               if dfa["energy"]["per_step_j"] and bp["energy"]["per_step_j"] else None)
    return {
        "schema": "edgefa.compare/1", "title": "edgefa profile compare: dfa vs bp", "created": "2026-11-25T18:41:00Z",
        "machine": {"hostname": "bench-host", "cpu_count": 16},
        "model": {"layers": [64, 128, 128, 10], "batch_size": 32, "steps": 200},
        "runs": {"dfa (onnxruntime, device runtime)": dfa, "bp (torch)": bp},
        "ratios": {"step_time_p50": dfa["phases"]["train_step"]["latency_ms"]["p50"]
                   / bp["phases"]["train_step"]["latency_ms"]["p50"],
                   "peak_rss": dfa["memory"]["peak_rss_bytes"] / bp["memory"]["peak_rss_bytes"],
                   "energy_per_step": ratio_e},
        "ratio_definition": "dfa / bp: below 1 means DFA on the device runtime costs less",
    }


def plots_in(page: str) -> list[str]:
    return re.findall(r'<svg class="plot" data-plot="([^"]+)"', page)


def figure_titles(page: str) -> list[str]:
    return [html.unescape(t) for t in re.findall(r"<figcaption>(.*?)</figcaption>", page)]


# --------------------------------------------------------------------------------------------
# Plain checks (no browser)
# --------------------------------------------------------------------------------------------

def test_estimated_energy_is_labelled_estimated_everywhere():
    page = render_profile_report(make_profile("estimated"))
    energy_titles = [t for t in figure_titles(page) if "energy" in t.lower() or "power" in t.lower()]
    assert len(energy_titles) == 2 and all("estimated" in t for t in energy_titles), energy_titles
    summary_row = re.search(r"<th>energy per step</th><td>(.*?)</td>", page).group(1)
    assert "estimated" in summary_row and "mJ" in summary_row
    phase_rows = re.findall(r"<tr><td>(?:batch|train_step|forward)</td>.*?</tr>", page)
    assert len(phase_rows) == 3 and all("estimated" in row for row in phase_rows)
    energy_svg = re.search(r'<svg class="plot" data-plot="energy".*?</svg>', page, re.S).group(0)
    assert energy_svg.count(">estimated<") == 5          # a value label under every phase's bar
    assert 'class="mark bar estimated"' in energy_svg
    assert "no samples: estimates have no power timeline" in page


def test_measured_energy_is_never_called_estimated():
    page = render_profile_report(make_profile("measured"))
    visible = page.split("</style>", 1)[1]
    assert "estimat" not in visible.lower()
    assert {"energy", "power"} <= set(plots_in(page))
    assert "ina3221-hwmon" in page and "average 6.50 W" in page


def test_no_energy_shows_a_line_instead_of_a_figure_and_empty_series_a_note():
    page = render_profile_report(make_profile("none", memory_timeline=False))
    assert "no energy figure: rapl: /sys/class/powercap not present; ina3221-hwmon: permission denied" in page
    assert set(plots_in(page)) == {"latency", "phases"}
    assert "no samples: no memory timeline recorded" in page


def test_strings_from_data_are_escaped_and_the_page_is_self_contained(tmp_path):
    profile = make_profile("estimated", hostname=HOSTILE)
    profile["title"] = 'a "quoted" & <b>bold</b> title'
    profile["phases"]["<img src=x onerror=alert(2)>"] = profile["phases"].pop("checkpoint")
    profile["energy"]["notes"].append(HOSTILE)
    page = render_profile_report(profile)
    assert HOSTILE not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img" not in page and "&lt;img src=x onerror=alert(2)&gt;" in page
    assert "<b>bold</b>" not in page
    for report in (page, render_compare_report(make_compare())):
        assert "<script" not in report.lower()
        assert not re.search(r"https?://", report), re.search(r".{40}https?://.{40}", report)
        assert not re.search(r"<[^>]*\s(src|href)\s*=|@import|url\(", report)
        assert report.startswith("<!DOCTYPE html>") and report.rstrip().endswith("</html>")
    path = tmp_path / "out" / "report.html"
    write_report(path, page)
    assert path.read_text(encoding="utf-8") == page
    assert os.listdir(path.parent) == ["report.html"]     # no temporary file left behind


def test_compare_report_table_and_bars_label_estimates():
    compare = make_compare("measured", "estimated")
    page = render_compare_report(compare)
    assert set(plots_in(page)) == {"compare-step-time", "compare-peak-rss", "compare-energy", "compare-phases"}
    for name in compare["runs"]:
        assert html.escape(name) in page
    energy_row = re.search(r"<tr><td>energy per step</td>(.*?)</tr>", page).group(1)
    assert energy_row.count("estimated") == 2                   # the bp cell and the ratio
    assert any("estimated" in t for t in figure_titles(page) if "energy" in t)
    assert f"{compare['ratios']['step_time_p50']:.2f}\u00d7" in page
    assert compare["ratio_definition"] in page


def test_wrong_schema_is_a_user_error():
    with pytest.raises(EdgefaError, match="schema"):
        render_profile_report({"schema": "edgefa.compare/1"})
    with pytest.raises(EdgefaError, match="schema"):
        render_compare_report(make_profile())


# --------------------------------------------------------------------------------------------
# Real rendering in headless Chromium
# --------------------------------------------------------------------------------------------

PROBE = """
<pre id="render-result"></pre>
<script>
window.addEventListener("load", () => {
  const inside = (r, box) => r.left >= box.left - 1 && r.right <= box.right + 1 &&
                             r.top >= box.top - 1 && r.bottom <= box.bottom + 1;
  const plots = [...document.querySelectorAll("svg.plot")].map(svg => {
    const box = svg.getBoundingClientRect();
    const marks = [...svg.querySelectorAll(".mark")];
    const visible = marks.filter(m => {
      const tag = m.tagName.toLowerCase();
      if (tag === "polyline" || tag === "line" || tag === "path") return m.getTotalLength() > 0;
      const b = m.getBBox();
      return b.width * b.height > 0;
    });
    const texts = [...svg.querySelectorAll("text")].filter(t => t.textContent.trim() && t.getBBox().width > 0);
    const drawn = [...marks, ...texts];
    return {plot: svg.dataset.plot, width: box.width, height: box.height, marks: marks.length,
            visible_marks: visible.length, texts: texts.length,
            outside: drawn.filter(el => !inside(el.getBoundingClientRect(), box)).length};
  });
  const column = document.querySelector("main").getBoundingClientRect();
  const spilled = [...document.querySelectorAll("main > *, table, svg.plot")]
    .filter(el => el.getBoundingClientRect().right > column.right + 1).map(el => el.tagName);
  document.getElementById("render-result").textContent = JSON.stringify({
    plots, pwned: !!window.__pwned, spilled,
    overflow: document.documentElement.scrollWidth > window.innerWidth});
});
</script>
"""


def chromium_binary() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if not binary:
        pytest.skip("chromium not installed (Debian package chromium): install it with "
                    "`apt-get install -y chromium` to render the report in a real browser")
    return binary


def _stop(proc: subprocess.Popen) -> None:
    """End the Chromium we started: its own process group (browser, zygote, renderers)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=5)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def render_in_chromium(binary: str, page: str, folder: Path) -> dict | str:
    """Write the report, load a probed copy in headless Chromium; the probe's JSON, or why not.

    Chromium prints the DOM well before it finishes shutting down, so the DOM is read as it
    streams and the browser is stopped once the document is complete.
    """
    folder.mkdir(parents=True)
    report = folder / "report.html"
    write_report(report, page)
    probed = folder / "probed.html"
    probed.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    command = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--no-default-browser-check", "--disable-extensions",
               "--disable-background-networking", "--disable-component-update",
               "--allow-file-access-from-files", f"--user-data-dir={folder / 'chromium-profile'}",
               "--window-size=900,800", "--virtual-time-budget=2000", "--dump-dom", probed.as_uri()]
    stderr_path = folder / "chromium-stderr.txt"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                env=dict(os.environ, HOME=str(folder)), start_new_session=True)
    watchdog = threading.Timer(CHROMIUM_TIMEOUT_S, _stop, [proc])
    watchdog.start()
    dom = []
    try:
        for line in proc.stdout:
            dom.append(line)
            if "</html>" in line:
                break
    finally:
        timed_out = not watchdog.is_alive()
        watchdog.cancel()
        _stop(proc)
        proc.stdout.close()
    found = re.search(r'<pre id="render-result">(.*?)</pre>', "".join(dom), re.S)
    if found and found.group(1).strip():
        return json.loads(html.unescape(found.group(1)))
    why = f"did not finish in {CHROMIUM_TIMEOUT_S} s" if timed_out else f"exit {proc.returncode}, no render result"
    return (f"chromium {why}; stderr:\n{stderr_path.read_text(errors='replace')[-4000:]}\n"
            f"stdout tail:\n{''.join(dom)[-2000:]}")


def assert_rendered(result: dict | str, expected: set[str]) -> None:
    if isinstance(result, str):
        pytest.fail(result)
    plots = {p["plot"]: p for p in result["plots"]}
    assert set(plots) == expected, result
    for name, p in plots.items():
        assert p["width"] > 100 and p["height"] > 50, (name, p)
        assert p["visible_marks"] >= 1 and p["visible_marks"] == p["marks"], (name, p)
        assert p["texts"] >= 3, (name, p)
        assert p["outside"] == 0, (name, p)
    assert not result["pwned"], "a <script> from the data ran"
    assert not result["overflow"] and not result["spilled"], result   # everything fits the page column


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, dict | str]:
    """The three reports rendered at once (Chromium start-up dominates, so run them side by side)."""
    binary = chromium_binary()
    xss = "<script>window.__pwned = true</script>"
    pages = {"estimated": render_profile_report(make_profile("estimated", hostname=xss)),
             "measured": render_profile_report(make_profile("measured", hostname=xss)),
             "compare": render_compare_report(make_compare("measured", "estimated"))}
    root = tmp_path_factory.mktemp("chromium")
    with ThreadPoolExecutor(max_workers=len(pages)) as pool:
        futures = {key: pool.submit(render_in_chromium, binary, page, root / key) for key, page in pages.items()}
        return {key: future.result() for key, future in futures.items()}


@pytest.mark.parametrize("energy, expected", [
    ("estimated", {"latency", "phases", "memory", "energy"}),
    ("measured", {"latency", "phases", "memory", "energy", "power"}),
])
def test_profile_report_renders_in_chromium(rendered, energy, expected):
    assert_rendered(rendered[energy], expected)
    latency = next(p for p in rendered[energy]["plots"] if p["plot"] == "latency")
    assert latency["marks"] >= 8                      # a real histogram, not one block


def test_compare_report_renders_in_chromium(rendered):
    assert_rendered(rendered["compare"],
                    {"compare-step-time", "compare-peak-rss", "compare-energy", "compare-phases"})
