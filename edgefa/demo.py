"""`edgefa demo`: the whole loop on the embedded digits data set, in about a minute on 2 cores.

1. Pretrain an MLP with DFA on the host (torch) and export a bundle.
2. Make the device's data: the held-out digits seen through a different sensor (shifted one
   pixel, weaker gain, noisier), split into device-train and device-test.
3. Start a device server in a separate process in which `import torch` fails, behind a
   pseudo-terminal, and drive it over that serial line: deploy, evaluate, fine-tune, pull back.
4. For reference, fine-tune with BP on the host from the same start, on the same batches.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from rich.progress import Progress

from .shared.datasets import load_digits, save_npz, stratified_split
from .shared.shift import SensorShift
from .exporters.export import export_bundle
from .out_folders import check_out_folder
from .models import MLP, MLPConfig
from .training.trainer import TrainConfig, evaluate, make_optimizer, save_run, to_tensors, train, train_steps


@dataclass
class DemoConfig:
    out: Path = Path("demo-out")
    epochs: int = 30
    steps: int = 200
    batch_size: int = 32
    lr: float = 0.003
    momentum: float = 0.9
    seed: int = 0
    device_test_fraction: float = 1 / 3       # 450 held-out digits -> 300 device-train, 150 device-test
    # The device's sensor: one pixel to the right, 30% less gain, read noise (raw pixel units 0..16).
    shift: SensorShift = field(default_factory=lambda: SensorShift(dx=1, gain=0.7, noise_std=1.5, clip=(0.0, 16.0)))


def run_demo(cfg: DemoConfig, progress: Callable[[], Progress], say: Callable[[str], None] = print) -> dict:
    """Run the demo; `progress()` makes a fresh rich Progress for each phase. `cfg.out` must be
    empty, absent or an earlier demo's (out_folders: checked here, before any work)."""
    out = cfg.out
    check_out_folder(out, "demo")
    out.mkdir(parents=True, exist_ok=True)
    train_cfg = TrainConfig(method="dfa", dataset="digits", epochs=cfg.epochs, batch_size=cfg.batch_size,
                            lr=cfg.lr, momentum=cfg.momentum, seed=cfg.seed, device="cpu",
                            alignment=False)   # the demo is about the device; `edgefa train` logs it

    # 1. host pre-training with DFA, then export
    with progress() as bar:
        task = bar.add_task("host: pretrain (dfa)", total=cfg.epochs, status="")
        run = train(train_cfg, lambda e, row: bar.update(task, completed=e, status=f"test {100 * row['test_accuracy']:.1f}%"))
    save_run(run, out / "run")
    bundle_path = export_bundle(run, out / "bundle")
    say(f"exported {bundle_path}")

    # 2. the device's data: digits the host never trained on, through the device's sensor
    _, held_out = stratified_split(load_digits(), train_cfg.test_fraction, cfg.seed)
    shifted = cfg.shift.apply(held_out, seed=cfg.seed + 1)
    dev_train, dev_test = stratified_split(shifted, cfg.device_test_fraction, cfg.seed + 2)
    save_npz(out / "device_train.npz", dev_train)
    save_npz(out / "device_test.npz", dev_test)

    # 3. a device server in a torch-free process, behind a pseudo-terminal; the host drives it
    device = drive_device_over_pty(cfg, bundle_path, dev_train, dev_test, out, progress, say)

    # 4. reference: BP fine-tuning on the host from the same weights, batches and optimizer
    bp_model = MLP(MLPConfig(**{**run.model.config.to_dict(), "rule": "bp"}))
    bp_model.load_state_dict({k: v for k, v in run.model.state_dict().items() if not k.startswith("feedback_")})
    optimizer = make_optimizer(bp_model, cfg.lr, cfg.momentum)
    Xtr, ytr = to_tensors(dev_train, run.standardizer, torch.device("cpu"))
    Xte, yte = to_tensors(dev_test, run.standardizer, torch.device("cpu"))
    with progress() as bar:
        task = bar.add_task("host: bp reference", total=cfg.steps, status="")
        train_steps(bp_model, optimizer, Xtr, ytr, cfg.steps, cfg.batch_size, cfg.seed,
                    on_step=lambda loss: bar.advance(task))
    _, bp_acc = evaluate(bp_model, Xte, yte)

    result = {
        "shift": cfg.shift.describe(),
        "host_clean_accuracy": run.metrics["final_test_accuracy"],
        "before": device["accuracy_before"],
        "after_device_dfa": device["accuracy_after"],
        "after_host_bp": bp_acc,
        "device_step_ms_median": device["step_ms_median"],
        "round_trip_ms_median": device["round_trip_ms_median"],
        "device_peak_rss_bytes": device["peak_rss_bytes"],
        "energy_per_step_j": device["energy"]["per_step_j"],
        "energy_method": device["energy"]["method"],
        "energy_source": device["energy"]["backend"],
        "bundle_bytes": device["bundle_bytes"],
        "link": device["link"],
        "n_device_train": len(dev_train),
        "n_device_test": len(dev_test),
        "steps": cfg.steps,
        "device_report": device,
    }
    result["report_path"] = str(out / "demo_report.json")
    Path(result["report_path"]).write_text(json.dumps(result, indent=2))
    return result


def drive_device_over_pty(cfg: DemoConfig, bundle_path: Path, dev_train, dev_test, out: Path,
                          progress: Callable[[], Progress], say: Callable[[str], None]) -> dict:
    """Start `edgefa device serve --port pty` in a process where torch cannot be imported, open the
    pseudo-terminal it prints with pyserial, and deploy, evaluate, fine-tune and pull over it."""
    from .link.client import DeviceClient

    # The server's store is a fresh scratch folder: it is the server's own (deploys, uploads,
    # checkpoints), nothing the demo's user keeps, and a store left by an earlier run would hold the
    # same bundle already fine-tuned. Only the server writes in it, so removing it removes only edgefa's.
    store = tempfile.TemporaryDirectory(prefix="edgefa-demo-store-")
    cmd = [sys.executable, "-m", "edgefa.without_torch", "device", "serve", "--port", "pty",
           "--store", str(Path(store.name) / "store"), "--checkpoint-every", "50"]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()
        if "serving on" not in line:
            raise RuntimeError(f"the device server did not start: {line!r}")
        tty = line.split()[-1]
        say(f"device: a torch-free server process behind the pseudo-terminal {tty}")
        with DeviceClient(tty) as dev:
            deployed = dev.deploy(bundle_path)
            say(f"deployed {deployed['archive_bytes']} bytes over {tty}")
            before = dev.evaluate(dev_test.X, dev_test.y)["accuracy"]
            with progress() as bar:
                task = bar.add_task("device: dfa over the pty", total=cfg.steps, status="")
                tuned = dev.finetune(dev_train.X, dev_train.y, cfg.steps, cfg.batch_size, cfg.seed, cfg.lr,
                                     on_step=lambda s, loss, rtt: bar.update(task, completed=s,
                                                                             status=f"loss {loss:.3f}"))
            after = dev.evaluate(dev_test.X, dev_test.y)["accuracy"]
            profile = dev.profile(samples=False)
            pulled = dev.pull(out / "device-bundle")
            say(f"pulled the fine-tuned bundle back into {pulled}")
            link = dev.stats.as_dict()
    finally:
        server.terminate()
        server.wait(timeout=30)
        store.cleanup()
    return {**tuned, "accuracy_before": before, "accuracy_after": after,
            "peak_rss_bytes": profile["memory"]["peak_rss_bytes"], "bundle_bytes": profile["bundle_bytes"],
            "energy": profile["energy"],
            "link": link, "tty": tty}
