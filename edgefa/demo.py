"""`edgefa demo`: the whole loop on the embedded digits data set, in about a minute on 2 cores.

1. Pretrain a model with DFA on the host (torch) and export a bundle: the MLP (`model="mlp"`, the
   default), or a 2-D CNN over the 8x8 digit images (`model="cnn"`) whose every stage, conv
   stages included, the device trains by DFA (export_bundle's trainable="all").
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from rich.progress import Progress

from .shared.datasets import load_digits, save_npz
from .shared.shift import SensorShift, device_data, device_shift
from .exporters.export import export_bundle
from .errors import EdgefaError
from .out_folders import check_out_folder
from .training.trainer import TrainConfig, finetune_bp, save_run, train


DEMO_MODELS = ("mlp", "cnn")
# The demo's CNN: the trainer's default CNN (width 16, depth 2: conv3 16 -> pool -> conv3 32 ->
# pool -> fc 128 -> head, 8x8 -> 4x4 -> 2x2), the accuracy table's digits CNN. Its host epoch costs
# about 3 MLP epochs and its device step 2-4 MLP steps, so with the MLP's 30 epochs and 200
# steps the CNN demo stays under a minute on 2 cores; a wider or deeper CNN buys nothing on 8x8.
CNN_WIDTH, CNN_DEPTH = 16, 2
# Learning rate of pre-training and of both fine-tunings, per model. The CNN takes 0.001: at the
# MLP's 0.003 its DFA pre-training reaches about the same clean accuracy but its logits grow into
# the hundreds (test loss 11 after 30 epochs, first device batch loss 360, accuracy swinging
# between epochs); at 0.001 the loss falls steadily (test loss 0.14, 96 % after 30 epochs).
DEMO_LR = {"mlp": 0.003, "cnn": 0.001}


@dataclass
class DemoConfig:
    out: Path = Path("demo-out")
    model: str = "mlp"                        # mlp (64-256-256-10) or cnn (CNN_WIDTH, CNN_DEPTH)
    epochs: int = 30
    steps: int = 200
    batch_size: int = 32
    lr: float | None = None                   # None: DEMO_LR[model]
    momentum: float = 0.9
    seed: int = 0
    device_test_fraction: float = 1 / 3       # 450 held-out digits -> 300 device-train, 150 device-test
    # The device's sensor: one pixel to the right, 30% less gain, read noise (raw pixel units 0..16).
    shift: SensorShift = field(default_factory=lambda: device_shift("digits"))


def run_demo(cfg: DemoConfig, progress: Callable[[], Progress], say: Callable[[str], None] = print) -> dict:
    """Run the demo; `progress()` makes a fresh rich Progress for each phase. `cfg.out` must be
    empty, absent or an earlier demo's (out_folders: checked here, before any work)."""
    if cfg.model not in DEMO_MODELS:
        raise EdgefaError(f"demo: no demo for model {cfg.model!r}; expected one of {', '.join(DEMO_MODELS)}")
    out = cfg.out
    check_out_folder(out, "demo")
    out.mkdir(parents=True, exist_ok=True)
    cfg = replace(cfg, lr=cfg.lr or DEMO_LR[cfg.model])
    architecture = {"model": "cnn", "width": CNN_WIDTH, "depth": CNN_DEPTH} if cfg.model == "cnn" else {}
    train_cfg = TrainConfig(method="dfa", dataset="digits", epochs=cfg.epochs, batch_size=cfg.batch_size,
                            lr=cfg.lr, momentum=cfg.momentum, seed=cfg.seed, device="cpu",
                            alignment=False,   # the demo is about the device; `edgefa train` logs it
                            **architecture)

    # 1. host pre-training with DFA, then export
    with progress() as bar:
        task = bar.add_task("host: pretrain (dfa)", total=cfg.epochs, status="")
        run = train(train_cfg, lambda e, row: bar.update(task, completed=e, status=f"test {100 * row['test_accuracy']:.1f}%"))
    save_run(run, out / "run")
    bundle_path = export_bundle(run, out / "bundle", trainable="all")   # the CNN's conv stages train too
    say(f"exported {bundle_path}")

    # 2. the device's data: digits the host never trained on, through the device's sensor
    dev_train, dev_test = device_data(load_digits(), train_cfg.test_fraction, cfg.shift, cfg.seed,
                                      cfg.device_test_fraction)
    save_npz(out / "device_train.npz", dev_train)
    save_npz(out / "device_test.npz", dev_test)

    # 3. a device server in a torch-free process, behind a pseudo-terminal; the host drives it
    device = drive_device_over_pty(cfg, bundle_path, dev_train, dev_test, out, progress, say)

    # 4. reference: BP fine-tuning on the host from the same weights, batches and optimizer
    with progress() as bar:
        task = bar.add_task("host: bp reference", total=cfg.steps, status="")
        bp_acc = finetune_bp(run, dev_train, dev_test, cfg.steps, cfg.batch_size, cfg.lr, cfg.momentum, cfg.seed,
                             on_step=lambda loss: bar.advance(task))

    result = {
        "model": cfg.model,
        "model_description": describe_host_model(run.model),
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


def describe_host_model(model) -> str:
    """One line for the table's title, e.g. "64-256-256-10 MLP" or "CNN 1x8x8, conv3 16-32, fc 128"."""
    c = model.config
    if model.kind == "cnn":
        convs = "-".join(str(c.width * 2 ** i) for i in range(c.depth))
        return f"CNN {'x'.join(map(str, c.in_shape))}, conv3 {convs}, fc {8 * c.width}"
    return "-".join(map(str, [c.in_features, *c.hidden, c.n_classes])) + " MLP"


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
    return {**tuned, "accuracy_before": before, "accuracy_after": after, "server_command": cmd[1:],
            "peak_rss_bytes": profile["memory"]["peak_rss_bytes"], "bundle_bytes": profile["bundle_bytes"],
            "energy": profile["energy"],
            "link": link, "tty": tty}
