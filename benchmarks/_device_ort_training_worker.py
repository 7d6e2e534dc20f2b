"""ONNX Runtime's own on-device training, the anchor of benchmarks/device_step.py (its own venv).

    benchmarks/.venv-ort-training/bin/python benchmarks/_device_ort_training_worker.py \
        --bundle DIR --artifacts DIR (--build | [--threads 2] [--seed 0])

What a user would pick instead of edgefa to train on a device without torch: onnxruntime-training
(last release 1.19.2, numpy < 2) with artifacts from `onnxruntime.training.artifacts.
generate_artifacts` -- a training graph (forward + cross-entropy + the full BP gradient graph), an
optimizer graph and a checkpoint -- driven by `onnxruntime.training.api` (Module, Optimizer).

--build   writes the artifacts for the bundle's MLP and exits. The forward graph is built here
          with onnx.helper from the bundle's own weights.npz (Gemm with transB=1 + Relu per layer,
          what torch.onnx.export writes for nn.Linear), so both sides start from the same weights.
          Run as its own process so that generating artifacts is never in the worker's peak RSS.
otherwise the worker loads the artifacts and answers, one JSON line per command on stdin:
    step [K]  K steps back to back on the next batches (the same seeded batches as the other
              workers); reports the last: {"t", "train_step", "optimizer", "reset_grad", "loss",
              "nivcsw", "t_turn": every step's s}. One step is Module.__call__ (train_step: forward,
              loss, backward), Optimizer.step, Module.lazy_reset_grad.
    finish    -> peak RSS (VmHWM), RSS, whether every parameter is finite
    quit

Optimizer: the artifacts API offers OptimType.AdamW and OptimType.SGD only, and its SGD
(com.microsoft SGDOptimizerV2) has no momentum: w <- w - lr * g. The C++ training API accepts no
other optimizer graph, so plain SGD is the closest to SGD with momentum 0.9 (see device_step.py).

`import onnxruntime.training` runs the package __init__, which imports torch (via .optim); the
artifacts and api subpackages need none of it. So the package is registered here as a bare
namespace over its own folder before those subpackages are imported, and torch is blocked:
this process, like edgefa's runtime worker, cannot import torch.
"""

import sys

sys.modules["torch"] = None  # type: ignore[assignment]  # before anything else: `import torch` now fails

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

BATCH = 128
OPSET, IR_VERSION = 17, 8  # what onnxruntime 1.19 loads (it reads IR <= 10; torch 2.x writes 8)
ORT_TRAINING_VERSION = "1.19.2"


def _training_namespace() -> None:
    """Make `onnxruntime.training.<sub>` importable without running onnxruntime/training/__init__.py."""
    pkg = types.ModuleType("onnxruntime.training")
    pkg.__path__ = [str(Path(ort.__file__).parent / "training")]
    sys.modules["onnxruntime.training"] = pkg


def peak_rss_bytes() -> int:
    """VmHWM from /proc (as edgefa.profiling.memory reads it; edgefa is not importable here:
    this venv holds numpy < 2 and no edgefa dependencies)."""
    return _proc_status_kib("VmHWM") * 1024


