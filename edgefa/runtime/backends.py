"""Which engine runs a bundle here: edgefa's own TensorRT engines, or onnxruntime.

    --provider tensorrt          the bundle's engines (BUNDLE/engines/) through TensorRT itself,
                                 built first where they are missing or were built for another
                                 TensorRT or GPU (so `serve --provider tensorrt` needs no extra step)
    --provider <onnxruntime EP>  onnxruntime with that execution provider (then the ones after it)
    (nothing)                    the bundle's engines when they were built for this TensorRT and
                                 GPU, else onnxruntime's best: TensorRT EP, CUDA EP, CPU
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnxruntime as ort

from ..bundle import Bundle, read_bundle
from ..errors import BundleError, EdgefaError
from .cuda_memory import cuda_missing
from .engine import DeviceEngine, OrtEngine, choose_providers, on_gpu
from .tensorrt_build import build_bundle_engines, engines_problem, tensorrt_missing
from .tensorrt_engine import BACKEND as TENSORRT_BACKEND, TensorRTEngine


def check_provider(provider: str | None) -> None:
    """Refuse, in one line, a provider that cannot run here (before any bundle is loaded)."""
    if provider == TENSORRT_BACKEND:
        missing = tensorrt_missing() or cuda_missing()
        if missing:
            raise EdgefaError(f"--provider {TENSORRT_BACKEND}: {missing}")
    else:
        choose_providers(provider)


def runs_on_gpu(provider: str | None) -> bool:
    return provider == TENSORRT_BACKEND or on_gpu(choose_providers(provider))


def available_backends() -> dict[str, str]:
    """Each backend this device could use, with "available" or why not (for `device info`)."""
    why_not = tensorrt_missing() or cuda_missing()
    return {TENSORRT_BACKEND: why_not or "available (needs engines built for this device)",
            **{p: "available" for p in ort.get_available_providers()}}


def open_engine(bundle: Bundle, provider: str | None = None, threads: int | None = None,
                on_build: Callable[[str], None] | None = None) -> DeviceEngine:
    if provider == TENSORRT_BACKEND:
        if engines_problem(bundle) and not (tensorrt_missing() or cuda_missing()):
            build_bundle_engines(bundle.path, on_build=on_build)       # TensorRT is here: build them here
            bundle = read_bundle(bundle.path)
        return TensorRTEngine(bundle)       # its one-line refusal names what is still missing
    if provider is None and bundle.manifest.get("engines") and engines_problem(bundle) is None:
        return TensorRTEngine(bundle)
    return OrtEngine(bundle, choose_providers(provider), threads)


def open_checked_engine(bundle: Bundle, provider: str | None = None, threads: int | None = None) -> DeviceEngine:
    """`open_engine`, then one forward pass on a zero batch: a bundle that passes its hashes but
    cannot run (a truncated graph re-hashed, an operator this onnxruntime lacks, graphs that do not
    take the bundle's tensors) fails here as one BundleError line, before anything uses it."""
    try:
        engine = open_engine(bundle, provider, threads)
        logits = engine.predict_logits(np.zeros((1, bundle.model["in_features"]), np.float32))
        load_every_graph(bundle)        # the ones this engine does not run too (a GPU runs train_step.onnx)
    except EdgefaError:
        raise
    except Exception as exc:     # onnxruntime's own errors: the bundle's graphs do not bind or run
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"{bundle.path}: cannot be loaded ({text})") from None
    if logits.shape != (1, bundle.model["n_classes"]) or not np.isfinite(logits).all():
        raise BundleError(f"{bundle.path}: a forward pass on a zero batch gave logits of shape "
                          f"{list(logits.shape)}, finite: {bool(np.isfinite(logits).all())}")
    return engine


def graph_names(bundle: Bundle) -> list[str]:
    """Every graph file the manifest lists (infer, train_step, and the optional ones)."""
    return [name for key, name in (bundle.manifest.get("graphs") or {}).items() if key != "opset"]


def load_every_graph(bundle: Bundle) -> None:
    """Load every graph the manifest lists in onnxruntime's CPU provider: an engine opens only those
    it runs (a GPU device runs train_step.onnx, the CPU its step-factors graph), and a deploy, a
    server's start and `device verify` vouch for all of them. One BundleError line naming the graph."""
    from .engine import load_session

    for name in graph_names(bundle):
        load_session(bundle.path / name, providers=["CPUExecutionProvider"])
