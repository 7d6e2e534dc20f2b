"""TensorRT engines for a bundle's two graphs, built where TensorRT lives (`edgefa device build-engine`).

Device side: numpy, the `tensorrt` Python bindings (JetPack's python3-libnvinfer) and cuda-python
for the GPU's name, imported only when a build runs; never torch, never onnx.

    BUNDLE/engines/infer.engine        from tensorrt/infer_refit.onnx (the weights as initializers),
                                       refittable; FP16 where the manifest allows it (fp16_infer).
                                       A bundle exported without --tensorrt does not carry that
                                       graph: it is derived here from infer.onnx and weights.npz
                                       (runtime/refit_graph.py, no onnx package needed)
    BUNDLE/engines/train_step.engine   always FP32: the DFA update is not built in half precision
    BUNDLE/state/trt_cache/timing.cache   the builder's timing cache, reused by every later build

Each engine gets one optimization profile, the manifest's batch profile (min, opt, max) over dim 0
of every input that carries the batch. Engines are hashed in the manifest like every other file,
and its `engines` section records what each was built for: the TensorRT version, the GPU (name and
compute capability), the precision and the ONNX file. An engine whose record does not match this
device is rebuilt, never loaded: a serialized engine is only valid for the TensorRT version and
GPU that built it.

The train-step engine takes the weights as *inputs*: it reads and writes the live ping-pong
buffers, so training never touches the engine. The inference engine holds them as constants
(TensorRT folds them, and stores them in FP16 where allowed) and is refit from the current
weights before an evaluation (runtime.tensorrt_engine), never rebuilt for new weights.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Callable

from ..bundle import MANIFEST, REFIT_GRAPH, STATE_DIR, read_bundle, sha256_file, write_atomically
from ..errors import EdgefaError
from .cuda_memory import check, cuda_missing, cudart
from .refit_graph import refit_graph_bytes

ENGINE_DIR = "engines"
GRAPHS = ("infer", "train_step")
DEFAULT_PROFILE = {"min": 1, "opt": 32, "max": 256}     # what export writes when told nothing


def tensorrt_missing() -> str | None:
    """Why TensorRT cannot build here (None: it can)."""
    try:
        importlib.import_module("tensorrt")          # its shared libraries load here, or fail here
    except ImportError as exc:
        return f"TensorRT's Python bindings are not installed here ({exc})"
    return None


def gpu_identity() -> dict:
    """The GPU engines are built for: its name and compute capability (cuda-python)."""
    props = check(cudart().cudaGetDeviceProperties(0), "query of GPU 0 (no CUDA GPU to build or run engines on?)")
    name = props.name.decode("utf-8", "replace") if isinstance(props.name, bytes) else str(props.name)
    return {"gpu": name.rstrip("\x00").strip(), "compute_capability": f"{props.major}.{props.minor}"}


def engine_is_current(record: dict | None, identity: dict, precision: str, profile: dict,
                      source: str | None = None) -> bool:
    """Whether an engine recorded in the manifest may be loaded here: built by this TensorRT
    version, for this GPU, in this precision, for this batch profile (and, given `source`, from
    that ONNX file: an engine from infer.onnx takes the weights as inputs, one from the refit
    graph holds them)."""
    if not isinstance(record, dict):
        return False
    wanted = {**identity, "precision": precision, "profile": dict(profile)}
    if source is not None:
        wanted["onnx"] = source
    return all(record.get(key) == value for key, value in wanted.items())


def build_engine(onnx_path: Path, profile: dict, fp16: bool, timing_cache: Path,
                 workspace_bytes: int | None = None, refittable: bool = False,
                 onnx_bytes: bytes | None = None) -> bytes:
    """One serialized engine from one ONNX graph (TensorRT's Builder, OnnxParser and
    build_serialized_network), with the batch profile and the timing cache; `refittable`: its
    weights (the graph's initializers) can be replaced later by name (trt.Refitter).
    `onnx_bytes`: the graph's bytes where they are not a file (`onnx_path` then names it)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    # TensorRT 10 networks are always explicit-batch (the flag is gone); 8.x must ask for it.
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes() if onnx_bytes is None else onnx_bytes):
        reason = str(parser.get_error(0)) if parser.num_errors else "no reason given"
        raise EdgefaError(f"{onnx_path}: TensorRT {trt.__version__} cannot parse it ({reason.splitlines()[0]})")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    shapes = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = list(tensor.shape)
        if dims and dims[0] == -1:                      # the batch: the profile's range
            rest = dims[1:]
            shapes.set_shape(tensor.name, (profile["min"], *rest), (profile["opt"], *rest), (profile["max"], *rest))
    config.add_optimization_profile(shapes)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgefaError(f"{onnx_path}: TensorRT {trt.__version__} could not build an engine (its log says why)")
    write_atomically(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def engine_is_usable(record: dict | None, identity: dict, precision: str, profile: dict, source: str,
                     bundle) -> bool:
    """engine_is_current for the planned source, or for an infer engine an older edgefa built from
    infer.onnx itself (weights as inputs: valid, bound to the live buffers instead of refit)."""
    return (engine_is_current(record, identity, precision, profile, source)
            or (source == REFIT_GRAPH
                and engine_is_current(record, identity, precision, profile, bundle.manifest["graphs"]["infer"])))


def engine_source(bundle, graph: str) -> str:
    """The ONNX graph an engine for `graph` is built from: the infer engine from the refit graph
    (weights as initializers; the bundle's file, or derived here where it has none), the
    train-step engine from train_step.onnx."""
    if graph == "infer":
        return REFIT_GRAPH
    return bundle.manifest["graphs"][graph]


def engine_source_bytes(bundle, source: str) -> bytes:
    """The bytes of an engine's ONNX source: the bundle's file (hashed by read_bundle), or for a
    refit graph the bundle does not carry, infer.onnx with the bundle's weights as initializers."""
    if source == REFIT_GRAPH and REFIT_GRAPH not in bundle.manifest.get("files", {}):
        return refit_graph_bytes((bundle.path / bundle.manifest["graphs"]["infer"]).read_bytes(), bundle.weights)
    return (bundle.path / source).read_bytes()


def bundle_profile(manifest: dict) -> dict:
    """The batch profile (min, opt, max) the bundle's engines are built for."""
    return {k: int(v) for k, v in ((manifest.get("tensorrt") or {}).get("profile") or DEFAULT_PROFILE).items()}


def engine_plan(bundle) -> dict[str, tuple[str, str]]:
    """Per graph, the precision and the ONNX source its engine must have on this bundle."""
    fp16 = bool((bundle.manifest.get("tensorrt") or {}).get("fp16_infer"))
    return {graph: ("fp16" if graph == "infer" and fp16 else "fp32", engine_source(bundle, graph))
            for graph in GRAPHS}


def this_device() -> dict:
    """What an engine must have been built for to load here: TensorRT's version and the GPU."""
    import tensorrt as trt
    return {"tensorrt": trt.__version__, **gpu_identity()}


def engines_problem(bundle) -> str | None:
    """Why the bundle's engines cannot run here (None: they can): no TensorRT or cuda-python, no
    engines built, or engines built for another TensorRT, GPU, precision or batch profile."""
    missing = tensorrt_missing() or cuda_missing()
    if missing:
        return missing
    engines = bundle.manifest.get("engines") or {}
    absent = [g for g in GRAPHS if g not in engines]
    if absent:
        return f"{bundle.path} has no TensorRT engine for {', '.join(absent)} (edgefa device build-engine {bundle.path})"
    identity, profile = this_device(), bundle_profile(bundle.manifest)
    for graph, (precision, source) in engine_plan(bundle).items():
        record = engines[graph]
        if not engine_is_usable(record, identity, precision, profile, source, bundle):
            built = ", ".join(f"{k} {record.get(k)}" for k in ("tensorrt", "gpu", "precision", "onnx"))
            return (f"the {graph} engine was built for {built}; this device has TensorRT {identity['tensorrt']} "
                    f"on {identity['gpu']}: rebuild it (edgefa device build-engine {bundle.path} --force)")
    return None


def build_bundle_engines(bundle_dir: str | os.PathLike, force: bool = False,
                         on_build: Callable[[str], None] | None = None) -> dict:
    """Build the engines this device lacks (or all, with `force`) into BUNDLE/engines/, hash them
    in the manifest and record what they were built for; returns the manifest's `engines`."""
    missing = tensorrt_missing()
    if missing:
        raise EdgefaError(f"{missing}: build the engines on the device (JetPack ships TensorRT), or run "
                          f"{Path(bundle_dir) / 'tensorrt' / 'trtexec.sh'} there")
    bundle = read_bundle(bundle_dir)                    # every hash checked before anything is built
    root = bundle.path
    manifest = json.loads((root / MANIFEST).read_text())
    profile = bundle_profile(manifest)
    identity = this_device()
    engines = dict(manifest.get("engines") or {})
    timing_cache = root / STATE_DIR / "trt_cache" / "timing.cache"
    built = False
    for graph, (precision, source) in engine_plan(bundle).items():
        name = f"{ENGINE_DIR}/{graph}.engine"
        current = (engine_is_usable(engines.get(graph), identity, precision, profile, source, bundle)
                   and (root / name).is_file())
        if current and not force:
            continue
        if on_build:
            on_build(graph)
        refittable = source == REFIT_GRAPH
        data = build_engine(root / source, profile, precision == "fp16", timing_cache, refittable=refittable,
                            onnx_bytes=engine_source_bytes(bundle, source))
        write_atomically(root / name, data)
        manifest["files"][name] = {"sha256": sha256_file(root / name), "bytes": len(data)}
        engines[graph] = {"file": name, "onnx": source, **identity, "precision": precision, "profile": profile,
                          "refittable": refittable}
        built = True
    if built:
        manifest["engines"] = engines
        write_atomically(root / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        read_bundle(root)                               # what was written verifies
    return engines
