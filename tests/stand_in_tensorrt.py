"""Stand-ins for TensorRT's Python API and cuda-python's runtime, for the machines that have
neither: they let edgefa's own TensorRT backend (runtime/tensorrt_engine.py) run its real code,
its bindings, ping-pong sides, refit bookkeeping and batch profile, end to end.

This is not TensorRT. An "engine" here is an ONNX file that onnxruntime runs on the CPU; "GPU
memory" is host memory, and the stream runs everything at once. The stand-ins are strict where the
backend could go wrong: an execution reads every input from the address bound to it (an unbound
or unknown tensor is an error), an output is written only to its bound address and must fit its
allocation, refit weights must match the engine's initializers by name and count, and an output
shape is known only after the input shapes are set. Only what the backend calls exists.
"""

from __future__ import annotations

import ctypes
import math
from types import ModuleType, SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

SUCCESS = 0


class StandInCudart(ModuleType):
    """cuda.bindings.runtime: every call returns (error, *values) as cuda-python does."""

    class cudaError_t:
        cudaSuccess = SUCCESS

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def __init__(self, gpu_name: bytes = b"Stand-in GPU"):
        super().__init__("cuda.bindings.runtime")
        self.blocks: dict[int, ctypes.Array] = {}        # pointer -> its allocation
        self.gpu_name = gpu_name

    def cudaMalloc(self, nbytes):
        block = ctypes.create_string_buffer(int(nbytes))
        self.blocks[ctypes.addressof(block)] = block
        return SUCCESS, ctypes.addressof(block)

    def cudaFree(self, ptr):
        del self.blocks[int(ptr)]                         # a double free or a foreign pointer raises
        return (SUCCESS,)

    def capacity(self, ptr: int) -> int:
        return len(self.blocks[int(ptr)])

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        device = dst if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice else src
        assert count <= self.capacity(device), "copy past the end of a GPU allocation"
        ctypes.memmove(int(dst), int(src), int(count))
        return (SUCCESS,)

    def cudaStreamCreate(self):
        return SUCCESS, 7

    def cudaStreamSynchronize(self, stream):
        return (SUCCESS,)

    def cudaStreamDestroy(self, stream):
        return (SUCCESS,)

    def cudaGetErrorName(self, err):
        return SUCCESS, b"cudaErrorStandIn"

    def cudaGetDeviceCount(self):
        return SUCCESS, 1

    def cudaGetDeviceProperties(self, device):
        return SUCCESS, SimpleNamespace(name=self.gpu_name, major=8, minor=7)


def _read(ptr: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    return np.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=dtype).reshape(shape).copy()


class _Engine:
    """An ONNX graph as an engine: its inputs and outputs are the engine's I/O tensors, its
    initializers are refittable weights (kept here and fed to onnxruntime as inputs)."""

    def __init__(self, trt, data: bytes):
        self.trt = trt
        model = onnx.load_from_string(data)
        self.weights = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer
                        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 1}
        io = [(i, trt.TensorIOMode.INPUT) for i in model.graph.input] + \
             [(o, trt.TensorIOMode.OUTPUT) for o in model.graph.output]
        self.io = {}
        for value, mode in io:
            tensor = value.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
            self.io[value.name] = (mode, onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type), shape)
        kept = [t for t in model.graph.initializer if t.name not in self.weights]
        model.graph.input.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, list(w.shape))
                                 for n, w in self.weights.items())
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        self.session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        self.num_io_tensors = len(self.io)

    def get_tensor_name(self, i):
        return list(self.io)[i]

    def get_tensor_mode(self, name):
        return self.io[name][0]

    def get_tensor_dtype(self, name):
        return self.io[name][1]

    def get_tensor_shape(self, name):
        return self.io[name][2]

    def create_execution_context(self):
        return _Context(self)


class _Context:
    def __init__(self, engine: _Engine):
        self.engine, self.addresses, self.shapes = engine, {}, {}
        self.executions = 0

    def set_tensor_address(self, name, ptr):
        if name not in self.engine.io:
            return False
        self.addresses[name] = int(ptr)
        return True

    def set_input_shape(self, name, shape):
        mode, _, declared = self.engine.io[name]
        shape = tuple(shape)
        if mode != self.engine.trt.TensorIOMode.INPUT or len(shape) != len(declared) or any(
                d != -1 and d != s for d, s in zip(declared, shape)):
            return False
        self.shapes[name] = shape
        return True

    def _input_shape(self, name):
        declared = self.engine.io[name][2]
        if -1 in declared and name not in self.shapes:
            raise AssertionError(f"input {name!r}: its shape was never set")
        return self.shapes.get(name, declared)

    def get_tensor_shape(self, name):
        return self.shapes[name] if name in self.shapes else self.engine.io[name][2]

    def execute_async_v3(self, stream_handle):
        assert isinstance(stream_handle, int), "TensorRT takes the stream as a plain integer"
        trt = self.engine.trt
        feeds = dict(self.engine.weights)
        for name, (mode, dtype, _) in self.engine.io.items():
            if name not in self.addresses:
                raise AssertionError(f"tensor {name!r} has no address bound")
            if mode == trt.TensorIOMode.INPUT:
                feeds[name] = _read(self.addresses[name], self._input_shape(name), dtype)
        outputs = [o.name for o in self.engine.session.get_outputs()]
        for name, value in zip(outputs, self.engine.session.run(outputs, feeds)):
            value = np.require(value, dtype=self.engine.io[name][1], requirements="C")
            assert value.nbytes <= trt.cudart.capacity(self.addresses[name]), f"output {name!r} overruns its buffer"
            ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
            self.shapes[name] = value.shape
        self.executions += 1
        return True


