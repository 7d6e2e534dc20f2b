"""Runtime side of benchmarks/device_step.py: edgefa's OrtEngine.step, in a process without torch.

    python benchmarks/_device_runtime_worker.py --bundle DIR [--threads 2] [--seed 0]

Driven over stdin/stdout, one command per line, one JSON reply per line:
    step [K]    K (default 1) OrtEngine.step calls back to back on the next batches; reports the
                last: {"t": s, "t_check": s, "loss", "accepted", "nivcsw": involuntary context
                switches during it, "t_turn": every step's s}
    finish      -> peak RSS (VmHWM) and RSS of this process, read before anything else is built
    profile N   N steps on a second engine with onnxruntime profiling on -> per-op times
    quit
"""

import sys

sys.modules["torch"] = None  # type: ignore[assignment]  # before anything else: `import torch` now fails

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's edgefa first

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from edgefa.bundle import read_bundle  # noqa: E402
from edgefa.profiling.memory import peak_rss_bytes, rss_bytes  # noqa: E402
from edgefa.runtime import engine as engine_mod  # noqa: E402

BATCH = 128
PROVIDERS = ("CPUExecutionProvider",)  # the device here is a CPU; never pick up a GPU provider


def batches(in_features: int, n_classes: int, seed: int) -> list:
    """The same seeded random batches the torch worker uses (numpy's generator in both)."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((BATCH, in_features), dtype=np.float32),
             rng.integers(0, n_classes, BATCH).astype(np.int64)) for _ in range(4)]


# Older engines accepted a step after np.sum over every new tensor (`_all_finite`); newer ones
# prove it finite from per-layer bounds the graph returns, so no weight-sized pass is in the step.
FULL_PASS_CHECK_IN_STEP = hasattr(engine_mod.OrtEngine, "_all_finite")


def full_pass_finite(tensors: dict) -> bool:
    """np.sum over every tensor: one vectorised pass, any NaN or Inf poisons the sum."""
    return all(np.isfinite(np.sum(a)) for a in tensors.values())


def reply(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def profile_steps(bundle, threads: int, data: list, lr: float, n: int) -> dict:
    """Per-op kernel time from onnxruntime's own profiler, on the exact IOBinding path of
    OrtEngine.step: a second engine built while onnxruntime.InferenceSession is wrapped to switch
    profiling on in whatever SessionOptions the engine passes (all its other settings kept;
    nothing in edgefa is changed)."""
    prefix = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"edgefa_ort_profile_{os.getpid()}")
    original = ort.InferenceSession

    def profiled(path, sess_options=None, *args, **kwargs):
        sess_options = sess_options or ort.SessionOptions()
        sess_options.enable_profiling = True
        sess_options.profile_file_prefix = prefix
        return original(path, sess_options, *args, **kwargs)

    ort.InferenceSession = profiled
    try:
        eng = engine_mod.OrtEngine(bundle, providers=PROVIDERS, threads=threads)
    finally:
        ort.InferenceSession = original
    for i in range(3 + n):  # 3 warm-up steps, dropped below by keeping only the last n runs
        eng.step(*data[i % len(data)], lr)
    path = eng.train_session.end_profiling()
    events = json.loads(Path(path).read_text())
    Path(path).unlink(missing_ok=True)
    Path(eng.infer_session.end_profiling()).unlink(missing_ok=True)

    # Kernel events belong to the model_run they fall inside; per op (and per node) take the
    # median over the last n runs, so one disturbed run does not skew the breakdown.
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][-n:]
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run_op, per_run_node, op_of = [], [], {}
    for r in runs:
        by_op, by_node = defaultdict(float), defaultdict(float)
        for e in kernels:
            if r["ts"] <= e["ts"] <= r["ts"] + r["dur"]:
                node = e["name"][: -len("_kernel_time")]
                op_of[node] = e.get("args", {}).get("op_name", "?")
                by_op[op_of[node]] += e["dur"] / 1e3
                by_node[node] += e["dur"] / 1e3
        per_run_op.append(by_op)
        per_run_node.append(by_node)

    def medians(per_run):
        keys = {k for d in per_run for k in d}
        return {k: float(np.median([d.get(k, 0.0) for d in per_run])) for k in keys}

    op_ms, node_ms = medians(per_run_op), medians(per_run_node)
    top_nodes = sorted(node_ms.items(), key=lambda kv: -kv[1])[:25]
    return {"steps": len(runs), "statistic": "median over the profiled steps",
            "model_run_ms": float(np.median([r["dur"] / 1e3 for r in runs])),
            "kernel_ms_per_step_total": float(np.median([sum(d.values()) for d in per_run_op])),
            "kernel_ms_per_step_by_op": dict(sorted(op_ms.items(), key=lambda kv: -kv[1])),
            "top_nodes_ms_per_step": [{"node": k, "op": op_of[k], "ms": v} for k, v in top_nodes],
            "optimized_graph_nodes": {op: sum(1 for v in op_of.values() if v == op)
                                      for op in sorted(set(op_of.values()))}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rss_after_imports = rss_bytes()
    bundle = read_bundle(args.bundle)
    eng = engine_mod.OrtEngine(bundle, providers=PROVIDERS, threads=args.threads)
    lr = float(bundle.manifest["optimizer"]["lr"])
    data = batches(bundle.model["in_features"], bundle.model["n_classes"], args.seed)
    i, refused = 0, 0
    reply({"ready": True, "momentum": eng.momentum, "providers": eng.providers,
           "full_pass_check_in_step": FULL_PASS_CHECK_IN_STEP})

    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "step":
            times = []
            for _ in range(int(cmd[1]) if len(cmd) > 1 else 1):
                x, y = data[i % len(data)]
                i += 1
                cs0 = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
                t0 = time.perf_counter()
                result = eng.step(x, y, lr)
                times.append(time.perf_counter() - t0)
                nivcsw = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - cs0
                refused += not result.accepted
            # What a full-pass NaN/Inf check of the new (now current) state costs: np.sum over
            # every tensor, as OrtEngine._all_finite did. Timed on its own; it is inside `t` only
            # if this engine still checks that way (FULL_PASS_CHECK_IN_STEP).
            t1 = time.perf_counter()
            full_pass_finite(eng.sides[eng.current])
            t_check = time.perf_counter() - t1
            reply({"t": times[-1], "t_check": t_check, "loss": result.loss, "accepted": result.accepted,
                   "nivcsw": nivcsw, "t_turn": times})
        elif cmd[0] == "finish":
            reply({"peak_rss_bytes": peak_rss_bytes(), "rss_bytes": rss_bytes(),
                   "rss_after_imports_bytes": rss_after_imports, "steps": i, "refused": refused,
                   "torch_imported": sys.modules.get("torch") is not None,
                   "state_bytes": int(sum(a.nbytes for side in eng.sides for a in side.values())),
                   "bundle_arrays_bytes": int(sum(a.nbytes for a in bundle.weights.values())
                                              + sum(a.nbytes for a in bundle.feedback.values())),
                   "threads": {"ort_intra_op": args.threads, "ort_inter_op": 1}})
        elif cmd[0] == "profile":
            reply(profile_steps(bundle, args.threads, data, lr, int(cmd[1])))
        elif cmd[0] == "quit":
            return
        else:
            reply({"error": f"unknown command {cmd[0]!r}"})


if __name__ == "__main__":
    main()
