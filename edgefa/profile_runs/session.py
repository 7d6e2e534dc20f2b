"""`edgefa profile`: run fine-tuning steps under the profiler and gather profile.json.

Locally, the bundle is copied to a scratch directory first, so profiling never moves the user's
bundle state. Over the link, profiling never changes what the device serves or its state: the
steps run in a scratch session on the device (link/service.py: its state is checkpointed and
copied at the start, nothing is written during it, and the copy and the step are put back at the
end), on the bundle the device serves, which must be BUNDLE (the same manifest). Another BUNDLE is
refused in one line unless `deploy` is asked for: then BUNDLE is deployed first, as `edgefa deploy`
does (the replaced bundle keeps its state on the device as bundle.prev). The host clears the
device's profiler, drives the steps, asks for the summary, and adds the round trips it timed.

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
                      part_topology, read_bundle, sha256_file)
from ..device_profiles import detect_profile
from ..device_profiles.budget import budget
from ..errors import BundleError, EdgefaError
from ..profiling.machine import device_description, open_profiler
from ..profiling.profiler import latency_stats
from ..runtime.backends import runs_on_gpu
from ..runtime.finetune import FinetuneConfig, Finetuner
from ..shared.datasets import Dataset, load_dataset

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


def profile_header(title: str, where: str, cfg: ProfileConfig, machine, device: dict) -> dict:
    """The head of every profile.json: `machine` the device profile's summary, `device` the
    machine's description (this one's, or the device's over the link)."""
    return {"schema": SCHEMA, "title": title, "where": where,
            "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": device, "device_profile": machine, "config": asdict(cfg)}


def profile_local(bundle_path: str | Path, cfg: ProfileConfig, data: Dataset | None = None,
                  on_step=None) -> dict:
    """Fine-tune a scratch copy of the bundle for `cfg.steps` steps under the profiler."""
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise EdgefaError("steps and batch size must be at least 1")
    profiler, machine = open_profiler(cfg.profile, work_on_gpu=runs_on_gpu(cfg.provider),
                                      warmup=cfg.warmup, sample_interval_s=cfg.sample_interval_s)
    check_profilable(read_bundle(bundle_path).manifest, str(bundle_path))   # a bad bundle: reported by its own path
    with tempfile.TemporaryDirectory(prefix="edgefa-profile-") as scratch, profiler:
        with profiler.window("load"):
            bundle = read_bundle(_scratch_copy(bundle_path, Path(scratch)))
        data = data or synthetic_data(bundle, max(16 * cfg.batch_size, 256), cfg.seed)
        try:
            run = Finetuner(bundle, data, FinetuneConfig(steps=cfg.steps, batch_size=cfg.batch_size,
                                                         checkpoint_every=cfg.checkpoint_every, seed=cfg.seed,
                                                         threads=cfg.threads, provider=cfg.provider),
                            profiler=profiler)
        except BundleError as exc:       # a graph that does not load: named in the user's bundle, not the copy
            raise BundleError(str(exc).replace(str(bundle.path), str(bundle_path))) from None
        result = run.run(on_step)
        manifest = bundle.manifest
    summary = profiler.summary()
    # the budget beside the measurement, with this host's measured bandwidth when it was detected
    device = machine.profile if cfg.profile else detect_profile()[0]
    prediction = budget(manifest, device, cfg.batch_size, result["providers"][0], samples=len(data.y))
    return {**profile_header(f"edgefa profile: {Path(bundle_path).name} on this machine", "local", cfg,
                             device_profile_summary(machine), device_description()),
            **summary, "link": None,
            "finetune": {k: result[k] for k in ("providers", "steps_run", "batch_size", "lr", "loss_first",
                                                "loss_last", "refused_steps")},
            "model": model_line(manifest), "budget": prediction.as_dict(), "energy_line": machine.energy_line}


