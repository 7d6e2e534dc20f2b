"""Frozen trunk, cached features: what the cache saves on the device, and the trained part's step
against torch's BP step of the same part.

    .venv/bin/python benchmarks/feature_cache.py [--pairs N] [--warmup N] [--threads 1] [--quick] [--out DIR]

The model: edgefa's CNN (models/cnn.py) on 3x32x32 inputs, 3 conv stages (16, 32, 64 channels,
conv3 + ReLU + max-pool 2), fc 1024 -> 128, head 128 -> 10, exported with `--trainable last:2`:
the three conv stages are the frozen trunk (torch.onnx export, trunk.onnx), fc + head the part the
device trains by DFA. The trunk's share of the forward FLOPs is counted from the graphs
(exporters/graph_cost.py) and written to the JSON; it must be >= 90 %.

(a) epoch: one fine-tuning epoch after the first (16 steps of batch 32 over 512 samples), timed
    around `Finetuner.train_step` for every step of the epoch (the code `edgefa device finetune`
    runs: batch selection, the profiler's windows, the step), with the feature cache (filled in
    the untimed first epoch: the trunk never runs again) against without it (every step runs
    train_step.onnx, trunk included). Target: cached / uncached <= 0.2.
(b) step: one step of the trained part (fc + head) at batch 32, on the same batches of trunk
    features, on both sides:
      device  OrtEngine.step_features: head_step.onnx through IOBinding on the ping-pong sides
              (forward, DFA error projection e B, updates, momentum), the update-bound proof of
              finiteness and the side flip; the features already in memory (the cache's rows)
      torch   fc + head as torch modules taking the same features: forward + cross-entropy,
              zero_grad(set_to_none=True), backward (BP), torch.optim.SGD(momentum 0.9) step
    Target: device / torch <= 0.8.
    Beside it, for context (not a target): torch's usual frozen-trunk step on raw samples (the
    whole CNN forward with the convs' requires_grad=False, backward and SGD over fc + head only)
    against the device's whole step on raw samples (train_step.onnx, trunk included).

Both sides run in this process, 1 intra-op thread each by default (onnxruntime and torch), so no
thread pool spins beside the other's step. Pairs, shuffled order, warm-up, stall rule and
statistics: benchmarks/_pairs.py (median of per-pair ratios). lr 1e-4 (values stay finite on
random data; lr changes no operation). Writes <out>/feature_cache.json (--quick: a smaller CNN,
4 pairs, feature_cache_quick.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's edgefa first
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from _pairs import RESULTS_DIR, fmt, load_now, machine_info, ratio_summary, run_pairs  # noqa: E402
from edgefa.bundle import HEAD_STEP_GRAPH, TRUNK_GRAPH, part_topology, read_bundle, trunk_of  # noqa: E402
from edgefa.device_profiles.budget import step_cost  # noqa: E402
from edgefa.exporters.export import export_bundle  # noqa: E402
from edgefa.exporters.graph_cost import per_sample_cost  # noqa: E402
from edgefa.models import CNN, NetConfig  # noqa: E402
from edgefa.profiling.profiler import Profiler  # noqa: E402
from edgefa.runtime.engine import OrtEngine  # noqa: E402
from edgefa.runtime.finetune import FinetuneConfig, Finetuner  # noqa: E402
from edgefa.shared.batches import batch_indices  # noqa: E402
from edgefa.shared.datasets import Dataset, Standardizer  # noqa: E402
from edgefa.training.trainer import Run, TrainConfig, make_optimizer  # noqa: E402

LR, MOMENTUM, SEED, CLASSES, BATCH = 1e-4, 0.9, 0, 10, 32
EPOCH_TARGET, STEP_TARGET, TRUNK_SHARE_TARGET = 0.2, 0.8, 0.9
# in_shape, base width, conv stages, samples (16 steps of 32 per epoch)
SETUP = {"in_shape": [3, 32, 32], "width": 16, "depth": 3, "samples": 512}
QUICK_SETUP = {"in_shape": [3, 16, 16], "width": 8, "depth": 2, "samples": 128}


def build(setup: dict, out: Path) -> tuple[Path, CNN]:
    torch.manual_seed(SEED)
    cfg = NetConfig("cnn", setup["in_shape"], CLASSES, rule="dfa", width=setup["width"], depth=setup["depth"])
    model = CNN(cfg)
    run = Run(model, make_optimizer(model, LR, MOMENTUM), TrainConfig(method="dfa", model="cnn", lr=LR, momentum=MOMENTUM),
              Standardizer(0.0, 1.0), {"final_test_accuracy": None})
    return export_bundle(run, out, trainable="last:2"), model


def flops(bundle_path: Path) -> dict:
    """Forward FLOPs per sample of the trunk and of the part (from their graphs), and of one DFA
    step at BATCH: whole (trunk included) and on features (the budget's step cost)."""
    b = read_bundle(bundle_path)
    trunk_f, _ = per_sample_cost(onnx.load(str(bundle_path / TRUNK_GRAPH)))
    part = part_topology(b.model)
    part_f = sum(2 * layer["in"] * layer["out"] for layer in part["layers"])
    whole = step_cost(b.model, BATCH, MOMENTUM, on_features=False).flops
    head = step_cost(b.model, BATCH, MOMENTUM, on_features=True).flops
    return {"trunk_forward_per_sample": trunk_f, "part_forward_per_sample": part_f,
            "trunk_share_of_forward": trunk_f / (trunk_f + part_f),
            "whole_dfa_step_at_batch": whole, "head_dfa_step_at_batch": head,
            "trunk_share_of_whole_step": 1 - head / whole,
            "how": "trunk: exporters/graph_cost.py on trunk.onnx (2 x MACs of Conv/Gemm/MatMul, 1 per output "
                   "element elsewhere); part: 2 x in x out of its Linear layers; steps: device_profiles.budget.step_cost"}


def epoch_turn(tuner: Finetuner, steps_per_epoch: int, epoch: list[int]):
    """One turn: every step of the next epoch (epoch[0] counts them, per tuner), timed whole."""
    def turn():
        first = epoch[0] * steps_per_epoch
        t0 = time.perf_counter()
        results = [tuner.train_step(s) for s in range(first, first + steps_per_epoch)]
        seconds = time.perf_counter() - t0
        epoch[0] += 1
        return seconds, all(r.accepted for r in results), results[-1].loss
    return turn


def measure_epochs(bundle_path: Path, work: Path, data: Dataset, pairs: int, warmup: int, threads: int) -> dict:
    tuners = {}
    for name, cache in (("cached", True), ("uncached", False)):
        copy = work / f"bundle_{name}"
        shutil.copytree(bundle_path, copy)
        tuners[name] = Finetuner(read_bundle(copy), data, FinetuneConfig(
            steps=10 ** 6, batch_size=BATCH, lr=LR, threads=threads, feature_cache=cache), profiler=Profiler())
    steps_per_epoch = len(data.y) // BATCH
    t0 = time.perf_counter()
    for s in range(steps_per_epoch):                    # the first epoch: fills the cache (untimed here)
        tuners["cached"].train_step(s)
    first_epoch_s = time.perf_counter() - t0
    assert tuners["cached"].cache.complete, "the first epoch left rows uncached"
    for s in range(steps_per_epoch):
        tuners["uncached"].train_step(s)
    epochs = {name: [1] for name in tuners}
    turns = {name: epoch_turn(t, steps_per_epoch, epochs[name]) for name, t in tuners.items()}
    gc.collect()
    gc.disable()
    try:
        results, info = run_pairs(turns, pairs, warmup, seed=SEED, time_of=lambda r: r[0])
    finally:
        gc.enable()
    cached, uncached = (np.array([r[0] for r in results[n]]) for n in ("cached", "uncached"))
    summary = ratio_summary(cached, uncached, "cached", "uncached", info["clean"])
    phases = {n: {k: v["count"] for k, v in t.profiler.summary(include_samples=False)["phases"].items()}
              for n, t in tuners.items()}
    for t in tuners.values():
        if t.cache is not None:
            t.cache.close()
        t.state_lock.release()
    return {**summary, "pairs_info": info, "steps_per_epoch": steps_per_epoch,
            "first_epoch_with_cache_filling_s": first_epoch_s,
            "feature_cache": tuners["cached"].cache.describe(),
            "windows_per_phase": phases,
            "all_steps_accepted": all(r[1] for n in results for r in results[n]),
            "includes": {"cached": "Finetuner.train_step for each step of an epoch after the first: batch "
                                   "selection, the cache's rows (all cached: no trunk), head_step.onnx via "
                                   "OrtEngine.step_features, its finiteness proof, profiler windows",
                         "uncached": "Finetuner.train_step for each step of the same epoch with "
                                     "feature_cache=False: batch selection, train_step.onnx (trunk + part) via "
                                     "OrtEngine.step, its finiteness proof, profiler windows"}}


def torch_part(model_bp: CNN):
    """fc + head of the host CNN as one module taking flat trunk features (BP trains it)."""
    return torch.nn.Sequential(model_bp.fc, model_bp.head)


def measure_steps(bundle_path: Path, model: CNN, data: Dataset, pairs: int, warmup: int, threads: int) -> dict:
    engines = {name: OrtEngine(read_bundle(bundle_path), ("CPUExecutionProvider",), threads)
               for name in ("head", "whole")}
    rng = np.random.default_rng(SEED)
    raw = [(data.X[idx], data.y[idx]) for idx in (rng.choice(len(data.y), BATCH, replace=False) for _ in range(4))]
    features = [(engines["head"].features(x), y) for x, y in raw]

    # torch: the same initial weights, rule "bp" (plain autograd), trunk frozen
    torch.manual_seed(SEED)
    bp = CNN(NetConfig("cnn", model.config.in_shape, CLASSES, rule="bp", width=model.config.width,
                       depth=model.config.depth))
    bp.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("feedback_")}, strict=False)
    frozen = CNN(NetConfig("cnn", model.config.in_shape, CLASSES, rule="bp", width=model.config.width,
                           depth=model.config.depth))
    frozen.load_state_dict(bp.state_dict())
    for p in frozen.convs.parameters():
        p.requires_grad_(False)
    part = torch_part(bp)
    opts = {"part": make_optimizer(part, LR, MOMENTUM), "frozen": make_optimizer(frozen, LR, MOMENTUM)}
    assert len(opts["frozen"].param_groups[0]["params"]) == 4     # fc and head: weight, bias each
    t_features = [(torch.from_numpy(f), torch.from_numpy(y)) for f, y in features]
    t_raw = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in raw]

    def device_step(engine, method, batches):
        i = [0]

        def step():
            a, y = batches[i[0] % len(batches)]
            i[0] += 1
            t0 = time.perf_counter()
            r = getattr(engine, method)(a, y, LR)
            return time.perf_counter() - t0, r.accepted, r.loss
        return step

    def torch_step(module, opt, batches):
        i = [0]

        def step():
            x, y = batches[i[0] % len(batches)]
            i[0] += 1
            t0 = time.perf_counter()
            loss = F.cross_entropy(module(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return time.perf_counter() - t0, True, loss.item()
        return step

    torch.set_num_threads(threads)
    contenders = {"device_head": device_step(engines["head"], "step_features", features),
                  "torch_part": torch_step(part, opts["part"], t_features),
                  "device_whole": device_step(engines["whole"], "step", raw),
                  "torch_frozen_trunk": torch_step(frozen, opts["frozen"], t_raw)}
    gc.collect()
    gc.disable()
    try:
        results, info = run_pairs(contenders, pairs, warmup, seed=SEED, time_of=lambda r: r[0])
    finally:
        gc.enable()
    t = {n: np.array([r[0] for r in v]) for n, v in results.items()}
    return {"headline": ratio_summary(t["device_head"], t["torch_part"], "device_head", "torch_part", info["clean"]),
            "context_whole_steps": ratio_summary(t["device_whole"], t["torch_frozen_trunk"], "device_whole",
                                                 "torch_frozen_trunk", info["clean"]),
            "context_cached_device_vs_torch_frozen_trunk": ratio_summary(
                t["device_head"], t["torch_frozen_trunk"], "device_head", "torch_frozen_trunk", info["clean"]),
            "pairs_info": info,
            "all_device_steps_accepted": all(r[1] for n in ("device_head", "device_whole") for r in results[n]),
            "all_losses_finite": all(np.isfinite(r[2]) for v in results.values() for r in v),
            "includes": {
                "device_head": "OrtEngine.step_features(features, labels, lr): head_step.onnx via IOBinding on the "
                               "ping-pong sides (fc + head forward, softmax error, e B for fc, weight and momentum "
                               "updates), the update-bound finiteness proof and the side flip; features in memory",
                "torch_part": "torch.nn.Sequential(fc, head) of the same CNN on the same features: forward + "
                              "cross-entropy, zero_grad(set_to_none=True), backward, SGD(momentum 0.9).step()",
                "device_whole": "OrtEngine.step(x, labels, lr) on raw samples: train_step.onnx (trunk + DFA step of "
                                "fc + head), finiteness proof, flip",
                "torch_frozen_trunk": "the whole CNN on raw samples with the convs' requires_grad=False: forward "
                                      "(convs included), cross-entropy, zero_grad, backward through fc + head only, "
                                      "SGD(momentum 0.9) over fc + head"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=40, help="clean pairs per comparison (default 40)")
    ap.add_argument("--warmup", type=int, default=5, help="warm-up pairs, discarded (default 5)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads, both sides (default 1)")
    ap.add_argument("--quick", action="store_true", help="smoke check: a smaller CNN, 4 pairs, 2 warm-up")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = ap.parse_args()
    setup = QUICK_SETUP if args.quick else SETUP
    pairs, warmup = (4, 2) if args.quick else (args.pairs, args.warmup)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(SEED)
    n_in = int(np.prod(setup["in_shape"]))
    data = Dataset(rng.standard_normal((setup["samples"], n_in), dtype=np.float32),
                   rng.integers(0, CLASSES, setup["samples"]), CLASSES, "seeded gaussian")
    with tempfile.TemporaryDirectory(prefix="edgefa-bench-cache-") as tmp:
        work = Path(tmp)
        bundle_path, model = build(setup, work / "bundle")
        counted = flops(bundle_path)
        print(f"trunk {counted['trunk_forward_per_sample'] / 1e6:.2f} MFLOP/sample = "
              f"{counted['trunk_share_of_forward']:.1%} of the forward FLOPs", flush=True)
        epochs = measure_epochs(bundle_path, work, data, pairs, warmup, args.threads)
        print(f"(a) epoch after the first, cached/uncached: {fmt(epochs['ratio_stats'])}", flush=True)
        steps = measure_steps(bundle_path, model, data, pairs, warmup, args.threads)
        print(f"(b) trained part's step, device/torch: {fmt(steps['headline']['ratio_stats'])}", flush=True)
        print(f"    context: device whole step / torch frozen-trunk step: "
              f"{fmt(steps['context_whole_steps']['ratio_stats'])}", flush=True)
        model_line = read_bundle(bundle_path).manifest["model"]
    e, s = epochs["ratio_stats"]["median"], steps["headline"]["ratio_stats"]["median"]
    payload = {
        "benchmark": "feature_cache",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info({"onnxruntime_intra_op": args.threads, "torch_intra_op": torch.get_num_threads()}),
        "config": {"quick": args.quick, "model": {**setup, "classes": CLASSES, "trainable": "last:2 (fc + head)",
                                                  "trunk": trunk_of(model_line)["source"]},
                   "batch": BATCH, "lr": LR, "momentum": MOMENTUM, "pairs": pairs, "warmup_pairs": warmup,
                   "data": "seeded Gaussian samples", "order": "shuffled within each pair (seeded)",
                   "gc": "disabled while timing", "provider": "CPUExecutionProvider"},
        "flops": counted,
        "epoch": epochs,
        "step": steps,
        "verdict": {"trunk_share_of_forward": counted["trunk_share_of_forward"],
                    "trunk_share_target": f">= {TRUNK_SHARE_TARGET}",
                    "epoch_ratio_median": e, "epoch_target": f"<= {EPOCH_TARGET}", "epoch_met": e <= EPOCH_TARGET,
                    "step_ratio_median": s, "step_target": f"<= {STEP_TARGET}", "step_met": s <= STEP_TARGET},
        "load_at_end": load_now(),
    }
    stem = "feature_cache_quick" if args.quick else "feature_cache"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stem}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
