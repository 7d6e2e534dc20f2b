"""Run every speed and memory benchmark, then rewrite the one results table in README.md.

    .venv/bin/python benchmarks/run_all.py --quick        # smoke settings, a few minutes
    .venv/bin/python benchmarks/run_all.py --full         # each script's own defaults (an hour or more)
    .venv/bin/python benchmarks/run_all.py --quick --only link,backends
    .venv/bin/python benchmarks/run_all.py --full --table-only   # re-render the table from the JSON

Each script runs as its own process, one after the other (they time things; two at once would
time each other), with its `--quick` flag or with no flag at all for its full setting. Full runs
write benchmarks/results/<name>.json as each script always has; quick runs write
benchmarks/results/quick/ (EDGEFA_BENCH_RESULTS, read by _pairs.write_json), so a smoke run never
overwrites a full result. A script that fails leaves its row saying so and the others still run;
run_all then exits non-zero.

The table between `<!-- bench:begin -->` and `<!-- bench:end -->` in README.md is replaced whole:
the date, the machine (CPU model, cores), the commit (`+dirty` with uncommitted changes), the load
average before and after, and one row per measure: figure, target, met. Which JSON key gives
which figure is the ROWS table below, the one place that knows the scripts' schemas; a key a
script no longer writes shows as "missing: KEY" in the table instead of failing the run.

Not run here:
* soak.py: a 2-hour reliability run (failures, RSS growth, latency drift), not a speed figure;
  its `--minutes 5` version is in CI as tests/test_soak.py.
* accuracy_table.py: accuracy of the learning rules on the data sets (minutes to hours of
  training), not speed or memory.
* cuda_train.py, divergence_rule.py: need a CUDA GPU, or measure when a rule fires, not speed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from _pairs import cpu_model  # noqa: E402  (numpy and the standard library only)

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
SCRIPTS = ("host_step", "device_step", "fpga_matmul", "feature_cache", "backends", "link",
           "profiler_overhead", "step_ratio")
QUICK_DIR = BENCH / "results" / "quick"


# --- where each figure lives in each script's JSON ---------------------------------------------

class Missing(Exception):
    """A key the mapping expects is not in the script's JSON."""


def get(data, path: str):
    """data["a"]["b"]... for path "a.b"; a list step "[key=value]" picks the item whose key has
    that value (device_step's results per momentum)."""
    node = data
    for part in re.findall(r"\[[^\]]*\]|[^.]+", path):
        if part.startswith("[") and part.endswith("]"):
            key, value = part[1:-1].split("=")
            node = next((item for item in node if str(item.get(key)) == value), None)
        elif isinstance(node, dict):
            node = node.get(part.replace("~", "."))     # "~" stands for a dot inside a key
        else:
            node = None
        if node is None:
            raise Missing(path)
    return node


def device(momentum: str, path: str) -> str:
    return f"results.[momentum={momentum}].{path}"


