"""The divergence rule (edgefa/runtime/divergence.py) against real fine-tuning: how close normal
noise comes to it, and how fast it fires when the learning rate is too large.

    .venv/bin/python benchmarks/divergence_rule.py [--steps 400] [--seeds 3]

Two digits bundles (the tests' 64-32-16-10 DFA MLP, 3 epochs; and a 64-64-64-10 one, 30 epochs),
fine-tuned on the device runtime (Finetuner.train_step: the real ONNX train step) for every lr x
batch size x seed, with the rule watching but never stopping the run. Per cell: the largest
loss / reference the rule saw (it fires above its factor, 10), the first step it would fire at, and
the accuracy on the digits at start, at its lowest (every 40 steps and at the end) and at the end, so a trigger
can be told apart from a false one. Writes benchmarks/results/divergence_rule.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgefa.bundle import read_bundle  # noqa: E402
from edgefa.shared.datasets import load_digits  # noqa: E402
from edgefa.runtime.divergence import DivergenceGuard, chance_loss  # noqa: E402
from edgefa.runtime.finetune import FinetuneConfig, Finetuner, accuracy  # noqa: E402

BUNDLES = {"mlp-32-16 (3 epochs, lr 0.01)": dict(hidden=[32, 16], epochs=3, lr=0.01),
           "mlp-64-64 (30 epochs, lr 0.003)": dict(hidden=[64, 64], epochs=30, lr=0.003)}
LRS = (0.001, 0.003, 0.01, 0.03, 1.0, 10.0, 1e6)
BATCHES = (1, 4, 8, 16, 32, 128)


def make_bundle(work: Path, name: str, **train) -> Path:
    from edgefa.exporters.export import export_bundle
    from edgefa.training.trainer import TrainConfig, load_run, save_run, train as train_run

    run = train_run(TrainConfig(method="dfa", device="cpu", **train))
    save_run(run, work / f"{name}-run")
    return export_bundle(load_run(work / f"{name}-run"), work / name)


def watch(bundle: Path, work: Path, data, lr: float, batch: int, seed: int, steps: int) -> dict:
    copy = work / "copy"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(bundle, copy)
    tuner = Finetuner(read_bundle(copy), data, FinetuneConfig(steps, batch, lr, seed=seed, threads=1), data)
    guard = DivergenceGuard(chance_loss(10, pairs=False))
    worst, fired, accs = 0.0, None, [accuracy(tuner.engine, *tuner.eval)]
    for step in range(steps):
        result = tuner.train_step(step)
        if guard.recent:
            ratio = (result.loss / guard.rule.reference(guard.recent, guard.chance)
                     if math.isfinite(result.loss) else math.inf)
            worst = max(worst, ratio)
        if guard.judge(result.loss, result.accepted, 0) != "ok" and fired is None and guard.reason:
            fired = step
        if step % 40 == 39 or step == steps - 1:
            accs.append(accuracy(tuner.engine, *tuner.eval))
    tuner.state_lock.release()
    return {"worst_loss_over_reference": worst, "fires_at_step": fired,
            "accuracy_start": accs[0], "accuracy_lowest": min(accs), "accuracy_end": accs[-1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    data = load_digits()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for label, train in BUNDLES.items():
            bundle = make_bundle(work, label.split()[0], **train)
            for lr in LRS:
                for batch in BATCHES:
                    steps = args.steps if lr <= 0.03 else 30
                    cells = [watch(bundle, work, data, lr, batch, seed, steps) for seed in range(args.seeds)]
                    rows.append({"bundle": label, "lr": lr, "batch": batch, "steps": steps, "seeds": cells})
                    print(f"{label} lr {lr:g} batch {batch}: worst "
                          f"{max(c['worst_loss_over_reference'] for c in cells):.3g}, fires at "
                          f"{[c['fires_at_step'] for c in cells]}, accuracy "
                          f"{cells[0]['accuracy_start']:.2f} -> lowest "
                          f"{min(c['accuracy_lowest'] for c in cells):.2f}", flush=True)
    out = REPO / "benchmarks" / "results" / "divergence_rule.json"
    out.write_text(json.dumps({"rule": "loss > 10 x max(median of last 20 accepted, chance loss)",
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
