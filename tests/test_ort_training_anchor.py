"""The ort-training anchor of benchmarks/device_step.py really trains the bundle's MLP by BP with
plain SGD at the bundle's lr: from the same weights on the same batches, its per-step losses
follow torch's BP step (the torch worker, momentum 0) within float32 noise, and the update moves
the loss (at lr 0.5 a revisited batch's loss drops far beyond that noise).

Needs benchmarks/.venv-ort-training, which device_step.py makes (onnxruntime-training 1.19.2 and
numpy < 2 cannot share the repository's venv); skipped where it has not been made."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import _ort_training_anchor as anchor  # noqa: E402

LR, STEPS = 0.5, 6  # 4 seeded batches in turn: steps 5 and 6 revisit the batches of steps 1 and 2


def _bundle(out: Path) -> Path:
    import torch

    from edgefa.exporters.export import export_bundle
    from edgefa.models import MLP, MLPConfig
    from edgefa.shared.datasets import Standardizer
    from edgefa.training.trainer import Run, TrainConfig, make_optimizer

    torch.manual_seed(0)
    model = MLP(MLPConfig(32, [16, 16], 4, rule="dfa"))
    run = Run(model, make_optimizer(model, LR, 0.0), TrainConfig(method="dfa", hidden=[16, 16], lr=LR, momentum=0.0),
              Standardizer(0.0, 1.0), {"final_test_accuracy": None}, None)
    return export_bundle(run, out / "bundle", momentum=0.0)


def _start(python: str, script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([python, str(REPO / "benchmarks" / script), *args, "--threads", "1"], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _losses(worker: subprocess.Popen) -> tuple[list[float], dict]:
    """STEPS single steps, then finish: (the losses, the finish reply)."""
    out, err = worker.communicate("step\n" * STEPS + "finish\nquit\n", timeout=300)
    assert worker.returncode == 0, err[-2000:]
    replies = [json.loads(line) for line in out.splitlines()]
    return [r["loss"] for r in replies[1:1 + STEPS]], replies[-1]


def test_ort_training_step_is_bp_sgd_like_torch(tmp_path):
    python = anchor.venv_python()
    if anchor._versions(python) is None:
        pytest.skip(f"{anchor.VENV} not made (benchmarks/device_step.py makes it)")
    bundle = _bundle(tmp_path)
    built = anchor.build_artifacts(python, bundle, tmp_path / "artifacts")
    assert {"checkpoint", "training_model.onnx", "optimizer_model.onnx"} <= set(built["built"])
    assert built["params"] == 6

    ort_w = _start(str(python), anchor.WORKER, "--bundle", str(bundle), "--artifacts", str(tmp_path / "artifacts"))
    torch_w = _start(sys.executable, "_device_torch_worker.py", "--bundle", str(bundle), "--momentum", "0")
    (ort_losses, ort_end), (torch_losses, _) = _losses(ort_w), _losses(torch_w)

    assert ort_end["params_finite"] and not ort_end["torch_imported"]
    np.testing.assert_allclose(ort_losses, torch_losses, rtol=1e-4)
    # the update happened: the first batch's loss on its second visit (step 5) is clearly lower
    assert ort_losses[4] < ort_losses[0] - 2e-3  # measured: 1.3896 -> 1.3828, 50x the tolerance above
