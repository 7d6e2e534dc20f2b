"""Torch side of benchmarks/device_step.py: a BP step of the same MLP, in its own process.

    python benchmarks/_device_torch_worker.py --bundle DIR --momentum M [--threads 2] [--seed 0]

The model starts from the bundle's own weights.npz (so both sides start identical), read one array
at a time so reading it costs torch's peak RSS no more than one layer, and trains with edgefa's
make_optimizer (torch.optim.SGD, the bundle's lr, momentum M). Commands on stdin,
one JSON reply per line:
    step [K] K (default 1) BP steps back to back on the next batches; reports the last:
             {"t", "forward", "backward", "optimizer", "loss", "nivcsw", "t_turn": every step's s}
    finish   -> peak RSS (VmHWM) and RSS of this process
    quit
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's edgefa first

from edgefa.profiling.memory import peak_rss_bytes, rss_bytes  # noqa: E402

rss_before_torch = rss_bytes()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from edgefa.bundle import MANIFEST  # noqa: E402
from edgefa.models import MLP, MLPConfig  # noqa: E402
from edgefa.training.trainer import make_optimizer  # noqa: E402

BATCH = 128


def batches(in_features: int, n_classes: int, seed: int) -> list:
    """The same seeded random batches the runtime worker uses (numpy's generator in both)."""
    rng = np.random.default_rng(seed)
    return [(torch.from_numpy(rng.standard_normal((BATCH, in_features), dtype=np.float32)),
             torch.from_numpy(rng.integers(0, n_classes, BATCH).astype(np.int64))) for _ in range(4)]


def reply(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--momentum", type=float, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    rss_after_imports = rss_bytes()
    manifest = json.loads((Path(args.bundle) / MANIFEST).read_text())
    topo = manifest["model"]
    hidden = [layer["out"] for layer in topo["layers"][:-1]]
    model = MLP(MLPConfig(topo["in_features"], hidden, topo["n_classes"], topo["activation"], rule="bp"))
    with torch.no_grad(), np.load(Path(args.bundle) / "weights.npz", allow_pickle=False) as z:
        # bundle names fc{i}.* / head.* -> torch's hidden_layers.{i}.* / head.*, one array at a time
        for name, lin in zip(model.layer_names(), model.linears()):
            lin.weight.copy_(torch.from_numpy(z[f"{name}.weight"]))
            lin.bias.copy_(torch.from_numpy(z[f"{name}.bias"]))
    lr = float(manifest["optimizer"]["lr"])
    opt = make_optimizer(model, lr, args.momentum)
    data = batches(topo["in_features"], topo["n_classes"], args.seed)
    i = 0
    reply({"ready": True, "momentum": args.momentum})

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
                loss = F.cross_entropy(model(x), y)
                t1 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                t2 = time.perf_counter()
                opt.step()
                t3 = time.perf_counter()
                times.append(t3 - t0)
                nivcsw = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - cs0
            reply({"t": times[-1], "forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2,
                   "loss": loss.item(), "nivcsw": nivcsw, "t_turn": times})
        elif cmd[0] == "finish":
            reply({"peak_rss_bytes": peak_rss_bytes(), "rss_bytes": rss_bytes(),
                   "params_finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
                   "rss_before_torch_bytes": rss_before_torch, "rss_after_imports_bytes": rss_after_imports,
                   "steps": i, "threads": {"torch_intra_op": torch.get_num_threads(),
                                           "torch_inter_op": torch.get_num_interop_threads()}})
        elif cmd[0] == "quit":
            return
        else:
            reply({"error": f"unknown command {cmd[0]!r}"})


if __name__ == "__main__":
    main()
