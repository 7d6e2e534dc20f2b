"""Execution provider choice follows what the installed onnxruntime offers."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from conftest import run_edgefa
from edgefa.device_profiles import AUTO_PROVIDERS
from edgefa.errors import EdgefaError
from edgefa.runtime.engine import choose_providers, tensorrt_options


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


def test_a_requested_provider_keeps_the_ones_after_it_as_fallbacks():
    assert choose_providers("CPUExecutionProvider") == ("CPUExecutionProvider",)
    assert AUTO_PROVIDERS == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    available = set(ort.get_available_providers())
    for requested in (p for p in AUTO_PROVIDERS if p in available):
        chosen = choose_providers(requested)
        assert chosen[0] == requested and chosen[-1] == "CPUExecutionProvider"
        assert list(chosen) == sorted(chosen, key=AUTO_PROVIDERS.index)    # the automatic order below it


def test_tensorrt_options_carry_the_batch_profile_the_caches_and_fp32_training(tiny_bundle):
    from edgefa.bundle import read_bundle

    bundle = read_bundle(tiny_bundle)
    for graph in ("infer", "train_step"):
        session = ort.InferenceSession(str(bundle.graph_path(graph)), providers=["CPUExecutionProvider"])
        inputs = {i.name: list(i.shape) for i in session.get_inputs()}
        options = tensorrt_options(bundle, graph, inputs)
        assert options["trt_engine_cache_path"] == str(tiny_bundle / "state" / "trt_cache")
        allowed = graph == "infer" and (bundle.manifest.get("tensorrt") or {}).get("fp16_infer")
        assert options["trt_fp16_enable"] == ("True" if allowed else "False")    # train_step: always FP32
        batched = [n for n, shape in inputs.items() if shape and isinstance(shape[0], str)]
        assert batched, inputs                               # x (and labels) carry the batch
        profile = (bundle.manifest.get("tensorrt") or {}).get("profile") or {"min": 1, "opt": 32, "max": 256}
        for key in ("min", "opt", "max"):
            specs = dict(item.split(":") for item in options[f"trt_profile_{key}_shapes"].split(","))
            assert sorted(specs) == sorted(batched)
            for name in batched:
                dims = [int(d) for d in specs[name].split("x")]
                assert dims[0] == profile[key] and dims[1:] == inputs[name][1:]
    allowed = dict(bundle.manifest, tensorrt={"fp16_infer": True, "profile": {"min": 2, "opt": 4, "max": 8}})
    bundle = type(bundle)(bundle.path, allowed, bundle.weights, bundle.feedback)
    assert tensorrt_options(bundle, "infer", {"x": ["N", 64]})["trt_fp16_enable"] == "True"
    assert tensorrt_options(bundle, "train_step", {"x": ["N", 64]})["trt_fp16_enable"] == "False"
    assert tensorrt_options(bundle, "infer", {"x": ["N", 64]})["trt_profile_max_shapes"] == "x:8x64"


def test_a_jetson_budget_assumes_the_tensorrt_provider():
    from edgefa.device_profiles import load_profile

    assert load_profile("jetson-orin-nano-8gb").providers[0] == "TensorrtExecutionProvider"
    assert list(load_profile("generic-x86").providers) == ["CPUExecutionProvider"]


GPU_PROVIDERS = [pytest.param(name, marks=pytest.mark.skipif(
    name not in ort.get_available_providers(), reason=f"this onnxruntime has no {name} (needs onnxruntime-gpu{extra})"))
    for name, extra in (("TensorrtExecutionProvider", " built with TensorRT"), ("CUDAExecutionProvider", ""))]


@pytest.mark.parametrize("provider", GPU_PROVIDERS)
def test_ten_steps_on_a_gpu_provider_match_the_cpu_with_the_weights_on_the_gpu(provider, tiny_bundle, tmp_path,
                                                                              digits_npz):
    import shutil

    import numpy as np

    from edgefa.bundle import read_bundle
    from edgefa.runtime.engine import OrtEngine

    cpu_copy = tmp_path / "cpu"
    shutil.copytree(tiny_bundle, cpu_copy)
    data = np.load(digits_npz, allow_pickle=False)
    engines = [OrtEngine(read_bundle(tiny_bundle), choose_providers(provider)),
               OrtEngine(read_bundle(cpu_copy), ("CPUExecutionProvider",))]
    assert engines[0].on_gpu and all(v.device_name() == "cuda" for v in engines[0].sides[0].values())
    bundle = engines[1].bundle
    std = bundle.manifest["input"]["standardize"]
    X = ((data["X"].reshape(len(data["X"]), -1) - std["mean"]) / std["std"]).astype(np.float32)
    y = data["y"].astype(np.int64)
    for step in range(10):
        batch = slice(32 * step, 32 * step + 32)
        for engine in engines:
            engine.step(X[batch], y[batch], 0.01)
    a, b = (engine.state() for engine in engines)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-4
    logits = [engine.predict_logits(X[:64]) for engine in engines]       # inference on the trained weights
    assert float(np.abs(logits[0] - logits[1]).max()) <= 1e-3
