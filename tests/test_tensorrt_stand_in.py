"""edgefa's TensorRT backend end to end on machines without TensorRT: TensorRT's and cuda-python's
APIs are replaced by the stand-ins in stand_in_tensorrt.py (an "engine" is the bundle's own ONNX
graph run by onnxruntime; "GPU memory" is host memory). Everything of edgefa's runs for real: the
backend's bindings and ping-pong sides, the finiteness proof, the refit bookkeeping, the batch
profile, the choice of backend, and fine-tuning with checkpoints. What only a GPU with TensorRT
can show (TensorRT's own numerics, FP16) is in test_tensorrt_engine.py."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from edgefa.bundle import MANIFEST, REFIT_GRAPH, read_bundle, sha256_file
from edgefa.errors import EdgefaError
from edgefa.runtime.backends import TENSORRT_BACKEND, open_engine
from edgefa.runtime.engine import OrtEngine
from edgefa.runtime.tensorrt_build import bundle_profile, engine_plan, engine_source_bytes, engines_problem

from stand_in_tensorrt import StandInCudart, stand_in_tensorrt

GPU = "Stand-in GPU"


@pytest.fixture
def stand_in(monkeypatch):
    """install(version) puts the stand-ins where `import tensorrt` and cuda-python are found."""
    import cuda.bindings

    cudart = StandInCudart(GPU.encode())
    monkeypatch.setattr(cuda.bindings, "runtime", cudart)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)

    def install(version: str = "10.3.0"):
        trt = stand_in_tensorrt(version, cudart)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        return trt

    return install


def with_engines(bundle_dir, version: str, infer_source: str = REFIT_GRAPH):
    """Record "engines" in the bundle as build-engine would (hashed, with what they were built
    for); for the stand-in an engine's bytes are its ONNX source's (the refit graph derived where the
    bundle does not carry it, as build-engine derives it)."""
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    bundle = read_bundle(bundle_dir)
    plan = engine_plan(bundle)
    (bundle_dir / "engines").mkdir(exist_ok=True)
    manifest["engines"] = {}
    for graph, (precision, source) in plan.items():
        source = infer_source if graph == "infer" else source
        name = f"engines/{graph}.engine"
        (bundle_dir / name).write_bytes(engine_source_bytes(bundle, source))
        manifest["files"][name] = {"sha256": sha256_file(bundle_dir / name), "bytes": (bundle_dir / name).stat().st_size}
        manifest["engines"][graph] = {"file": name, "onnx": source, "tensorrt": version, "gpu": GPU,
                                      "compute_capability": "8.7", "precision": precision,
                                      "profile": bundle_profile(manifest), "refittable": source == REFIT_GRAPH}
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return read_bundle(bundle_dir)


def digits(bundle, digits_npz):
    data = np.load(digits_npz, allow_pickle=False)
    std = bundle.manifest["input"]["standardize"]
    X = ((data["X"].reshape(len(data["X"]), -1) - std["mean"]) / std["std"]).astype(np.float32)
    return X, data["y"].astype(np.int64)


def reference(tiny_bundle, tmp_path) -> OrtEngine:
    copy = tmp_path / "cpu"
    shutil.copytree(tiny_bundle, copy)
    return OrtEngine(read_bundle(copy), ("CPUExecutionProvider",), allow_in_place=False)   # TensorRT's arithmetic


@pytest.mark.parametrize("version", ["10.3.0", "8.5.2"])   # refit from GPU memory (10) or through the host (8.x)
def test_steps_match_onnxruntime_and_evaluation_refits_once_per_change_of_weights(
        stand_in, version, tiny_bundle, tmp_path, digits_npz):
    from edgefa.runtime.tensorrt_engine import TensorRTEngine

    trt = stand_in(version)
    cpu = reference(tiny_bundle, tmp_path)
    gpu = open_engine(with_engines(tiny_bundle, version))             # engines current here: chosen by default
    assert isinstance(gpu, TensorRTEngine) and gpu.providers == [TENSORRT_BACKEND]
    X, y = digits(cpu.bundle, digits_npz)
    refitter = trt.refitters[0]

    before = gpu.predict_logits(X[:100])
    assert np.allclose(before, cpu.predict_logits(X[:100]), atol=1e-5)
    gpu.predict_logits(X[:100])
    assert refitter.refits == 1                                        # no new weights, no second refit
    start = gpu.state()
    for step in range(10):
        batch = slice(32 * step, 32 * step + 32)
        results = [engine.step(X[batch], y[batch], 0.05) for engine in (gpu, cpu)]
        assert all(r.accepted for r in results) and abs(results[0].loss - results[1].loss) <= 1e-5
        assert np.allclose(results[0].logits, results[1].logits, atol=1e-5)
    a, b = gpu.state(), cpu.state()
    assert set(a) == set(b) and max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-5
    after = gpu.predict_logits(X[:100])
    assert refitter.refits == 2 and np.allclose(after, cpu.predict_logits(X[:100]), atol=1e-5)
    assert not np.allclose(after, before, atol=1e-3)                   # training moved the evaluated weights
    gpu.load_state(start)
    assert np.allclose(gpu.predict_logits(X[:100]), before, atol=1e-6) and refitter.refits == 3
    gpu.close()
    assert not trt.cudart.blocks                                       # every GPU buffer was freed


def test_a_refused_step_keeps_the_weights_and_needs_no_refit(stand_in, tiny_bundle, digits_npz):
    trt = stand_in()
    gpu = open_engine(with_engines(tiny_bundle, "10.3.0"))
    X, y = digits(gpu.bundle, digits_npz)
    gpu.predict_logits(X[:10])
    start = gpu.state()
    assert not gpu.step(X[:32], y[:32], float("nan")).accepted
    assert all(np.array_equal(start[k], v) for k, v in gpu.state().items())
    gpu.predict_logits(X[:10])
    assert trt.refitters[0].refits == 1


def test_an_infer_engine_with_weights_as_inputs_reads_the_live_buffers(stand_in, tiny_bundle, tmp_path, digits_npz):
    trt = stand_in()
    gpu = open_engine(with_engines(tiny_bundle, "10.3.0", infer_source="infer.onnx"))   # an older edgefa's
    cpu = reference(tiny_bundle, tmp_path)
    assert gpu.providers == [TENSORRT_BACKEND] and not gpu.refittable
    X, y = digits(cpu.bundle, digits_npz)
    for engine in (gpu, cpu):
        engine.step(X[:32], y[:32], 0.05)
    assert not trt.refitters                                           # nothing to refit: weights are bound
    assert np.allclose(gpu.predict_logits(X[:50]), cpu.predict_logits(X[:50]), atol=1e-5)


def test_batches_outside_the_profile(stand_in, tiny_bundle, digits_npz):
    stand_in()
    manifest = json.loads((tiny_bundle / MANIFEST).read_text())
    manifest["tensorrt"]["profile"] = {"min": 4, "opt": 8, "max": 16}
    (tiny_bundle / MANIFEST).write_text(json.dumps(manifest))
    gpu = open_engine(with_engines(tiny_bundle, "10.3.0"))
    X, y = digits(gpu.bundle, digits_npz)
    with pytest.raises(EdgefaError, match=r"a batch of 32 is outside the engines' profile 4\.\.16"):
        gpu.step(X[:32], y[:32], 0.01)
    assert gpu.step(X[:16], y[:16], 0.01).accepted
    logits = gpu.predict_logits(X[:35])            # chunks of 16, 16 and a last 3 padded to the minimum 4
    assert logits.shape == (35, 10)
    assert np.allclose(logits[32:], gpu.predict_logits(X[32:36])[:3], atol=1e-6)


def test_stale_engines_are_never_loaded(stand_in, tiny_bundle):
    stand_in("10.3.0")
    bundle = with_engines(tiny_bundle, "10.2.0")                       # built by another TensorRT
    assert "rebuild it" in engines_problem(bundle) and "TensorRT 10.3.0" in engines_problem(bundle)
    assert isinstance(open_engine(bundle), OrtEngine)                  # the default: onnxruntime


def test_finetuning_through_the_backend_checkpoints_and_resumes(stand_in, tiny_bundle, tmp_path, digits_npz):
    from edgefa.shared.datasets import load_npz
    from edgefa.runtime.finetune import FinetuneConfig, Finetuner
    from edgefa.runtime.state import load_state

    stand_in()
    with_engines(tiny_bundle, "10.3.0")
    ort_copy = tmp_path / "ort"
    shutil.copytree(tiny_bundle, ort_copy)
    data = load_npz(digits_npz)

    def tune(path, steps, provider):
        return Finetuner(read_bundle(path), data, FinetuneConfig(steps=steps, checkpoint_every=5, provider=provider),
                         eval_data=data).run()

    first = tune(tiny_bundle, 12, TENSORRT_BACKEND)
    assert first["providers"] == [TENSORRT_BACKEND] and first["final_step"] == 12
    resumed = tune(tiny_bundle, 20, None)                              # current engines: chosen again
    assert resumed["resumed_from_step"] == 12 and resumed["providers"] == [TENSORRT_BACKEND]
    plain = tune(ort_copy, 20, "CPUExecutionProvider")
    names = OrtEngine(read_bundle(ort_copy), ("CPUExecutionProvider",)).state_names
    a, b = load_state(read_bundle(tiny_bundle), names), load_state(read_bundle(ort_copy), names)
    assert a.step == b.step == 20
    assert max(float(np.abs(a.tensors[k] - b.tensors[k]).max()) for k in b.tensors) <= 1e-5
    assert abs(resumed["accuracy_after"] - plain["accuracy_after"]) <= 0.01


def test_build_engine_builds_records_and_keeps_current_engines(stand_in, tiny_bundle, digits_npz):
    from conftest import cli_in_process
    from edgefa.runtime.tensorrt_engine import TensorRTEngine

    trt = stand_in("10.3.0")
    assert not (tiny_bundle / REFIT_GRAPH).exists()      # a default export: the device derives the refit graph
    proc = cli_in_process("device", "build-engine", tiny_bundle)
    assert proc.returncode == 0, proc.stderr
    assert "infer: engines/infer.engine (TensorRT 10.3.0" in proc.stdout and "refittable" in proc.stdout
    bundle = read_bundle(tiny_bundle)                                  # the engines are hashed and verify
    engines = bundle.manifest["engines"]
    assert engines["infer"]["onnx"] == REFIT_GRAPH and engines["infer"]["refittable"]
    assert engines["infer"]["precision"] == "fp16" and engines["train_step"]["precision"] == "fp32"
    assert engines["infer"]["gpu"] == GPU and engines["train_step"]["compute_capability"] == "8.7"
    infer, train = trt.builds
    assert infer["flags"] == {"FP16", "REFIT"} and train["flags"] == set()    # the DFA update stays FP32
    assert infer["inputs"] == ["x"] and train["profile"]["labels"] == ((1,), (32,), (256,))
    assert (tiny_bundle / "state" / "trt_cache" / "timing.cache").read_bytes() == b"++"   # shared by both builds

    again = cli_in_process("device", "build-engine", tiny_bundle)
    assert again.returncode == 0 and len(trt.builds) == 2              # current engines are kept
    engine = open_engine(bundle)
    assert isinstance(engine, TensorRTEngine)
    X, y = digits(bundle, digits_npz)
    assert engine.step(X[:32], y[:32], 0.01).accepted


@pytest.mark.parametrize("version", ["10.3.0", "8.5.2"])
def test_asking_for_tensorrt_builds_missing_or_stale_engines_first(stand_in, version, tiny_bundle):
    from edgefa.runtime.tensorrt_engine import TensorRTEngine

    trt = stand_in(version)
    built = []
    engine = open_engine(read_bundle(tiny_bundle), TENSORRT_BACKEND, on_build=built.append)
    assert isinstance(engine, TensorRTEngine) and built == ["infer", "train_step"]
    stale = with_engines(tiny_bundle, "0.0.1")                         # as if another TensorRT built them
    rebuilt = []
    open_engine(stale, TENSORRT_BACKEND, on_build=rebuilt.append)
    assert rebuilt == ["infer", "train_step"] and len(trt.builds) == 4
    assert engines_problem(read_bundle(tiny_bundle)) is None
