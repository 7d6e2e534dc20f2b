"""Profiler overhead: on-device fine-tuning steps with profiling on and off, side by side.

    .venv/bin/python benchmarks/profiler_overhead.py [--pairs N] [--steps-per-turn K] [--quick]

Two Finetuners (edgefa.runtime.finetune, the code `edgefa device finetune` and `edgefa profile`
run) on two copies of the same bundle, in this process:

    on   the profiler `edgefa profile` uses on this machine (open_profiler: its energy source or
         the estimate, a sampler thread reading energy and RSS every 20 ms), and every phase in
         a window: each step is a `batch` and a `train_step` window
    off  Profiler(enabled=False): every window is a shared no-op, no sampler thread

Each turn runs K steps back to back and reports the time per step; an "on" turn starts the
sampler thread before its steps and stops it after (a real run starts it once, so this overstates
the thread's cost). Turns alternate in a seeded shuffled order (benchmarks/_pairs.py), and the
headline is the median per-pair ratio on/off. Two models: the demo's MLP (64-256-256-10, a step
of a few tenths of a millisecond, where a fixed per-window cost weighs most) and a 784-1024-1024-10
MLP. Beside them, the cost of one window and of one sample, timed directly.

Target (issue 4): overhead at most 2 % of step time. Writes benchmarks/results/profiler_overhead.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's edgefa first

import numpy as np  # noqa: E402

from _pairs import fmt, load_now, machine_info, ratio_summary, run_pairs, write_json  # noqa: E402
from edgefa.bundle import read_bundle  # noqa: E402
from edgefa.profiling.machine import open_profiler  # noqa: E402
from edgefa.profiling.profiler import Profiler  # noqa: E402
from edgefa.profiling.session import synthetic_data  # noqa: E402
from edgefa.runtime.finetune import FinetuneConfig, Finetuner  # noqa: E402

MODELS = {"demo 64-256-256-10": (64, [256, 256]), "784-1024-1024-10": (784, [1024, 1024])}
BATCH, THREADS, SEED, LR = 32, 2, 0, 1e-4   # lr 1e-4: values stay finite over thousands of steps


def build_bundle(out: Path, inputs: int, hidden: list[int]) -> Path:
    import torch

    from edgefa.data import Standardizer
    from edgefa.exporters.export import export_bundle
    from edgefa.models import MLP, MLPConfig
    from edgefa.training.trainer import Run, TrainConfig, make_optimizer

    torch.manual_seed(SEED)
    model = MLP(MLPConfig(inputs, hidden, 10, rule="dfa"))
    run = Run(model, make_optimizer(model, LR, 0.9), TrainConfig(method="dfa", hidden=hidden, lr=LR, momentum=0.9),
              Standardizer(0.0, 1.0), {"final_test_accuracy": None}, None)
    return export_bundle(run, out, momentum=0.9)


class Contender:
    """A Finetuner and the next step to apply; `turn()` runs K steps and returns seconds per step."""

    def __init__(self, bundle_dir: Path, profiler: Profiler, sample: bool, k: int):
        bundle = read_bundle(bundle_dir)
        data = synthetic_data(bundle, 4096, SEED)
        self.tuner = Finetuner(bundle, data, FinetuneConfig(steps=10**9, batch_size=BATCH, lr=LR, seed=SEED,
                                                            threads=THREADS), profiler=profiler)
        self.profiler, self.sample, self.k, self.step = profiler, sample, k, 0

    def turn(self) -> float:
        if self.sample:
            self.profiler.start()
        t0 = time.perf_counter()
        for _ in range(self.k):
            result = self.tuner.train_step(self.step)
            self.step += 1
        seconds = (time.perf_counter() - t0) / self.k
        if self.sample:
            self.profiler.stop()
        assert result.accepted and np.isfinite(result.loss)
        return seconds


def unit_costs(reps: int = 200_000) -> dict:
    """One window (enter + exit) and one sample (energy source or estimate, plus /proc RSS)."""
    p, _ = open_profiler()
    t0 = time.perf_counter()
    for _ in range(reps):
        with p.window("w"):
            pass
    window_ns = (time.perf_counter() - t0) / reps * 1e9
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        p.sample_now()
    sample_us = (time.perf_counter() - t0) / n * 1e6
    return {"window_ns": window_ns, "sample_us": sample_us}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--steps-per-turn", type=int, default=25)
    ap.add_argument("--quick", action="store_true", help="smoke check: 4 pairs")
    args = ap.parse_args()
    pairs = 4 if args.quick else args.pairs
    load_start = load_now()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (inputs, hidden) in MODELS.items():
            src = build_bundle(Path(tmp) / name.split()[-1], inputs, hidden)
            shutil.copytree(src, Path(tmp) / f"{src.name}-off")
            on_profiler, machine = open_profiler(warmup=0)
            on = Contender(src, on_profiler, sample=True, k=args.steps_per_turn)
            off = Contender(Path(tmp) / f"{src.name}-off", Profiler(enabled=False), sample=False,
                            k=args.steps_per_turn)
            times, info = run_pairs({"on": on.turn, "off": off.turn}, pairs, args.warmup, SEED)
            summary = ratio_summary(times["on"], times["off"], "on", "off", info["clean"])
            # no clean pair at all (a machine stalling throughout): say so and use every pair
            headline = summary["ratio_stats"] if summary["ratio_stats"].get("n") else summary["all_pairs"]["ratio_stats"]
            summary["headline_pairs"] = "clean" if summary["ratio_stats"].get("n") else "all (none clean)"
            summary["overhead_percent"] = 100 * (headline["median"] - 1)
            summary["energy"] = machine.energy_line
            summary["windows_recorded_on"] = {n: len(s) for n, s in on_profiler.spans.items()}
            summary["pairs"] = {k: info[k] for k in ("pairs_run", "pairs_clean", "stall_factor")}
            results[name] = summary
            print(f"{name}: on/off per pair {fmt(headline)}  "
                  f"(on {np.median(times['on']) * 1e3:.3f} ms, off {np.median(times['off']) * 1e3:.3f} ms per step; "
                  f"overhead {summary['overhead_percent']:+.2f} %, {info['pairs_clean']}/{info['pairs_run']} clean pairs)")
    units = unit_costs()
    print(f"one window {units['window_ns']:.0f} ns, one sample {units['sample_us']:.1f} us")
    payload = {"benchmark": "profiler_overhead", "target": "on/off - 1 <= 2 % of step time",
               "machine": machine_info({"onnxruntime_intra_op": THREADS}),
               "config": {"batch": BATCH, "steps_per_turn": args.steps_per_turn, "pairs": pairs,
                          "warmup_pairs": args.warmup, "sample_interval_s": 0.02},
               "load": {"start": load_start, "end": load_now()},
               "unit_costs": units, "models": results,
               "target_met": all(r["overhead_percent"] <= 2.0 for r in results.values())}
    print(f"wrote {write_json('profiler_overhead', payload)}")


if __name__ == "__main__":
    main()