# (script, measure, figure: path in its JSON or a function of it, target: (op, bound) or None)
Figure = Callable[[dict], float] | str
ROWS: list[tuple[str, str, Figure, tuple[str, float] | None]] = [
    ("host_step", "host DFA step / BP step, MLP 1024-8x1024-10 (median of pair ratios)",
     "step.ratio_stats.median", ("<=", 0.70)),
    ("host_step", "host DFA step / GEMM floor (the step's GEMMs alone)", "ratios_per_pair.dfa/gemm_floor.median", None),
    ("host_step", "anchor: biotorch DFA step / torch BP step", "ratios_per_pair.biotorch_dfa/bp.median", None),
    ("host_step", "anchor: host DFA step / biotorch DFA step", "ratios_per_pair.dfa/biotorch_dfa.median", None),
    ("device_step", "anchor: device DFA step / ORT-training BP step (same onnxruntime), momentum 0.9",
     device("0.9", "anchor_ort_training.step_runtime_same_build_over_ort_training.ratio_stats.median"), ("<=", 0.58)),
    ("device_step", "device DFA step / torch BP step, momentum 0.9", device("0.9", "step.ratio_stats.median"),
     ("<=", 0.80)),
    ("device_step", "device peak RSS / torch, momentum 0.9", device("0.9", "memory.peak_rss_ratio_runtime_over_torch"),
     ("<=", 0.40)),
    ("device_step", "device DFA step / torch BP step, plain SGD", device("0.0", "step.ratio_stats.median"),
     ("<=", 0.80)),
    ("device_step", "device peak RSS / torch, plain SGD", device("0.0", "memory.peak_rss_ratio_runtime_over_torch"),
     ("<=", 0.40)),
    ("fpga_matmul", "Q8.8 matmul / numpy float64, worst run median",
     lambda d: max(get(d, "stability.run_medians")), ("<=", 2.5)),
    ("fpga_matmul", "Q8.8 matmul / numpy float64, spread of run medians", "stability.spread", ("<=", 0.25)),
    ("fpga_matmul", "apytypes / ours, worst run median",
     lambda d: min(get(r, "ratios.apytypes/ours.headline.median") for r in get(d, "runs")), (">=", 3.0)),
    ("feature_cache", "fine-tuning epoch with trunk cache / without", "verdict.epoch_ratio_median", ("<=", 0.2)),
    ("feature_cache", "device fc+head step on features / torch BP", "verdict.step_ratio_median", ("<=", 0.8)),
    ("backends", "resmlp DFA step, onnxruntime CPU, batch 32 (ms)", "step_ms_clean.onnxruntime CPU.median", None),
    ("link", "deploy frame overhead, TCP (% of bytes)", "targets.overhead_pct_tcp.value", ("<=", 2.0)),
    ("link", "deploy frame overhead, TCP + HMAC (% of bytes)", "targets.overhead_pct_tcp_hmac.value", ("<=", 2.0)),
    ("link", "deploy frame overhead, pty (% of bytes)", "targets.overhead_pct_pty.value", ("<=", 2.0)),
    ("link", "train round trip - device step, TCP loopback (ms, median)",
     "targets.round_trip_overhead_ms_tcp_loopback_median.value", ("<=", 1.0)),
    ("profiler_overhead", "profiler on/off - 1, demo 64-256-256-10 MLP (%)",
     "models.demo 64-256-256-10.overhead_percent", ("<=", 2.0)),
    ("profiler_overhead", "profiler on/off - 1, 784-1024-1024-10 MLP (%)",
     "models.784-1024-1024-10.overhead_percent", ("<=", 2.0)),
    ("step_ratio", "host DFA / BP step, resmlp (CPU)", "results.cpu.resmlp.ratios.dfa.ratio_stats.median", None),
    ("step_ratio", "host DFA / BP step, transformer (CPU)",
     "results.cpu.transformer.ratios.dfa.ratio_stats.median", None),
]


def figure_of(data: dict, figure: Figure) -> float:
    return float(get(data, figure) if isinstance(figure, str) else figure(data))


# --- running -------------------------------------------------------------------------------------

def result_path(name: str, quick: bool) -> Path:
    """Where the script's JSON lands: results/<name>.json, or under results/quick/ (some scripts
    name their quick output <name>_quick.json)."""
    if not quick:
        return BENCH / "results" / f"{name}.json"
    plain, suffixed = QUICK_DIR / f"{name}.json", QUICK_DIR / f"{name}_quick.json"
    return suffixed if suffixed.is_file() and not plain.is_file() else plain


BIOTORCH = "biotorch==0.0.16"   # the host benchmark's anchor (the `bench` extra in pyproject.toml)


def ensure_biotorch() -> str:
    """biotorch in this interpreter, installed with --no-deps where it is missing: its metadata
    asks for torchvision (which pins its own torch), jupyter and tensorboard, none of which its DFA
    needs. Returns what happened; host_step.py records the anchor as absent if this failed."""
    probe = subprocess.run([sys.executable, "-c", "import biotorch"], capture_output=True)
    if probe.returncode == 0:
        return "present"
    got = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", BIOTORCH],
                         capture_output=True, text=True)
    return "installed" if got.returncode == 0 else f"absent ({(got.stderr.strip().splitlines() or ['?'])[-1]})"


