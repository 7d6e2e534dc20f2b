"""GPU memory and streams through cuda-python's runtime bindings: all the CUDA the TensorRT
backend needs (no torch, no pycuda). Imported only where TensorRT runs.

A `DeviceArray` is one cudaMalloc'd buffer with a fixed capacity in elements; the shape it holds
can be any that fits (a smaller batch in a buffer sized for the profile's largest). Copies are
queued on a `Stream` and complete at its `synchronize()`: a host array handed to `upload` must stay
alive until then, which every caller here does by synchronizing before it returns.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import EdgefaError


def cudart():
    """cuda-python's runtime module (cuda.bindings.runtime from 12.6 on, cuda.cudart before)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as exc:
            raise EdgefaError(f"cuda-python is not installed here ({exc}); the TensorRT backend and "
                              "engine builds use it for GPU memory (pip install cuda-python)") from None
    return runtime


def cuda_missing() -> str | None:
    """Why cuda-python cannot be used here (None: it can)."""
    try:
        cudart()
    except EdgefaError as exc:
        return str(exc)
    return None


def check(result, what: str):
    """cuda-python returns (error, *values): the values, or one EdgefaError line naming the call."""
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        _, name = rt.cudaGetErrorName(err)
        raise EdgefaError(f"CUDA {what} failed: {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else tuple(values) or None


class Stream:
    def __init__(self):
        self.handle = check(cudart().cudaStreamCreate(), "stream create")

    @property
    def address(self) -> int:
        """The stream as the plain integer TensorRT's execute_async_v3 and refit take."""
        return int(self.handle)

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle), "stream synchronize")

    def close(self) -> None:
        if self.handle is not None:
            check(cudart().cudaStreamDestroy(self.handle), "stream destroy")
            self.handle = None


class DeviceArray:
    """A GPU buffer for up to `capacity` elements of `dtype`, holding `shape` now."""

    def __init__(self, shape: tuple[int, ...], dtype, capacity: int | None = None):
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(d) for d in shape)
        self.capacity = int(capacity if capacity is not None else math.prod(self.shape))
        nbytes = max(self.capacity * self.dtype.itemsize, 1)      # cudaMalloc(0) gives no usable pointer
        self.ptr = int(check(cudart().cudaMalloc(nbytes), f"cudaMalloc of {nbytes} bytes"))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def _fit(self, shape: tuple[int, ...]) -> None:
        if math.prod(shape) > self.capacity:
            raise EdgefaError(f"{shape} does not fit a GPU buffer of {self.capacity} elements")
        self.shape = tuple(int(d) for d in shape)

    def upload(self, host: np.ndarray, stream: Stream) -> None:
        """Queue host -> GPU; `host` must stay alive until the stream is synchronized."""
        if host.dtype != self.dtype or not host.flags.c_contiguous:
            raise EdgefaError(f"upload needs a C-contiguous {self.dtype} array, got {host.dtype}")
        self._fit(host.shape)
        rt = cudart()
        check(rt.cudaMemcpyAsync(self.ptr, host.ctypes.data, self.nbytes,
                                 rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle), "copy to the GPU")

    def download(self, stream: Stream, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """GPU -> a new host array of `shape` (default: the shape held), synchronized."""
        if shape is not None:
            self._fit(tuple(shape))
        host = np.empty(self.shape, self.dtype)
        rt = cudart()
        check(rt.cudaMemcpyAsync(host.ctypes.data, self.ptr, self.nbytes,
                                 rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.handle), "copy from the GPU")
        stream.synchronize()
        return host

    def free(self) -> None:
        if self.ptr:
            check(cudart().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0
