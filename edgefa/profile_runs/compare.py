"""`edgefa profile compare`: DFA on the device runtime against BP in torch, same model, same
batches, same energy source, each fine-tuning in a process of its own (so each peak RSS is its
own), and the ratios between them: step time, peak memory, energy per step.

Over the link, the DFA side runs on the device and BP stays on the host (torch never goes to the
device), so the ratios then compare two machines as well as two learning rules.
"""

from __future__ import annotations

import datetime as _dt
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from ..bundle import model_kind
from ..errors import EdgefaError
from ..profiling.machine import device_description
from .session import ProfileConfig, check_profilable

RATIO_DEFINITION = "dfa / bp: below 1 means DFA on the device runtime costs less"
DFA, BP = "dfa (onnxruntime, device runtime)", "bp (torch, host)"
# The model kinds whose torch twin the BP side builds: the keys of training/bp_profile.BP_TWINS,
# spelled out here because that module imports torch (tests/test_coverage.py keeps them equal).
BP_KINDS = ("mlp", "cnn", "resmlp")


def check_comparable(manifest: dict, where: str) -> None:
    """One line before any work unless both sides can run this bundle: the DFA side is `edgefa
    profile` (check_profilable), the BP side a torch twin of the bundle's model (bp_twin), which
    exists for BP_KINDS (on a frozen trunk too: onnxruntime computes the trunk's features there)."""
    check_profilable(manifest, where)
    kind = model_kind(manifest["model"])
    if kind not in BP_KINDS:
        raise EdgefaError(f"{where}: profile compare's BP side builds torch twins of {', '.join(BP_KINDS)} "
                          f"models; this bundle is model kind {kind!r}")


def run_in_process(module: str, bundle: str | Path, cfg: ProfileConfig, data_spec: str | None,
                   timeout: float = 3600) -> dict:
    """`python -m MODULE --bundle ... --out FILE` in a fresh process; its profile dict."""
    with tempfile.TemporaryDirectory(prefix="edgefa-compare-") as tmp:
        out = Path(tmp) / "profile.json"
        cmd = [sys.executable, "-m", module, "--bundle", str(bundle), "--config", json.dumps(asdict(cfg)),
               "--out", str(out)] + (["--data", data_spec] if data_spec else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise EdgefaError(f"{module} failed: {last}")
        return json.loads(out.read_text())


def compare(dfa: dict, bp: dict) -> dict:
    """The compare report from the two profiles."""
    def ratio(a, b):
        return a / b if a is not None and b not in (None, 0) else None

    step = {k: r["phases"]["train_step"]["latency_ms"].get("p50") for k, r in (("dfa", dfa), ("bp", bp))}
    energy = {k: r["energy"]["per_step_j"] for k, r in (("dfa", dfa), ("bp", bp))}
    methods = {dfa["energy"]["method"], bp["energy"]["method"]}
    return {"schema": "edgefa.compare/1",
            "title": f"edgefa profile compare: {dfa['model']['description']}, DFA vs BP",
            "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": device_description(),
            "model": {"layers": dfa["model"]["layers"], "batch_size": dfa["config"]["batch_size"],
                      "steps": dfa["config"]["steps"]},
            "runs": {DFA: dfa, BP: bp},
            "ratios": {"step_time_p50": ratio(step["dfa"], step["bp"]),
                       "peak_rss": ratio(dfa["memory"]["peak_rss_bytes"], bp["memory"]["peak_rss_bytes"]),
                       "energy_per_step": ratio(energy["dfa"], energy["bp"])},
            "energy_method": ("measured" if methods == {"measured"} else "estimated" if "estimated" in methods
                              else "none"),
            "ratio_definition": RATIO_DEFINITION}