def rss_bytes() -> int:
    return _proc_status_kib("VmRSS") * 1024


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def batches(in_features: int, n_classes: int, seed: int) -> list:
    """The same seeded random batches the other workers use (numpy's generator in all)."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((BATCH, in_features), dtype=np.float32),
             rng.integers(0, n_classes, BATCH).astype(np.int64)) for _ in range(4)]


def forward_model(bundle: Path):
    """The bundle's MLP as a plain forward ONNX graph: x -> (Gemm + Relu) per hidden layer -> Gemm."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    manifest = json.loads((bundle / "manifest.json").read_text())
    topo = manifest["model"]
    if topo["activation"] != "relu":
        raise SystemExit(f"ort-training anchor: only relu MLPs are built here, not {topo['activation']!r}")
    layers = topo["layers"]
    names = [f"fc{i}" for i in range(len(layers) - 1)] + ["head"]
    nodes, inits, h = [], [], "input"
    with np.load(bundle / "weights.npz", allow_pickle=False) as z:
        for k, name in enumerate(names):
            inits += [numpy_helper.from_array(z[f"{name}.weight"], f"{name}.weight"),
                      numpy_helper.from_array(z[f"{name}.bias"], f"{name}.bias")]
            out = "logits" if name == "head" else f"{name}.pre"
            nodes.append(helper.make_node("Gemm", [h, f"{name}.weight", f"{name}.bias"], [out], transB=1))
            if name != "head":
                nodes.append(helper.make_node("Relu", [out], [f"{name}.out"]))
                h = f"{name}.out"
    graph = helper.make_graph(
        nodes, "edgefa_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", topo["in_features"]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", topo["n_classes"]])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model, [t.name for t in inits]


def build(bundle: Path, out: Path) -> dict:
    _training_namespace()
    from onnxruntime.training import artifacts

    model, params = forward_model(bundle)
    out.mkdir(parents=True, exist_ok=True)
    artifacts.generate_artifacts(model, requires_grad=params, frozen_params=[],
                                 loss=artifacts.LossType.CrossEntropyLoss,
                                 optimizer=artifacts.OptimType.SGD, artifact_directory=out)
    return {"built": sorted(p.name for p in out.iterdir()), "params": len(params)}


def reply(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--build", action="store_true", help="write the training artifacts and exit")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ort.set_default_logger_severity(3)  # errors only: artifact building logs every graph pass at INFO
    bundle, art = Path(args.bundle), Path(args.artifacts)
    if ort.__version__ != ORT_TRAINING_VERSION:
        raise SystemExit(f"ort-training anchor: needs onnxruntime-training {ORT_TRAINING_VERSION}, "
                         f"found onnxruntime {ort.__version__}")
    if args.build:
        reply(build(bundle, art))
        return

    rss_after_imports = rss_bytes()
    _training_namespace()
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    manifest = json.loads((bundle / "manifest.json").read_text())
    opts = ort.SessionOptions()  # as edgefa's OrtEngine: N intra-op threads, 1 inter-op, all graph opts
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    state = CheckpointState.load_checkpoint(art / "checkpoint")
    module = Module(art / "training_model.onnx", state, device="cpu", session_options=opts)
    optimizer = Optimizer(art / "optimizer_model.onnx", module)
    lr = float(manifest["optimizer"]["lr"])
    optimizer.set_learning_rate(lr)
    module.train()
    data = batches(manifest["model"]["in_features"], manifest["model"]["n_classes"], args.seed)
    i = 0
    reply({"ready": True, "onnxruntime": ort.__version__, "numpy": np.__version__,
           "optimizer": "SGD (SGDOptimizerV2, no momentum)", "lr": optimizer.get_learning_rate()})

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
                loss = module(x, y)          # train_step: forward, loss, backward (gradients kept)
                t1 = time.perf_counter()
                optimizer.step()              # optimizer graph: w <- w - lr * g
                t2 = time.perf_counter()
                module.lazy_reset_grad()      # the next train_step overwrites instead of accumulating
                t3 = time.perf_counter()
                times.append(t3 - t0)
                nivcsw = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - cs0
            reply({"t": times[-1], "train_step": t1 - t0, "optimizer": t2 - t1, "reset_grad": t3 - t2,
                   "loss": float(np.asarray(loss)), "nivcsw": nivcsw, "t_turn": times})
        elif cmd[0] == "finish":
            reply({"peak_rss_bytes": peak_rss_bytes(), "rss_bytes": rss_bytes(),
                   "rss_after_imports_bytes": rss_after_imports, "steps": i,
                   "params_finite": all(bool(np.isfinite(p.data).all()) for _, p in state.parameters),
                   "torch_imported": sys.modules.get("torch") is not None,
                   "threads": {"ort_intra_op": args.threads, "ort_inter_op": 1}})
        elif cmd[0] == "quit":
            return
        else:
            reply({"error": f"unknown command {cmd[0]!r}"})


if __name__ == "__main__":
    main()
