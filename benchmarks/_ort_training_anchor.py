"""The ort-training anchor of benchmarks/device_step.py: its own venv, its artifacts, its workers.

onnxruntime-training's last release (1.19.2) ships its own `onnxruntime` module (it would replace
the onnxruntime 1.32 edgefa runs on) and needs numpy < 2, so it cannot live in the repository's
venv or in a pip extra beside it. `ensure_venv` makes benchmarks/.venv-ort-training (gitignored)
with `python -m venv` and pip, once; later runs reuse it after checking the pinned versions. When
it cannot be made (no network, no wheel for this Python), the reason goes into the JSON instead
of the anchor's figures.

onnx is pinned to 1.16.2, the release onnxruntime 1.19 was built against: generate_artifacts
writes its optimizer graph with the installed onnx's IR version, and onnxruntime 1.19 refuses
IR > 10 (onnx 1.17+ writes 11 and later).

Two contenders run from this venv, paired with the others in device_step.py:
  ort_training        benchmarks/_device_ort_training_worker.py: BP via onnxruntime.training.api
  runtime_same_build  benchmarks/_device_runtime_worker.py, edgefa's DFA step on the same
                      onnxruntime 1.19.2 build (edgefa's device side needs only numpy and
                      onnxruntime to step), so engine versions are not part of that ratio.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-ort-training"
PINS = {"onnxruntime-training": "1.19.2", "numpy": "<2", "onnx": "1.16.2"}
REQUIREMENTS = ["onnxruntime-training==1.19.2", "numpy<2", "onnx==1.16.2"]
WORKER = "_device_ort_training_worker.py"

_PROBE = ("import json, numpy, onnx, onnxruntime; print(json.dumps({'onnxruntime': onnxruntime.__version__, "
          "'numpy': numpy.__version__, 'onnx': onnx.__version__}))")


def venv_python() -> Path:
    return VENV / "bin" / "python"


def _versions(python: Path) -> dict | None:
    """The venv's versions, or None when it is missing, broken or not at the pins."""
    if not python.exists():
        return None
    p = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        return None
    v = json.loads(p.stdout.strip().splitlines()[-1])
    ok = (v["onnxruntime"] == PINS["onnxruntime-training"] and v["onnx"] == PINS["onnx"]
          and int(v["numpy"].split(".")[0]) < 2)
    return v if ok else None


def ensure_venv(log=print) -> tuple[Path | None, dict]:
    """(python of the venv, its versions) or (None, {"reason": one line}) when it cannot be made."""
    py = venv_python()
    versions = _versions(py)
    if versions:
        return py, versions
    base = getattr(sys, "_base_executable", None) or sys.executable  # the interpreter under .venv
    log(f"making {VENV.relative_to(HERE.parent)} ({' '.join(REQUIREMENTS)}; ~300 MB, once)")
    steps = [[base, "-m", "venv", "--clear", str(VENV)],
             [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *REQUIREMENTS]]
    for cmd in steps:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, {"reason": f"{' '.join(cmd[:4])}: {e}"}
        if p.returncode != 0:
            lines = [ln for ln in (p.stderr or p.stdout).splitlines() if ln.strip()
                     and not ln.startswith("WARNING: Location")]
            return None, {"reason": f"{' '.join(cmd[2:5])} failed (rc {p.returncode}): "
                                    f"{lines[-1] if lines else 'no output'}"}
    versions = _versions(py)
    if not versions:
        return None, {"reason": f"{VENV} was made but does not import onnxruntime-training "
                                f"{PINS['onnxruntime-training']} with numpy<2 and onnx {PINS['onnx']}"}
    return py, versions


