"""The `tensorrt` backend: the refittable inference graph it is built from (carried with
`export --tensorrt`, else derived on the device from infer.onnx without the onnx package: the same
bytes; checked here in onnxruntime), the choice of backend, the one-line refusal where TensorRT or cuda-python is absent,
and (where TensorRT, cuda-python and a GPU are present) 10 steps against onnxruntime on the CPU and
a refit inference engine against infer.onnx."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgefa.bundle import REFIT_GRAPH, param_shapes, read_bundle
from edgefa.errors import EdgefaError
from edgefa.runtime.backends import TENSORRT_BACKEND, check_provider, open_engine
from edgefa.runtime.cuda_memory import cuda_missing
from edgefa.runtime.engine import OrtEngine
from edgefa.runtime.refit_graph import refit_graph_bytes
from edgefa.runtime.tensorrt_build import (engine_is_current, engine_source, engine_source_bytes, engines_problem,
                                           tensorrt_missing)

from conftest import assert_one_error_line, cli_in_process, run_edgefa

WHY_NOT = tensorrt_missing() or cuda_missing()
needs_tensorrt = pytest.mark.skipif(WHY_NOT is not None, reason=f"needs TensorRT, cuda-python and a GPU: {WHY_NOT}")
shows_refusal = pytest.mark.skipif(WHY_NOT is None, reason="TensorRT and cuda-python are here: the refusal cannot be shown")


def _standardized(bundle, digits_npz):
    data = np.load(digits_npz, allow_pickle=False)
    std = bundle.manifest["input"]["standardize"]
    X = ((data["X"].reshape(len(data["X"]), -1) - std["mean"]) / std["std"]).astype(np.float32)
    return X, data["y"].astype(np.int64)


# --- the refittable inference graph (runs everywhere) -----------------------------------------

@pytest.fixture
def refit_bundle(tiny_run, tmp_path):
    """The tiny run exported with `--tensorrt`: it carries tensorrt/infer_refit.onnx."""
    proc = cli_in_process("export", tiny_run, "--out", tmp_path / "with_refit", "--tensorrt")
    assert proc.returncode == 0, proc.stderr
    return tmp_path / "with_refit"


def test_only_export_tensorrt_carries_the_refit_graph_and_the_device_derives_the_same_bytes(
        tiny_bundle, refit_bundle):
    default, carried = read_bundle(tiny_bundle), read_bundle(refit_bundle)
    assert REFIT_GRAPH not in default.manifest["files"] and default.manifest["tensorrt"]["refit_graph"] is None
    assert REFIT_GRAPH in carried.manifest["files"] and carried.manifest["tensorrt"]["refit_graph"] == REFIT_GRAPH
    # the weights travel once by default: the refit graph is a second copy of them
    assert carried.size_bytes() - default.size_bytes() >= sum(a.nbytes for a in default.weights.values())
    # derived from infer.onnx + weights.npz (the same run, so the same weights): the exporter's bytes
    assert engine_source(default, "infer") == REFIT_GRAPH
    assert engine_source_bytes(default, REFIT_GRAPH) == (refit_bundle / REFIT_GRAPH).read_bytes()
    assert engine_source_bytes(carried, REFIT_GRAPH) == (refit_bundle / REFIT_GRAPH).read_bytes()


def test_the_refit_graph_holds_every_weight_by_its_bundle_name_and_computes_infer(refit_bundle, digits_npz):
    tiny_bundle = refit_bundle
    bundle = read_bundle(tiny_bundle)
    model = onnx.load(str(tiny_bundle / REFIT_GRAPH))
    assert [i.name for i in model.graph.input] == ["x"]
    # the refitter sets weights by initializer name: every parameter is one, under the bundle's name
    assert {t.name for t in model.graph.initializer} >= set(param_shapes(bundle.model))
    for t in model.graph.initializer:
        if t.name in bundle.weights:
            assert np.array_equal(onnx.numpy_helper.to_array(t), bundle.weights[t.name])
    X, _ = _standardized(bundle, digits_npz)
    as_inputs = ort.InferenceSession(str(tiny_bundle / "infer.onnx"), providers=["CPUExecutionProvider"])
    as_constants = ort.InferenceSession(str(tiny_bundle / REFIT_GRAPH), providers=["CPUExecutionProvider"])
    expected = as_inputs.run(None, {"x": X[:100], **bundle.weights})[0]
    assert np.array_equal(as_constants.run(None, {"x": X[:100]})[0], expected)
    assert engine_source(bundle, "infer") == REFIT_GRAPH and engine_source(bundle, "train_step") == "train_step.onnx"


def test_a_resmlp_refit_graph_computes_infer_and_is_derived_byte_for_byte(tmp_path):
    from edgefa.exporters.export import export_bundle
    from test_device_resmlp import make_run

    bundle = read_bundle(export_bundle(make_run("gelu", 0.9), tmp_path / "b", refit_graph=True))
    x = np.random.default_rng(0).normal(size=(7, bundle.model["in_features"])).astype(np.float32)
    expected = ort.InferenceSession(str(bundle.path / "infer.onnx")).run(None, {"x": x, **bundle.weights})[0]
    got = ort.InferenceSession(str(bundle.path / REFIT_GRAPH)).run(None, {"x": x})[0]
    assert np.array_equal(got, expected)
    derived = refit_graph_bytes((bundle.path / "infer.onnx").read_bytes(), bundle.weights)
    assert derived == (bundle.path / REFIT_GRAPH).read_bytes()


def test_a_derived_refit_graph_with_new_weights_computes_infer_on_them(tiny_bundle):
    bundle = read_bundle(tiny_bundle)
    rng = np.random.default_rng(1)
    new = {n: rng.normal(size=a.shape).astype(np.float32) for n, a in bundle.weights.items()}
    derived = refit_graph_bytes((tiny_bundle / "infer.onnx").read_bytes(), new)
    onnx.checker.check_model(onnx.ModelProto.FromString(derived), full_check=True)
    x = rng.normal(size=(5, bundle.model["in_features"])).astype(np.float32)
    expected = ort.InferenceSession(str(tiny_bundle / "infer.onnx")).run(None, {"x": x, **new})[0]
    got = ort.InferenceSession(derived).run(None, {"x": x})[0]
    assert np.array_equal(got, expected)


def test_an_engine_from_another_onnx_source_is_not_current():
    identity = {"tensorrt": "10.3.0", "gpu": "Orin (nvgpu)", "compute_capability": "8.7"}
    profile = {"min": 1, "opt": 32, "max": 256}
    record = {**identity, "precision": "fp16", "profile": profile, "onnx": REFIT_GRAPH}
    assert engine_is_current(record, identity, "fp16", profile, REFIT_GRAPH)
    assert not engine_is_current(record, identity, "fp16", profile, "infer.onnx")   # weights as inputs


# --- choosing the backend ---------------------------------------------------------------------

def test_without_engines_the_automatic_choice_is_onnxruntime(tiny_bundle):
    engine = open_engine(read_bundle(tiny_bundle))
    assert isinstance(engine, OrtEngine) and engine.providers[-1] == "CPUExecutionProvider"


@shows_refusal
def test_asking_for_the_tensorrt_backend_without_it_is_one_clear_error(tiny_bundle):
    bundle = read_bundle(tiny_bundle)
    assert engines_problem(bundle) == WHY_NOT
    for call in (lambda: open_engine(bundle, TENSORRT_BACKEND), lambda: check_provider(TENSORRT_BACKEND)):
        with pytest.raises(EdgefaError, match="tensorrt") as err:
            call()
        assert "\n" not in str(err.value) and ("TensorRT" in str(err.value) or "cuda-python" in str(err.value))


@shows_refusal
def test_finetune_with_the_tensorrt_backend_absent_is_one_line_and_writes_no_state(tiny_bundle, digits_npz):
    proc = run_edgefa("device", "finetune", tiny_bundle, "--data", digits_npz, "--steps", "3", "--provider", TENSORRT_BACKEND,
                      without_torch=True)
    assert_one_error_line(proc, "tensorrt")
    assert not (tiny_bundle / "state").exists() or not any((tiny_bundle / "state").glob("*.npz"))


# --- on a GPU with TensorRT -------------------------------------------------------------------

@pytest.fixture
def built_bundle(tiny_bundle):
    from edgefa.runtime.tensorrt_build import build_bundle_engines

    engines = build_bundle_engines(tiny_bundle)
    assert engines["infer"]["refittable"] and engines["infer"]["onnx"] == REFIT_GRAPH
    assert engines["train_step"]["precision"] == "fp32" and not engines["train_step"]["refittable"]
    return tiny_bundle


@needs_tensorrt
def test_ten_tensorrt_steps_match_onnxruntime_on_the_cpu(built_bundle, tmp_path, digits_npz):
    from edgefa.runtime.tensorrt_engine import TensorRTEngine

    cpu_copy = tmp_path / "cpu"
    shutil.copytree(built_bundle, cpu_copy)
    gpu = open_engine(read_bundle(built_bundle))                 # current engines: chosen by default
    cpu = OrtEngine(read_bundle(cpu_copy), ("CPUExecutionProvider",))
    assert isinstance(gpu, TensorRTEngine) and gpu.providers == [TENSORRT_BACKEND]
    X, y = _standardized(cpu.bundle, digits_npz)
    for step in range(10):
        batch = slice(32 * step, 32 * step + 32)
        results = [engine.step(X[batch], y[batch], 0.01) for engine in (gpu, cpu)]
        assert all(r.accepted for r in results)
        assert abs(results[0].loss - results[1].loss) <= 1e-4
    a, b = gpu.state(), cpu.state()
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-4
    # the refit inference engine (FP16 allowed by the manifest) against infer.onnx on the trained weights
    weights = {**cpu.bundle.weights, **{k: v for k, v in b.items() if k in cpu.params}}
    expected = ort.InferenceSession(str(cpu_copy / "infer.onnx")).run(None, {"x": X[:200], **weights})[0]
    got = gpu.predict_logits(X[:200])
    assert float(np.abs(got - expected).max()) <= 2e-2 * max(1.0, float(np.abs(expected).max()))
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.98
    gpu.close()


@needs_tensorrt
def test_loading_a_state_refits_and_a_batch_outside_the_profile_is_one_line(built_bundle, digits_npz):
    from edgefa.runtime.tensorrt_engine import TensorRTEngine

    engine = TensorRTEngine(read_bundle(built_bundle))
    X, y = _standardized(engine.bundle, digits_npz)
    before = engine.predict_logits(X[:64])
    start = engine.state()
    for step in range(5):
        engine.step(X[32 * step:32 * step + 32], y[32 * step:32 * step + 32], 0.05)
    assert not np.allclose(engine.predict_logits(X[:64]), before)        # refit after training
    engine.load_state(start)
    assert np.allclose(engine.predict_logits(X[:64]), before, atol=1e-3)  # refit after a load
    with pytest.raises(EdgefaError, match="outside the engines' profile"):
        engine.step(X[:1000], y[:1000], 0.01)
    engine.close()


@needs_tensorrt
def test_asking_for_tensorrt_builds_missing_engines_first(tiny_bundle):
    from edgefa.runtime.tensorrt_engine import TensorRTEngine

    assert engines_problem(read_bundle(tiny_bundle)) is not None                # none built yet
    built = []
    engine = open_engine(read_bundle(tiny_bundle), TENSORRT_BACKEND, on_build=built.append)
    assert isinstance(engine, TensorRTEngine) and built == ["infer", "train_step"]
    assert engines_problem(read_bundle(tiny_bundle)) is None
    engine.close()


@needs_tensorrt
def test_an_engine_built_for_another_tensorrt_is_never_loaded(built_bundle):
    manifest = json.loads((built_bundle / "manifest.json").read_text())
    manifest["engines"]["train_step"]["tensorrt"] = "0.0.0"
    (built_bundle / "manifest.json").write_text(json.dumps(manifest))
    bundle = read_bundle(built_bundle)
    assert "rebuild" in engines_problem(bundle)
    assert isinstance(open_engine(bundle), OrtEngine)                 # the default falls back to onnxruntime
    rebuilt = []
    open_engine(bundle, TENSORRT_BACKEND, on_build=rebuilt.append).close()   # asked for: rebuilt here
    assert rebuilt == ["train_step"]


# --- GPU memory through cuda-python (a dev dependency: its real calls run here too) -----------

def _gpu_count() -> int:
    from edgefa.runtime.cuda_memory import cudart

    if cuda_missing():
        return 0
    err, count = cudart().cudaGetDeviceCount()
    return count if err == cudart().cudaError_t.cudaSuccess else 0


CUDA_STATE = cuda_missing() or ("a CUDA GPU is here" if _gpu_count() else None)


@pytest.mark.skipif(CUDA_STATE is not None, reason=f"needs cuda-python and no GPU: {CUDA_STATE}")
def test_without_a_gpu_cuda_memory_fails_in_one_line_naming_the_cuda_error():
    from edgefa.runtime.cuda_memory import DeviceArray, Stream

    for make, what in ((Stream, "stream create"), (lambda: DeviceArray((3, 4), np.float32), "cudaMalloc of 48 bytes")):
        with pytest.raises(EdgefaError) as err:
            make()
        assert str(err.value).startswith(f"CUDA {what} failed: cudaError") and "\n" not in str(err.value)


@pytest.mark.skipif(cuda_missing() is not None or not _gpu_count(),
                    reason=f"needs cuda-python and a CUDA GPU: {cuda_missing() or 'no CUDA GPU here'}")
def test_device_arrays_round_trip_and_refuse_what_does_not_fit():
    from edgefa.runtime.cuda_memory import DeviceArray, Stream

    stream = Stream()
    buf = DeviceArray((8, 5), np.float32)                       # capacity 40: any batch up to 8 fits
    data = np.arange(15, dtype=np.float32).reshape(3, 5)
    buf.upload(data, stream)
    assert np.array_equal(buf.download(stream), data) and buf.shape == (3, 5)
    with pytest.raises(EdgefaError, match="does not fit"):
        buf.upload(np.zeros((9, 5), np.float32), stream)
    with pytest.raises(EdgefaError, match="C-contiguous float32"):
        buf.upload(np.zeros((2, 5), np.float64), stream)
    buf.free()
    stream.close()