def profile_over_link(client, bundle_path: str | Path, cfg: ProfileConfig, data: Dataset | None = None,
                      on_step=None, on_upload=None, deploy: bool = False) -> dict:
    """Run `cfg.steps` steps on `client`'s device in a scratch session (undone at its end) and
    gather the device's profile with the host's round trips beside it. The device must serve
    `bundle_path` (the same manifest); with `deploy`, another bundle is deployed first (the
    module docstring says what that does). `device_state` in the result says what the device held
    before and after: the same step and, bit for bit, the same state."""
    bundle = read_bundle(bundle_path)
    check_profilable(bundle.manifest, str(bundle_path))
    status = client.status()
    serves_it = status.get("bundle") is not None and status.get("manifest_sha256") == sha256_file(
        bundle.path / "manifest.json")
    if not serves_it and not deploy:
        serving = (f"another bundle ({status['bundle'][:16]}…, at step {status['step']})" if status.get("bundle")
                   else "no bundle")
        raise EdgefaError(f"{bundle_path}: the device at {client.url} serves {serving}; profiling runs on the "
                          "bundle the device serves and leaves its state alone. Deploy BUNDLE first, or pass "
                          "--deploy (it replaces the device's bundle; the replaced one keeps its state there "
                          "as bundle.prev)")
    data = data or synthetic_data(bundle, max(16 * cfg.batch_size, 256), cfg.seed)
    client.profile(clear=True, samples=False, warmup=cfg.warmup)      # measure this session only
    deployed = None if serves_it else client.deploy(bundle_path, on_progress=on_upload)
    with client.scratch() as session:
        start = session["step"]
        tuned = client.finetune(data.X, data.y, start + cfg.steps, cfg.batch_size, cfg.seed, on_step=on_step,
                                scratch=session["token"])
    after = client.status()
    device = client.profile()
    rtt, step_ms = np.array(tuned["round_trip_ms"]), np.array(tuned["device_step_ms"])
    skip = cfg.warmup if len(rtt) > 2 * cfg.warmup else 0
    link = {"round_trip_ms": latency_stats(rtt[skip:]), "overhead_ms_p50": float(np.median(rtt - step_ms)) if len(rtt) else None,
            "archive_bytes": deployed["archive_bytes"] if deployed else None,
            **(client.stats.as_dict() if client.stats else {})}
    remote_cfg = ProfileConfig(**{**asdict(cfg), "warmup": device["warmup"],
                                  "sample_interval_s": device["sample_interval_s"],
                                  "provider": ",".join(device["providers"])})
    return {**profile_header(f"edgefa profile: {Path(bundle_path).name} on {client.url}", f"device {client.url}",
                             remote_cfg, device["device_profile"], device["device"]),
            "phases": device["phases"], "memory": device["memory"], "energy": device["energy"], "link": link,
            "finetune": {"steps_run": tuned["steps_run"], "batch_size": cfg.batch_size,
                         "loss_first": tuned["loss_first"], "loss_last": tuned["loss_last"],
                         "refused_steps": tuned["refused_steps"], "reconnects": tuned["reconnects"]},
            # the steps ran in a scratch session: the device is back at the step it had before them
            "device_state": {"scratch": True, "step_before": start, "step_after": after["step"],
                             "restored": bool(session["ended"]), "deployed": deployed},
            "model": model_line(bundle.manifest)}


def _scratch_copy(bundle_path, scratch: Path) -> Path:
    src = Path(bundle_path)
    if not src.is_dir():
        raise EdgefaError(f"{bundle_path}: not a bundle directory")
    dst = scratch / "bundle"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("state"))
    return dst


def device_profile_summary(machine) -> dict:
    """The `device_profile` of profile.json: which profile `machine` (profiling.machine.Machine) has, and how."""
    p = machine.profile
    return {"name": p.name, "display_name": p.display_name, "detected": bool(p.detected), "how": machine.how_recognized}


def model_line(manifest: dict) -> dict:
    """The model in profile.json, any kind: `layers` is the widths along the matmul path (an mlp's
    layer widths; a resmlp's embed, fc1, fc2, ..., head; on a trunk, from its features; a cnn's
    Linear layers after its convs), `description` the `describe_model` line."""
    m = manifest["model"]
    return {"layers": [part_topology(m)["in_features"]] + [w[0] for w, _ in layer_shapes(m).values() if len(w) == 2],
            "kind": model_kind(m), "description": describe_model(m), "trainable": m.get("trainable", "all"),
            "loss": manifest.get("loss", LOSS_CROSS_ENTROPY),
            "activation": m["activation"], "momentum": manifest["optimizer"]["momentum"]}


def check_profilable(manifest: dict, where: str) -> None:
    """`edgefa profile` drives the cross-entropy step on labelled batches; a preference bundle's
    step takes pairs, so it is refused in one line before any work (edgefa/coverage.py reads this)."""
    if manifest.get("loss") == LOSS_BRADLEY_TERRY:
        raise EdgefaError(f"{where}: profile runs the cross-entropy step on labelled batches; this is a "
                          "bradley-terry preference bundle (fine-tune it on pairs with edgefa device finetune)")


def main(argv: list[str] | None = None, run=profile_local) -> None:
    """`python -m edgefa.profile_runs.session --bundle B --config JSON [--data SPEC] --out FILE`: one
    profile in a process of its own, so that its peak RSS is the fine-tuning's and nothing else's
    (`edgefa profile compare` runs it beside the torch BP side)."""
    import argparse
    import json

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
