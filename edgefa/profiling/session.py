"""`edgefa profile`: run fine-tuning steps under the profiler and gather profile.json.

Locally, the bundle is copied to a scratch directory first, so profiling never moves the user's
bundle state. Over the link, the host deploys the bundle, clears the device's profiler, drives
the steps and asks the device for its summary; the host adds the round trips it timed itself.

Without a data file the steps run on seeded Gaussian samples shaped like the bundle's input (the
cost of a step does not depend on the values). numpy + onnxruntime only: this runs on devices.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..bundle import (LOSS_BRADLEY_TERRY, LOSS_CROSS_ENTROPY, Bundle, describe_model, layer_shapes, model_kind,
                      read_bundle)
from ..data.datasets import Dataset
from ..device_profiles import detect_profile
from ..device_profiles.budget import budget
from ..errors import EdgefaError
from .machine import device_description, open_profiler
from .profiler import latency_stats

SCHEMA = "edgefa.profile/1"


@dataclass
class ProfileConfig:
    steps: int = 200
    batch_size: int = 32
    warmup: int = 5
    sample_interval_s: float = 0.02
    checkpoint_every: int = 50
    seed: int = 0
    threads: int | None = None
    provider: str | None = None
    profile: str | None = None          # device profile name or TOML (default: detected)


def synthetic_data(bundle: Bundle, samples: int, seed: int) -> Dataset:
    """Seeded Gaussian samples in the bundle's raw input space (its standardization undone)."""
    model, s = bundle.model, bundle.manifest["input"]["standardize"]
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((samples, model["in_features"]), dtype=np.float32)
    X *= s["std"]
    X += s["mean"]
    return Dataset(X, rng.integers(0, model["n_classes"], samples), model["n_classes"], "synthetic")


def _header(title: str, where: str, cfg: ProfileConfig, machine, device: dict) -> dict:
    return {"schema": SCHEMA, "title": title, "where": where,
            "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": device, "device_profile": machine, "config": asdict(cfg)}


def profile_local(bundle_path: str | Path, cfg: ProfileConfig, data: Dataset | None = None,
                  on_step=None) -> dict:
    """Fine-tune a scratch copy of the bundle for `cfg.steps` steps under the profiler."""
    from ..runtime.finetune import FinetuneConfig, Finetuner

    if cfg.steps < 1 or cfg.batch_size < 1:
        raise EdgefaError("steps and batch size must be at least 1")
    from ..runtime.backends import runs_on_gpu

    profiler, machine = open_profiler(cfg.profile, work_on_gpu=runs_on_gpu(cfg.provider),
                                      warmup=cfg.warmup, sample_interval_s=cfg.sample_interval_s)
    _refuse_pairs(read_bundle(bundle_path), str(bundle_path))    # a bad bundle: reported by its own path
    with tempfile.TemporaryDirectory(prefix="edgefa-profile-") as scratch, profiler:
        with profiler.window("load"):
            bundle = read_bundle(_scratch_copy(bundle_path, Path(scratch)))
        data = data or synthetic_data(bundle, max(16 * cfg.batch_size, 256), cfg.seed)
        run = Finetuner(bundle, data, FinetuneConfig(steps=cfg.steps, batch_size=cfg.batch_size,
                                                     checkpoint_every=cfg.checkpoint_every, seed=cfg.seed,
                                                     threads=cfg.threads, provider=cfg.provider),
                        profiler=profiler)
        result = run.run(on_step)
        manifest = bundle.manifest
    summary = profiler.summary()
    # the budget beside the measurement, with this host's measured bandwidth when it was detected
    device = machine.profile if cfg.profile else detect_profile()[0]
    prediction = budget(manifest, device, cfg.batch_size, result["providers"][0], samples=len(data.y))
    return {**_header(f"edgefa profile: {Path(bundle_path).name} on this machine", "local", cfg,
                      _machine_dict(machine), device_description()),
            **summary, "link": None,
            "finetune": {k: result[k] for k in ("providers", "steps_run", "batch_size", "lr", "loss_first",
                                                "loss_last", "refused_steps")},
            "model": _model_line(manifest), "budget": prediction.as_dict(), "energy_line": machine.energy_line}


