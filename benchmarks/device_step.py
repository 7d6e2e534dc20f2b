"""Device benchmark: edgefa's runtime DFA step (onnxruntime + numpy) vs torch's BP step.

    .venv/bin/python benchmarks/device_step.py [--pairs N] [--quick]

Same MLP as benchmarks/host_step.py (input 1024, 8 x 1024 ReLU, 10 classes), batch 128, 2
intra-op threads on both sides, for plain SGD (momentum 0) and SGD momentum 0.9.

Each contender runs in its OWN process, so peak RSS (VmHWM) is per contender:
  runtime  benchmarks/_device_runtime_worker.py: OrtEngine.step on an exported bundle; it sets
           sys.modules['torch'] = None before anything else, so it cannot import torch.
  torch    benchmarks/_device_torch_worker.py: BP step, torch.optim.SGD via make_optimizer, the
           bundle's initial weights.
The parent builds the bundles (it may import torch; its own memory is not measured), starts both
workers and drives them over stdin/stdout lines: a turn on one worker, then a turn on the other,
in an order shuffled per pair (seeded). A turn is --steps-per-turn steps back to back (default
2) of which the last is timed, so the timed step runs as inside a training loop rather than
right after the other process's step, with its own thread pool just woken and the other's still
spinning. Each worker times its own steps, so pipe latency is not in the numbers. Pairing and the
stall rule: benchmarks/_pairs.py.

Targets: step time ratio runtime/torch <= 0.80 (both optimizers), peak RSS ratio <= 0.40.
Accepting a step only when it is finite is part of its honest cost: if the engine does it with
a full pass (np.sum over every new tensor, OrtEngine._all_finite), that pass is inside the step;
either way the worker times such a pass on its own, and the JSON gives its share.
Afterwards the runtime worker profiles a few steps with onnxruntime's profiler (per-op times).

Anchor (--anchor ort-training, the default): ONNX Runtime's own on-device training, what a user
would pick instead, joins the same pairs from its own venv (benchmarks/_ort_training_anchor.py):
its BP step (benchmarks/_device_ort_training_worker.py; plain SGD, the only SGD it offers) and
edgefa's runtime worker again on that venv's onnxruntime 1.19.2, so one ratio has the same engine
build on both sides. If the venv cannot be made, the JSON says why and the rest runs as before.
Writes benchmarks/results/device_step.json (or --out).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # this checkout's edgefa first

import numpy as np  # noqa: E402

from _pairs import fmt, load_now, machine_info, ms, ratio_summary, run_pairs, spread, write_json  # noqa: E402
import _ort_training_anchor as ort_anchor  # noqa: E402

IN, HIDDEN, CLASSES, BATCH = 1024, [1024] * 8, 10, 128
# lr does not change what a step computes, only the values. 1e-4 keeps both sides finite for the
# whole run on random data; at 0.01 DFA's loss explodes within ~20-70 steps here, and the runtime
# then spends the run refusing steps on huge weights. The JSON records losses and refusals.
LR, THREADS, SEED = 1e-4, 2, 0
MOMENTA = (0.0, 0.9)
TIME_TARGET, RSS_TARGET = 0.80, 0.40


def build_bundles(out: Path) -> dict[float, Path]:
    """One bundle per momentum, both exported from the same (untrained, seeded) DFA model."""
    import torch  # only the parent builds; neither worker inherits this import

    from edgefa.shared.datasets import Standardizer
    from edgefa.exporters.export import export_bundle
    from edgefa.models import MLP, MLPConfig
    from edgefa.training.trainer import Run, TrainConfig, make_optimizer

    paths = {}
    for m in MOMENTA:
        torch.manual_seed(SEED)
        model = MLP(MLPConfig(IN, list(HIDDEN), CLASSES, rule="dfa"))
        run = Run(model, make_optimizer(model, LR, m),
                  TrainConfig(method="dfa", hidden=list(HIDDEN), lr=LR, momentum=m),
                  Standardizer(0.0, 1.0), {"final_test_accuracy": None}, None)
        paths[m] = export_bundle(run, out / f"bundle_m{m}", momentum=m)
    return paths


class Worker:
    """A benchmark worker process spoken to in lines: send a command, read one JSON reply."""

    def __init__(self, script: str, *args: str, python: str = sys.executable):
        self.proc = subprocess.Popen([python, str(HERE / script), *args], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args[1]} exited (rc {self.proc.wait()})")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        self.proc.wait(timeout=60)


def compare(bundle: Path, momentum: float, pairs: int, warmup: int, profile_steps: int, per_turn: int,
            anchor: tuple[Path, Path] | None = None) -> dict:
    """anchor: (python of the ort-training venv, its artifacts for this bundle), or None."""
    args = ["--bundle", str(bundle), "--threads", str(THREADS), "--seed", str(SEED)]
    runtime = Worker("_device_runtime_worker.py", *args)
    torch_w = Worker("_device_torch_worker.py", *args, "--momentum", str(momentum))
    workers = {"runtime": runtime, "torch": torch_w}
    try:
        if anchor:  # ORT-training's BP and edgefa's runtime on its onnxruntime, in the same pairs
            workers.update(ort_anchor.start_workers(Worker, anchor[0], bundle, anchor[1], args))
        results, info = run_pairs({n: (lambda w=w: w.ask(f"step {per_turn}")) for n, w in workers.items()},
                                  pairs, warmup, seed=SEED, time_of=lambda r: r["t"])
        # Peak RSS first, before the profiling engine below adds its own buffers.
        mem = {n: w.ask("finish") for n, w in workers.items()}
        profile = runtime.ask(f"profile {profile_steps}") if profile_steps else None
    finally:
        for w in workers.values():
            w.close()

    rt, tc = results["runtime"], results["torch"]
    t_rt, t_tc = np.array([r["t"] for r in rt]), np.array([r["t"] for r in tc])
    t_check = np.array([r["t_check"] for r in rt])
    clean = np.array(info["clean"])
    summary = ratio_summary(t_rt, t_tc, "runtime", "torch", clean)
    summary["involuntary_context_switches_per_step"] = {"runtime": spread([r["nivcsw"] for r in rt]),
                                                        "torch": spread([r["nivcsw"] for r in tc])}
    rss_ratio = mem["runtime"]["peak_rss_bytes"] / mem["torch"]["peak_rss_bytes"]
    return {
        "momentum": momentum,
        "step": summary,
        "nan_inf_check": nan_inf_check(runtime.hello["full_pass_check_in_step"],
                                       t_rt[clean], t_tc[clean], t_check[clean], profile),
        "torch_phases_ms": {k: ms([r[k] for r, ok in zip(tc, clean) if ok])
                            for k in ("forward", "backward", "optimizer")},
        "losses_first_last": {"runtime": [rt[0]["loss"], rt[-1]["loss"]],
                              "torch": [tc[0]["loss"], tc[-1]["loss"]]},
        "numerics": {"runtime_refused_steps": mem["runtime"]["refused"],
                     "runtime_all_losses_finite": bool(np.isfinite([r["loss"] for r in rt]).all()),
                     "torch_all_losses_finite": bool(np.isfinite([r["loss"] for r in tc]).all()),
                     "torch_params_finite_at_end": mem["torch"]["params_finite"]},
        "memory": {"runtime": mem["runtime"], "torch": mem["torch"],
                   "peak_rss_ratio_runtime_over_torch": rss_ratio},
        "ort_profile": profile,
        "anchor_ort_training": (ort_anchor.summarize(results, mem, clean, momentum, ratio_summary, ms, spread)
                                if anchor else None),
        "targets": {"time_ratio_max": TIME_TARGET,
                    "time_met": bool(summary["ratio_stats"].get("median", np.inf) <= TIME_TARGET),
                    "rss_ratio_max": RSS_TARGET, "rss_met": bool(rss_ratio <= RSS_TARGET)},
        "pairs_info": info,
    }


BOUND_OPS = ("ReduceSumSquare", "Sqrt", "Unsqueeze", "Concat")  # the graph's finiteness-bound ops


def nan_inf_check(in_step: bool, t_rt, t_tc, t_check, profile: dict | None) -> dict:
    """The honest cost of accepting a step only when it is finite.

    A full pass (np.sum over every new tensor) is timed on its own after each step either way.
    If the engine checks that way, that pass is inside the runtime step and its share is given;
    if the engine proves finiteness from per-layer bounds computed in the graph instead, the step
    already contains that proof, and its in-graph ops' kernel time comes from the ORT profile."""
    out = {"full_pass_check_in_engine_step": in_step,
           "full_pass_np_sum_ms": ms(t_check),
           "full_pass_share_of_runtime_step": spread(t_check / t_rt)}
    if in_step:
        out["runtime_step_without_full_pass_over_torch"] = spread((t_rt - t_check) / t_tc)
    else:
        out["runtime_step_with_full_pass_added_over_torch"] = spread((t_rt + t_check) / t_tc)
    if profile:
        by_op = profile["kernel_ms_per_step_by_op"]
        out["in_graph_bound_ops_kernel_ms_per_step"] = sum(by_op.get(op, 0.0) for op in BOUND_OPS)
        out["in_graph_bound_ops"] = list(BOUND_OPS)
    return out