class _Weights:
    def __init__(self, a, ptr=None, count=None):
        if ptr is None:
            self.array, self.ptr, self.count = np.asarray(a), None, np.asarray(a).size
        else:
            self.array, self.ptr, self.count = None, int(ptr), int(count)


class _Refitter:
    def __init__(self, engine: _Engine, logger):
        self.engine, self.pending = engine, {}
        self.refits = 0

    def set_named_weights(self, name, weights, location=None):
        if name not in self.engine.weights or weights.count != self.engine.weights[name].size:
            return False
        if location is not None and self.engine.trt.__version__.startswith("8."):
            raise TypeError("set_named_weights() takes no location before TensorRT 10")
        shape = self.engine.weights[name].shape
        on_device = location == self.engine.trt.TensorLocation.DEVICE
        self.pending[name] = _read(weights.ptr, shape, np.float32) if on_device else weights.array.reshape(shape).copy()
        return True

    def get_missing_weights(self):
        return []

    def refit_cuda_engine(self):
        self.engine.weights.update(self.pending)
        self.pending, self.refits = {}, self.refits + 1
        return True

    def refit_cuda_engine_async(self, stream_handle):
        assert isinstance(stream_handle, int)
        return self.refit_cuda_engine()


class _Network:
    def __init__(self):
        self.data, self.inputs = None, []

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, i):
        return self.inputs[i]


class _OnnxParser:
    num_errors = 0

    def __init__(self, network: _Network, logger):
        self.network = network

    def parse(self, data: bytes) -> bool:
        model = onnx.load_from_string(bytes(data))
        self.network.data = bytes(data)
        for value in model.graph.input:
            dims = value.type.tensor_type.shape.dim
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
            self.network.inputs.append(SimpleNamespace(name=value.name, shape=shape))
        return True


class _Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, smallest, usual, largest):
        assert all(a <= b <= c for a, b, c in zip(smallest, usual, largest)), f"{name}: min <= opt <= max"
        self.shapes[name] = (tuple(smallest), tuple(usual), tuple(largest))


class _TimingCache:
    def __init__(self, data: bytes):
        self.data = data or b""

    def serialize(self):
        return self.data + b"+"                  # grows with every build that used it


class _BuilderConfig:
    def __init__(self):
        self.flags, self.profiles, self.cache = set(), [], None

    def set_flag(self, flag):
        self.flags.add(flag)

    def set_memory_pool_limit(self, pool, size):
        pass

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data):
        return _TimingCache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


def stand_in_tensorrt(version: str, cudart: StandInCudart) -> ModuleType:
    """A `tensorrt` module with what the runtime backend and the engine build call; an "engine"
    is its ONNX graph's bytes. `trt.builds` records every build (flags, profile shapes)."""
    trt = ModuleType("tensorrt")
    trt.__version__ = version
    trt.cudart = cudart
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    trt.TensorIOMode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.DataType = SimpleNamespace(FLOAT=np.float32)
    trt.TensorLocation = SimpleNamespace(DEVICE="DEVICE", HOST="HOST")
    trt.nptype = lambda dtype: np.dtype(dtype).type
    trt.Weights = _Weights
    trt.refitters = []

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return _Engine(trt, bytes(data))

    def refitter(engine, logger):
        trt.refitters.append(_Refitter(engine, logger))
        return trt.refitters[-1]

    trt.Runtime, trt.Refitter = Runtime, refitter
    trt.builds = []
    trt.NetworkDefinitionCreationFlag = SimpleNamespace(EXPLICIT_BATCH=0)
    trt.BuilderFlag = SimpleNamespace(FP16="FP16", REFIT="REFIT")
    trt.MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.OnnxParser = _OnnxParser

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            assert (flags == 0) == (not version.startswith("8.")), "8.x asks for explicit batch; 10 has no flag"
            return _Network()

        create_builder_config = staticmethod(_BuilderConfig)
        create_optimization_profile = staticmethod(_Profile)

        def build_serialized_network(self, network, config):
            assert len(config.profiles) == 1 and config.cache is not None
            batched = {i.name for i in network.inputs if i.shape and i.shape[0] == -1}
            assert set(config.profiles[0].shapes) == batched, "every batched input needs a profile shape"
            trt.builds.append({"inputs": [i.name for i in network.inputs], "flags": set(config.flags),
                               "profile": config.profiles[0].shapes})
            return network.data

    trt.Builder = Builder
    return trt
