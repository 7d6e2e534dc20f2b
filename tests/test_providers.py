"""Execution provider choice follows what the installed onnxruntime offers."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from conftest import run_edgefa
from edgefa.errors import EdgefaError
from edgefa.runtime.engine import AUTO_PROVIDERS, choose_providers


def test_auto_choice_is_the_available_subset_in_preference_order():
    available = set(ort.get_available_providers())
    chosen = choose_providers()
    assert chosen == tuple(p for p in AUTO_PROVIDERS if p in available)
    assert chosen[-1] == "CPUExecutionProvider"


def test_requested_provider_that_is_absent_is_one_clear_error(tiny_bundle, digits_npz):
    missing = "NoSuchExecutionProvider"
    with pytest.raises(EdgefaError, match="not available here"):
        choose_providers(missing)
    proc = run_edgefa("device", "finetune", tiny_bundle, "--data", digits_npz, "--steps", "1",
                      "--provider", missing, without_torch=True)
    assert proc.returncode == 2
    assert "NoSuchExecutionProvider' is not available" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tiny_bundle / "state").exists()