def profile_over_link(client, bundle_path: str | Path, cfg: ProfileConfig, data: Dataset | None = None,
                      on_step=None, on_upload=None) -> dict:
    """Deploy the bundle to `client`'s device, run `cfg.steps` more steps there, and gather the
    device's profile with the host's round trips beside it."""
    bundle = read_bundle(bundle_path)
    _refuse_pairs(bundle, str(bundle_path))
    data = data or synthetic_data(bundle, max(16 * cfg.batch_size, 256), cfg.seed)
    client.profile(clear=True, samples=False, warmup=cfg.warmup)      # measure this session only
    deployed = client.deploy(bundle_path, on_progress=on_upload)
    start = client.status()["step"]
    tuned = client.finetune(data.X, data.y, start + cfg.steps, cfg.batch_size, cfg.seed, on_step=on_step)
    device = client.profile()
    rtt, step_ms = np.array(tuned["round_trip_ms"]), np.array(tuned["device_step_ms"])
    skip = cfg.warmup if len(rtt) > 2 * cfg.warmup else 0
    link = {"round_trip_ms": latency_stats(rtt[skip:]), "overhead_ms_p50": float(np.median(rtt - step_ms)) if len(rtt) else None,
            "archive_bytes": deployed["archive_bytes"], **(client.stats.as_dict() if client.stats else {})}
    remote_cfg = ProfileConfig(**{**asdict(cfg), "warmup": device["warmup"],
                                  "sample_interval_s": device["sample_interval_s"],
                                  "provider": ",".join(device["providers"])})
    return {**_header(f"edgefa profile: {Path(bundle_path).name} on {client.url}", f"device {client.url}",
                      remote_cfg, device["device_profile"], device["device"]),
            "phases": device["phases"], "memory": device["memory"], "energy": device["energy"], "link": link,
            "finetune": {"steps_run": tuned["steps_run"], "batch_size": cfg.batch_size,
                         "loss_first": tuned["loss_first"], "loss_last": tuned["loss_last"],
                         "refused_steps": tuned["refused_steps"], "reconnects": tuned["reconnects"]},
            "model": _model_line(bundle.manifest)}


def _scratch_copy(bundle_path, scratch: Path) -> Path:
    src = Path(bundle_path)
    if not src.is_dir():
        raise EdgefaError(f"{bundle_path}: not a bundle directory")
    dst = scratch / "bundle"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("state"))
    return dst


def _machine_dict(machine) -> dict:
    p = machine.profile
    return {"name": p.name, "display_name": p.display_name, "detected": bool(p.detected), "how": machine.how_recognized}


def _model_line(manifest: dict) -> dict:
    """The model in profile.json, any kind: `layers` is the widths along the matmul path (an mlp's
    layer widths; a resmlp's embed, fc1, fc2, ..., head), `description` the `describe_model` line."""
    m = manifest["model"]
    return {"layers": [m["in_features"]] + [w[0] for w, _ in layer_shapes(m).values() if len(w) == 2],
            "kind": model_kind(m), "description": describe_model(m), "trainable": m.get("trainable", "all"),
            "loss": manifest.get("loss", LOSS_CROSS_ENTROPY),
            "activation": m["activation"], "momentum": manifest["optimizer"]["momentum"]}


def _refuse_pairs(bundle: Bundle, where: str) -> None:
    """`edgefa profile` drives the cross-entropy step on labelled batches; a preference bundle's
    step takes pairs, so it is refused in one line before any work."""
    if bundle.manifest.get("loss") == LOSS_BRADLEY_TERRY:
        raise EdgefaError(f"{where}: profile runs the cross-entropy step on labelled batches; this is a "
                          "bradley-terry preference bundle (fine-tune it on pairs with edgefa device finetune)")


def main(argv: list[str] | None = None, run=profile_local) -> None:
    """`python -m edgefa.profiling.session --bundle B --config JSON [--data SPEC] --out FILE`: one
    profile in a process of its own, so that its peak RSS is the fine-tuning's and nothing else's
    (`edgefa profile compare` runs it beside the torch BP side)."""
    import argparse
    import json

    from ..data.datasets import load_dataset

    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--config", required=True, help="ProfileConfig fields as JSON")
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    cfg = ProfileConfig(**json.loads(args.config))
    result = run(args.bundle, cfg, load_dataset(args.data) if args.data else None)
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