def report(r: dict) -> None:
    s, mem = r["step"], r["memory"]
    t = r["targets"]
    mib = 1 << 20
    print(f"momentum {r['momentum']}: {r['pairs_info']['pairs_clean']} clean pairs of {r['pairs_info']['pairs_run']} run")
    print(f"  runtime  {fmt(s['runtime_ms'], ' ms')}")
    print(f"  torch    {fmt(s['torch_ms'], ' ms')}")
    print(f"  runtime/torch per pair: {fmt(s['ratio_stats'])}  target <= {t['time_ratio_max']}: "
          f"{'met' if t['time_met'] else 'NOT met'}")
    cc = s["cross_check"]
    print(f"  all pairs: {fmt(s['all_pairs']['ratio_stats'])}; cross-check ratio of p10 times "
          f"{cc['p10_time_ratio']:.3f}, of min times {cc['min_time_ratio']:.3f}")
    c = r["nan_inf_check"]
    share = 100 * c["full_pass_share_of_runtime_step"]["median"]
    if c["full_pass_check_in_engine_step"]:
        print(f"  NaN/Inf full-pass check (in the step) {c['full_pass_np_sum_ms']['median']:.2f} ms = {share:.1f} % "
              f"of the runtime step; ratio without it {c['runtime_step_without_full_pass_over_torch']['median']:.3f}")
    else:
        print("  engine proves steps finite from in-graph bounds"
              + (f" ({c['in_graph_bound_ops_kernel_ms_per_step']:.2f} ms/step of kernels)"
                 if "in_graph_bound_ops_kernel_ms_per_step" in c else "")
              + f"; a full np.sum pass would add {c['full_pass_np_sum_ms']['median']:.2f} ms ({share:.1f} %), "
              f"ratio {c['runtime_step_with_full_pass_added_over_torch']['median']:.3f}")
    print(f"  peak RSS runtime {mem['runtime']['peak_rss_bytes'] / mib:.0f} MiB, torch "
          f"{mem['torch']['peak_rss_bytes'] / mib:.0f} MiB, ratio {mem['peak_rss_ratio_runtime_over_torch']:.3f}"
          f"  target <= {t['rss_ratio_max']}: {'met' if t['rss_met'] else 'NOT met'}")
    n = r["numerics"]
    if n["runtime_refused_steps"] or not (n["runtime_all_losses_finite"] and n["torch_all_losses_finite"]
                                          and n["torch_params_finite_at_end"]):
        print(f"  WARNING: non-finite numerics or refused steps ({n}); the timings are not of a sane model")
    if r.get("anchor_ort_training"):
        print("\n".join(ort_anchor.report_lines(r["anchor_ort_training"], fmt)))
    if r["ort_profile"]:
        p = r["ort_profile"]
        ops = ", ".join(f"{k} {v:.2f}" for k, v in list(p["kernel_ms_per_step_by_op"].items())[:6])
        print(f"  ORT kernels {p['kernel_ms_per_step_total']:.1f} ms/step: {ops}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=60, help="clean timed pairs per optimizer (default 60)")
    ap.add_argument("--warmup", type=int, default=8, help="warm-up pairs, discarded (default 8)")
    ap.add_argument("--profile-steps", type=int, default=20, help="onnxruntime-profiled steps (0: none)")
    ap.add_argument("--steps-per-turn", type=int, default=2,
                    help="steps a worker runs back to back per turn; the last is timed (default 2)")
    ap.add_argument("--quick", action="store_true", help="smoke check: 4 pairs, 2 warm-up, 3 profiled")
    ap.add_argument("--anchor", choices=("ort-training", "none"), default="ort-training",
                    help="also pair onnxruntime-training 1.19.2's BP step (its own venv, made once: "
                         "benchmarks/_ort_training_anchor.py); 'none' leaves it out")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default benchmarks/results/device_step.json)")
    args = ap.parse_args()
    pairs, warmup, prof = (4, 2, 3) if args.quick else (args.pairs, args.warmup, args.profile_steps)

    anchor_python, anchor_info = None, {"reason": "left out (--anchor none)"}
    if args.anchor == "ort-training":
        anchor_python, anchor_info = ort_anchor.ensure_venv()
        if anchor_python is None:
            print(f"ort-training anchor absent: {anchor_info['reason']}")
    # the load before the run, not when the JSON is written
    machine = machine_info({"ort_intra_op": THREADS, "ort_inter_op": 1, "torch_intra_op": THREADS})
    gc.collect()
    with tempfile.TemporaryDirectory(prefix="edgefa_bench_") as tmp:
        bundles = build_bundles(Path(tmp))
        anchors = {m: (anchor_python, Path(tmp) / f"ort_training_m{m}") for m in MOMENTA} if anchor_python else {}
        for m, (py, art) in anchors.items():
            anchor_info.setdefault("artifacts", ort_anchor.build_artifacts(py, bundles[m], art))
        runs = [compare(bundles[m], m, pairs, warmup, prof, args.steps_per_turn, anchors.get(m)) for m in MOMENTA]

    payload = {
        "benchmark": "device_step",
        "what": "edgefa runtime DFA step (OrtEngine.step, onnxruntime + numpy, no torch) vs torch BP "
                "step (same model, same optimizer), each in its own process, alternated pair by pair",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine,
        "config": {"in_features": IN, "hidden": HIDDEN, "n_classes": CLASSES, "batch": BATCH, "lr": LR,
                   "pairs": pairs, "warmup_pairs": warmup, "order": "shuffled within each pair (seeded)",
                   "timing": "each worker times its own step with perf_counter (no pipe latency)",
                   "steps_per_turn": f"{args.steps_per_turn} back to back, the last one timed: the timed "
                                     "step then runs as in a training loop, not right after the other "
                                     "process's step with its own threads just woken",
                   "stall_rule": "a pair is stalled when a step took > 2x its contender's fastest step; "
                                 "headline stats use the clean pairs (see benchmarks/_pairs.py)"},
        "results": runs,
        "anchor_ort_training": {"present": anchor_python is not None, **anchor_info},
        "targets_met": {f"momentum_{r['momentum']}": r["targets"] for r in runs},
        "load_at_end": load_now(),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
    path = args.out or write_json("device_step", payload)
    print(f"device step: {THREADS} threads each side, {args.steps_per_turn} steps per turn (last timed), "
          f"{warmup} warm-up pairs")
    for r in runs:
        report(r)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
