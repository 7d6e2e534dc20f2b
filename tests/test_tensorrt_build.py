"""TensorRT engines from a bundle's graphs: when an engine may be loaded, the refusal where TensorRT
is absent, and (where TensorRT and a GPU are present) the build itself."""

from __future__ import annotations

import json

import pytest

from edgefa.runtime.tensorrt_build import engine_is_current, tensorrt_missing

from conftest import assert_one_error_line, run_edgefa

IDENTITY = {"tensorrt": "10.3.0", "gpu": "Orin (nvgpu)", "compute_capability": "8.7"}
PROFILE = {"min": 1, "opt": 32, "max": 256}


def test_an_engine_is_loaded_only_for_the_tensorrt_gpu_precision_and_profile_that_built_it():
    record = {"file": "engines/infer.engine", **IDENTITY, "precision": "fp16", "profile": dict(PROFILE)}
    assert engine_is_current(record, IDENTITY, "fp16", PROFILE)
    assert not engine_is_current(None, IDENTITY, "fp16", PROFILE)
    assert not engine_is_current(record, {**IDENTITY, "tensorrt": "10.3.1"}, "fp16", PROFILE)   # another version
    assert not engine_is_current(record, {**IDENTITY, "gpu": "NVIDIA H200"}, "fp16", PROFILE)   # another GPU
    assert not engine_is_current(record, {**IDENTITY, "compute_capability": "9.0"}, "fp16", PROFILE)
    assert not engine_is_current(record, IDENTITY, "fp32", PROFILE)                            # precision
    assert not engine_is_current(record, IDENTITY, "fp16", {**PROFILE, "max": 512})            # profile


@pytest.mark.skipif(tensorrt_missing() is None, reason="TensorRT is installed here: the refusal cannot be shown")
def test_build_engine_without_tensorrt_is_one_line_and_leaves_the_bundle(tiny_bundle):
    before = (tiny_bundle / "manifest.json").read_bytes()
    proc = run_edgefa("device", "build-engine", tiny_bundle, without_torch=True)
    assert_one_error_line(proc, "TensorRT", "trtexec.sh")
    assert (tiny_bundle / "manifest.json").read_bytes() == before and not (tiny_bundle / "engines").exists()


@pytest.mark.skipif(tensorrt_missing() is not None, reason=f"needs TensorRT and a GPU: {tensorrt_missing()}")
def test_engines_build_once_and_verify(tiny_bundle):
    from edgefa.bundle import read_bundle
    from edgefa.runtime.tensorrt_build import build_bundle_engines

    built = []
    engines = build_bundle_engines(tiny_bundle, on_build=built.append)
    assert built == ["infer", "train_step"] and engines["train_step"]["precision"] == "fp32"
    manifest = read_bundle(tiny_bundle).manifest                 # the engines are hashed and verify
    assert {"engines/infer.engine", "engines/train_step.engine"} <= set(manifest["files"])
    again = []
    build_bundle_engines(tiny_bundle, on_build=again.append)
    assert again == []                                           # current engines are loaded, not rebuilt
    stale = json.loads((tiny_bundle / "manifest.json").read_text())
    stale["engines"]["infer"]["tensorrt"] = "0.0.0"              # as if another TensorRT built it
    (tiny_bundle / "manifest.json").write_text(json.dumps(stale))
    rebuilt = []
    build_bundle_engines(tiny_bundle, on_build=rebuilt.append)
    assert rebuilt == ["infer"]


@pytest.mark.skipif(tensorrt_missing() is None, reason="TensorRT is installed here: the refusal cannot be shown")
def test_export_build_engines_without_tensorrt_writes_nothing(tiny_run, tmp_path):
    from conftest import cli_in_process

    proc = cli_in_process("export", tiny_run, "--out", tmp_path / "b", "--build-engines")
    assert_one_error_line(proc, "export --build-engines", "not installed here")
    assert not (tmp_path / "b").exists()