def build_artifacts(python: Path, bundle: Path, out: Path) -> dict:
    """Training artifacts for the bundle's MLP, written by the worker's --build in a process of
    its own (so generating them is never in the timed worker's peak RSS)."""
    p = subprocess.run([str(python), str(HERE / WORKER), "--bundle", str(bundle), "--artifacts", str(out),
                        "--build"], capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        tail = [ln for ln in p.stderr.splitlines() if ln.strip()][-3:]
        raise RuntimeError(f"ort-training artifacts for {bundle} failed: {' | '.join(tail)}")
    return json.loads(p.stdout.strip().splitlines()[-1])


OPTIMIZER_NOTE = {
    0.0: "same optimizer: plain SGD on both sides",
    0.9: "onnxruntime-training offers only SGD without momentum (SGDOptimizerV2) and AdamW; its plain "
         "SGD stands in for SGD momentum 0.9 (less work than edgefa's momentum update, so the ratio "
         "is conservative for edgefa)",
}


def start_workers(worker_cls, python: Path, bundle: Path, artifacts: Path, common_args: list[str]) -> dict:
    """The two contenders that run in the anchor venv, started like device_step's own workers."""
    return {"ort_training": worker_cls(WORKER, "--bundle", str(bundle), "--artifacts", str(artifacts),
                                       *common_args[2:], python=str(python)),
            "runtime_same_build": worker_cls("_device_runtime_worker.py", *common_args, python=str(python))}


def summarize(results: dict, mem: dict, clean, momentum: float, ratio_summary, ms, spread) -> dict:
    """Ratios against ORT-training's BP step (edgefa's runtime on the repository's onnxruntime, and
    on the anchor's own 1.19.2 build), its phases, peak RSS of each, and whether the numbers are of
    a sane model."""
    import numpy as np

    t = {n: np.array([r["t"] for r in results[n]]) for n in ("runtime", "runtime_same_build", "ort_training")}
    ot, ok = results["ort_training"], np.asarray(clean, bool)
    peak = {n: mem[n]["peak_rss_bytes"] for n in ("runtime", "runtime_same_build", "ort_training")}
    return {
        "what": "onnxruntime-training 1.19.2 on-device training (onnxruntime.training.api Module + Optimizer; "
                "artifacts from generate_artifacts: full BP gradient graph, CrossEntropyLoss, OptimType.SGD)",
        "optimizer": OPTIMIZER_NOTE.get(momentum, OPTIMIZER_NOTE[0.9]),
        "step_runtime_over_ort_training": ratio_summary(t["runtime"], t["ort_training"], "runtime",
                                                        "ort_training", clean),
        "step_runtime_same_build_over_ort_training": ratio_summary(
            t["runtime_same_build"], t["ort_training"], "runtime_same_build", "ort_training", clean),
        "ort_training_phases_ms": {k: ms([r[k] for r, c in zip(ot, ok) if c])
                                   for k in ("train_step", "optimizer", "reset_grad")},
        "involuntary_context_switches_per_step": {n: spread([r["nivcsw"] for r in results[n]])
                                                  for n in ("runtime_same_build", "ort_training")},
        "memory": {"ort_training": mem["ort_training"], "runtime_same_build": mem["runtime_same_build"],
                   "peak_rss_ratio_runtime_over_ort_training": peak["runtime"] / peak["ort_training"],
                   "peak_rss_ratio_runtime_same_build_over_ort_training":
                       peak["runtime_same_build"] / peak["ort_training"]},
        "numerics": {"ort_training_all_losses_finite": bool(np.isfinite([r["loss"] for r in ot]).all()),
                     "ort_training_params_finite_at_end": mem["ort_training"]["params_finite"],
                     "runtime_same_build_refused_steps": mem["runtime_same_build"]["refused"],
                     "torch_imported": {n: mem[n]["torch_imported"] for n in ("ort_training", "runtime_same_build")}},
        "losses_first_last": {n: [results[n][0]["loss"], results[n][-1]["loss"]]
                              for n in ("ort_training", "runtime_same_build")},
    }


def report_lines(a: dict, fmt) -> list[str]:
    s, s2, m = a["step_runtime_over_ort_training"], a["step_runtime_same_build_over_ort_training"], a["memory"]
    mib = 1 << 20
    return [f"  ort-training BP {fmt(s['ort_training_ms'], ' ms')} (plain SGD: the only SGD it offers)",
            f"  runtime/ort-training per pair: {fmt(s['ratio_stats'])}",
            f"  runtime on ort-training's onnxruntime {fmt(s2['runtime_same_build_ms'], ' ms')}; "
            f"/ort-training per pair: {fmt(s2['ratio_stats'])}",
            f"  peak RSS ort-training {m['ort_training']['peak_rss_bytes'] / mib:.0f} MiB, runtime/ort-training "
            f"{m['peak_rss_ratio_runtime_over_ort_training']:.3f} (same build "
            f"{m['peak_rss_ratio_runtime_same_build_over_ort_training']:.3f})"]
