"""Every engine backend this machine has, side by side on one bundle: a DFA step, an evaluation
batch, and (for edgefa's own TensorRT engines) the refit that puts new weights into the inference
engine.

    .venv/bin/python benchmarks/backends.py [--pairs N] [--quick]

Contenders, each the runtime's own engine on its own copy of the same bundle (a pre-LN residual
MLP, 784 -> 256 x 4 blocks -> 10, batch 32, SGD momentum 0.9, lr 1e-4 so values stay finite):

    onnxruntime CPU            OrtEngine, CPUExecutionProvider (always here: the baseline)
    onnxruntime CUDA / TRT EP  OrtEngine with that provider, where this onnxruntime offers it
    tensorrt                   TensorRTEngine on engines built first (the build time is reported)

Per pair every contender runs one step turn (K steps, time per step) in a seeded shuffled order
(benchmarks/_pairs.py); evaluations (predict_logits on 256 samples) are timed the same way, with
no step between them, so no refit is in them. The refit is timed on its own: a step, then one
evaluation, minus an evaluation without a step before it. A backend that is absent is listed
with the reason. Writes benchmarks/results/backends.json (--quick: backends_quick.json).
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
import onnxruntime as ort  # noqa: E402

from _pairs import fmt, load_now, machine_info, ms, run_pairs, write_json  # noqa: E402
from edgefa.bundle import read_bundle  # noqa: E402
from edgefa.runtime.backends import TENSORRT_BACKEND  # noqa: E402
from edgefa.runtime.cuda_memory import cuda_missing  # noqa: E402
from edgefa.runtime.engine import OrtEngine  # noqa: E402
from edgefa.runtime.tensorrt_build import tensorrt_missing  # noqa: E402

BATCH, EVAL_BATCH, LR, SEED, THREADS = 32, 256, 1e-4, 0, 2
GPU_PROVIDERS = {"onnxruntime CUDA EP": "CUDAExecutionProvider", "onnxruntime TensorRT EP": "TensorrtExecutionProvider"}


def build_bundle(out: Path, inputs: int, width: int, depth: int) -> Path:
    import torch

    from edgefa.shared.datasets import Standardizer
    from edgefa.exporters.export import export_bundle
    from edgefa.training.trainer import Run, TrainConfig, build_model, make_optimizer

    torch.manual_seed(SEED)
    config = TrainConfig(method="dfa", model="resmlp", width=width, depth=depth, lr=LR, momentum=0.9)
    model = build_model(config, inputs, 10)
    run = Run(model, make_optimizer(model, LR, 0.9), config, Standardizer(0.0, 1.0), {"final_test_accuracy": None})
    return export_bundle(run, out, momentum=0.9)


def open_contenders(bundle_dir: Path, scratch: Path) -> tuple[dict, dict, dict]:
    """name -> engine for every backend here; name -> why not for the rest; extra figures."""
    engines, absent, extra = {}, {}, {}

    def copy(name: str) -> Path:
        dst = scratch / name.replace(" ", "_")
        shutil.copytree(bundle_dir, dst)
        return dst

    engines["onnxruntime CPU"] = OrtEngine(read_bundle(copy("cpu")), ("CPUExecutionProvider",), THREADS)
    for name, provider in GPU_PROVIDERS.items():
        if provider in ort.get_available_providers():
            engines[name] = OrtEngine(read_bundle(copy(name)), (provider, "CPUExecutionProvider"), THREADS)
        else:
            absent[name] = f"this onnxruntime ({ort.__version__}) has no {provider}"
    why_not = tensorrt_missing() or cuda_missing()
    if why_not:
        absent[TENSORRT_BACKEND] = why_not
    else:
        from edgefa.runtime.tensorrt_build import build_bundle_engines
        from edgefa.runtime.tensorrt_engine import TensorRTEngine

        path = copy(TENSORRT_BACKEND)
        t0 = time.perf_counter()
        extra["tensorrt_engines"] = build_bundle_engines(path)
        extra["tensorrt_build_s"] = time.perf_counter() - t0
        engines[TENSORRT_BACKEND] = TensorRTEngine(read_bundle(path))
    return engines, absent, extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=40, help="clean timed pairs (default 40)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps-per-turn", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smoke check: a small model, 3 pairs")
    args = ap.parse_args()
    if args.quick:
        args.pairs, args.warmup, args.steps_per_turn = 3, 1, 2
    inputs, width, depth = (64, 32, 2) if args.quick else (784, 256, 4)

    rng = np.random.default_rng(SEED)
    X = rng.normal(size=(4096, inputs)).astype(np.float32)
    y = rng.integers(0, 10, len(X))
    with tempfile.TemporaryDirectory(prefix="edgefa-backends-") as tmp:
        bundle_dir = build_bundle(Path(tmp) / "bundle", inputs, width, depth)
        engines, absent, extra = open_contenders(bundle_dir, Path(tmp))
        cursor = {name: 0 for name in engines}

        def step_turn(name):
            def turn():
                engine, t0 = engines[name], time.perf_counter()
                for _ in range(args.steps_per_turn):
                    i = cursor[name] % (len(X) // BATCH)
                    r = engine.step(X[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH], LR)
                    cursor[name] += 1
                    assert r.accepted and np.isfinite(r.loss)
                return (time.perf_counter() - t0) / args.steps_per_turn
            return turn

        def eval_turn(name):
            def turn():
                t0 = time.perf_counter()
                engines[name].predict_logits(X[:EVAL_BATCH], batch_size=EVAL_BATCH)
                return time.perf_counter() - t0
            return turn

        steps, step_info = run_pairs({n: step_turn(n) for n in engines}, args.pairs, args.warmup, SEED)
        for n in engines:                                   # refit once (if any), outside the timing
            engines[n].predict_logits(X[:EVAL_BATCH], batch_size=EVAL_BATCH)
        evals, eval_info = run_pairs({n: eval_turn(n) for n in engines}, args.pairs, args.warmup, SEED + 1)
        refit = {}
        for n, engine in engines.items():
            with_step = []
            for i in range(max(args.pairs // 4, 3)):
                engine.step(X[:BATCH], y[:BATCH], LR)
                t0 = time.perf_counter()
                engine.predict_logits(X[:EVAL_BATCH], batch_size=EVAL_BATCH)
                with_step.append(time.perf_counter() - t0)
            refit[n] = float(np.median(with_step) - np.median(evals[n]))

    clean = {"steps": step_info["clean"], "evals": eval_info["clean"]}
    result = {
        "benchmark": "backends",
        "what": "DFA step (batch 32) and evaluation (batch 256) per engine backend, same bundle, paired turns",
        "model": {"kind": "resmlp", "in_features": inputs, "width": width, "depth": depth, "n_classes": 10},
        "machine": machine_info({"onnxruntime_intra_op": THREADS}),
        "config": {"pairs": args.pairs, "warmup": args.warmup, "steps_per_turn": args.steps_per_turn,
                   "batch": BATCH, "eval_batch": EVAL_BATCH, "lr": LR, "quick": args.quick},
        "absent": absent,
        "step_ms_clean": {n: ms([t for t, c in zip(steps[n], clean["steps"]) if c]) for n in engines},
        "eval_ms_clean": {n: ms([t for t, c in zip(evals[n], clean["evals"]) if c]) for n in engines},
        "eval_after_a_step_minus_eval_ms (the refit, where the backend has one)":
            {n: v * 1e3 for n, v in refit.items()},
        "providers": {n: list(e.providers) for n, e in engines.items()},
        **{k: v for k, v in extra.items()},
        "raw_s": {"steps": steps, "evals": evals},
        "pairs": {"steps": step_info, "evals": eval_info},
        "load_at_end": load_now(),
    }
    path = write_json("backends_quick" if args.quick else "backends", result)
    for n in engines:
        print(f"{n:28s} step {fmt(result['step_ms_clean'][n], ' ms')}   eval {fmt(result['eval_ms_clean'][n], ' ms')}")
    for n, why in absent.items():
        print(f"{n:28s} absent: {why}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
