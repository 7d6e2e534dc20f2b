"""Host training on CUDA beside the CPU, in one run: wall time and final accuracy per rule.

Needs a CUDA GPU (it exits 0 with a line saying so where there is none). For each of bp, fa and
dfa it trains the same seeded MLP on digits twice, once per device, and records the wall time of
`train()` (dataset loading included, CUDA context creation excluded by a warm-up), the median
per-epoch time, and the final test accuracy. The two accuracies differ only by floating-point
order (cuBLAS vs MKL), so they should agree within a point or two.

    python benchmarks/cuda_train.py [--epochs 30] [--hidden 256,256]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _pairs import machine_info, write_json
from edgefa.training.trainer import TrainConfig, train


def timed_train(config: TrainConfig) -> dict:
    epoch_ends = []
    if config.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()

    def on_epoch(_epoch, _row):
        if config.device == "cuda":
            torch.cuda.synchronize()
        epoch_ends.append(time.perf_counter())

    run = train(config, on_epoch)
    total = time.perf_counter() - start
    epoch_times = np.diff([start] + epoch_ends)
    return {"device": run.metrics["device"], "wall_s": total,
            "epoch_ms_median": float(np.median(epoch_times) * 1e3),
            "final_test_accuracy": run.metrics["final_test_accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--hidden", default="256,256")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("cuda_train: no CUDA GPU here; nothing to measure")
        return
    hidden = [int(w) for w in args.hidden.split(",")]
    torch.zeros(1, device="cuda")             # create the CUDA context outside the timed runs
    rows = []
    for method in ("bp", "fa", "dfa"):
        for device in ("cpu", "cuda"):
            cfg = TrainConfig(method=method, hidden=hidden, epochs=args.epochs,
                              batch_size=args.batch_size, device=device)
            row = {"method": method, **timed_train(cfg)}
            rows.append(row)
            print(f"{method:4s} {device:5s} wall {row['wall_s']:6.2f} s  epoch "
                  f"{row['epoch_ms_median']:7.1f} ms  test acc {row['final_test_accuracy']:.4f}",
                  flush=True)
    result = {"benchmark": "cuda_train", "machine": machine_info({"torch_threads": torch.get_num_threads()}),
              "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "config": {"dataset": "digits", "hidden": hidden, "epochs": args.epochs,
                         "batch_size": args.batch_size},
              "rows": rows}
    write_json("cuda_train", result)


if __name__ == "__main__":
    main()