def run_script(name: str, quick: bool) -> tuple[bool, float, str]:
    """One benchmark in its own process; (ok, seconds, last lines of its output)."""
    args = [sys.executable, str(BENCH / f"{name}.py")]
    env = dict(os.environ)
    if quick:
        args.append("--quick")
        QUICK_DIR.mkdir(parents=True, exist_ok=True)
        env["EDGEFA_BENCH_RESULTS"] = str(QUICK_DIR)
        for stale in (QUICK_DIR / f"{name}.json", QUICK_DIR / f"{name}_quick.json"):
            stale.unlink(missing_ok=True)             # a failed run must not leave an old figure behind
    if name == "link":                                # link.py names its output file itself
        args += ["--out", str(result_path(name, quick))]
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
    return proc.returncode == 0, time.perf_counter() - start, tail


# --- the table -----------------------------------------------------------------------------------

def fmt_value(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def table_rows(names, quick: bool, failed: dict[str, str]) -> list[str]:
    rows = ["| benchmark | measure | figure | target | met |", "|---|---|---|---|---|"]
    for name, measure, figure, target in ROWS:
        if name not in names:
            continue
        aim = f"{target[0]} {target[1]:g}" if target else "-"
        path = result_path(name, quick)
        if name in failed:
            value, met = f"failed: {failed[name]}", "no"
        elif not path.is_file():
            value, met = "not run", "-"
        else:
            try:
                number = figure_of(json.loads(path.read_text()), figure)
                value = fmt_value(number)
                met = "-" if target is None else (
                    "yes" if (number <= target[1] if target[0] == "<=" else number >= target[1]) else "no")
            except (Missing, ValueError, TypeError, StopIteration) as exc:
                value, met = f"missing: {exc}", "-"
        rows.append(f"| `{name}.py` | {measure} | {value} | {aim} | {met} |")
    return rows


def commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def render(names, quick: bool, failed: dict[str, str], load_before, load_after, seconds: float | None) -> str:
    setting = "--quick (smoke settings: few pairs, small models; not the figures to quote)" if quick else "--full"
    header = [
        f"Written by `benchmarks/run_all.py {'--quick' if quick else '--full'}` on "
        f"{dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}: {cpu_model()}, {os.cpu_count()} cores, "
        f"commit {commit()}, "
        + (f"load average {load_before[0]:.2f} before / {load_after[0]:.2f} after, {seconds / 60:.1f} min"
           if seconds is not None else "table re-rendered from the JSON already there (--table-only)")
        + f". Setting: {setting}. JSON: "
        f"`benchmarks/results/{'quick/' if quick else ''}`.",
        "",
    ]
    return "\n".join([BEGIN, *header, *table_rows(names, quick, failed), END])


def rewrite_readme(readme: Path, block: str) -> None:
    text = readme.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"run_all: {readme} needs exactly one {BEGIN} ... {END} pair; table not written")
    start, end = text.index(BEGIN), text.index(END) + len(END)
    readme.write_text(text[:start] + block + text[end:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="each script's --quick smoke setting")
    mode.add_argument("--full", action="store_true", help="each script's full default setting")
    ap.add_argument("--only", default=",".join(SCRIPTS), help=f"comma-separated subset of {','.join(SCRIPTS)}")
    ap.add_argument("--table-only", action="store_true", help="run nothing: the table from the JSON already there")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md", help="the file whose table is rewritten")
    args = ap.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown:
        raise SystemExit(f"run_all: unknown benchmark {', '.join(unknown)}; expected some of {', '.join(SCRIPTS)}")
    if not args.readme.is_file():
        raise SystemExit(f"run_all: {args.readme}: no such file")
    load_before, failed, start = os.getloadavg(), {}, time.perf_counter()
    if not args.table_only:
        if "host_step" in names:
            print(f"run_all: biotorch {ensure_biotorch()}", flush=True)
        for name in names:
            print(f"run_all: {name} ...", flush=True)
            ok, seconds, tail = run_script(name, args.quick)
            print(f"run_all: {name} {'done' if ok else 'FAILED'} in {seconds:.0f} s", flush=True)
            if not ok:
                failed[name] = (tail.splitlines() or ["no output"])[-1][:160].replace("|", "/")
                print(tail, file=sys.stderr)
    block = render(names, args.quick, failed, load_before, os.getloadavg(),
                   None if args.table_only else time.perf_counter() - start)
    rewrite_readme(args.readme, block)
    print(block)
    if failed:
        raise SystemExit(f"run_all: {len(failed)} benchmark(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
