"""The `tensorrt` backend: the bundle's own TensorRT engines (BUNDLE/engines/, built by
`edgefa device build-engine`) run through TensorRT's runtime, with cuda-python for memory and the
stream. No onnxruntime session, no torch.

Training. The train-step engine takes the weights and momentum as inputs and returns the next
ones as outputs, so they live in GPU memory in two ping-pong sides, exactly as in OrtEngine: step
k binds side k as inputs and side 1-k as outputs, and accepting the step is flipping `current`.
A step copies in only the batch and the learning rate, and copies out the loss, the per-layer
update bounds (the finiteness proof, step_bounds) and the logits. Weights come back to the host
only at a checkpoint, a pull or a `state()`.

Evaluation. The inference engine holds the weights as constants (built from
tensorrt/infer_refit.onnx, refittable), so before it runs on new weights it is refit from the
current side by initializer name (trt.Refitter.set_named_weights): straight from GPU memory on
TensorRT 10 (TensorLocation.DEVICE, refit_cuda_engine_async), through the host on 8.x. It is never
rebuilt for new weights. An older bundle's infer engine (from infer.onnx, weights as inputs) is
bound to the live buffers like the train-step engine instead.

Every buffer is allocated once, at open: the batch-shaped ones for the profile's largest batch.
"""

from __future__ import annotations

import numpy as np

from ..bundle import Bundle, feedback_input_name, next_name
from ..errors import EdgefaError
from .cuda_memory import DeviceArray, Stream
from .engine import DeviceEngine
from .tensorrt_build import bundle_profile, engines_problem

BACKEND = "tensorrt"        # what --provider names to ask for it, and what `providers` reports


class _Engine:
    """One deserialized engine, its execution context and a buffer for every I/O tensor that is
    not one of the engine's state, feedback or frozen tensors (those are bound from outside).
    `fed`: the inputs a step copies in; any other input the engine has is a mismatch."""

    def __init__(self, trt, runtime, data: bytes, label: str, max_batch: int, bound_elsewhere: set[str],
                 fed: set[str]):
        self.trt, self.label = trt, label
        self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise EdgefaError(f"{label}: TensorRT {trt.__version__} could not load it (its log says why)")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.buffers: dict[str, DeviceArray] = {}
        for name in self.names:
            if name in bound_elsewhere:
                continue
            shape = [max_batch if d < 0 else d for d in self.engine.get_tensor_shape(name)]
            if any(d < 0 for d in shape[1:]):
                raise EdgefaError(f"{label}: tensor {name!r} has a dynamic dim past the batch")
            self.buffers[name] = DeviceArray(shape, trt.nptype(self.engine.get_tensor_dtype(name)))
            self.bind(name, self.buffers[name].ptr)
        unknown = sorted(set(self.inputs) & set(self.buffers) - fed)
        if unknown:
            raise EdgefaError(f"{label}: the engine takes inputs this bundle does not have ({', '.join(unknown)}); "
                              "rebuild it (edgefa device build-engine --force)")

    def bind(self, name: str, ptr: int) -> None:
        if not self.context.set_tensor_address(name, ptr):
            raise EdgefaError(f"{self.label}: cannot bind tensor {name!r}")

    def feed(self, name: str, host: np.ndarray, stream: Stream) -> np.ndarray:
        """Queue one host input (converted to the engine's dtype: TensorRT 8.x takes int64 labels
        as int32); returns the array to keep alive until the stream is synchronized."""
        if name not in self.buffers:
            raise EdgefaError(f"{self.label}: the engine has no input {name!r}; rebuild it for this bundle")
        buf = self.buffers[name]
        host = np.require(host, dtype=buf.dtype, requirements="C")    # keeps a 0-d lr 0-d (ascontiguousarray would not)
        if not self.context.set_input_shape(name, host.shape):
            raise EdgefaError(f"{self.label}: input {name!r} of shape {host.shape} is outside the engine's profile")
        buf.upload(host, stream)
        return host

    def run(self, stream: Stream) -> None:
        if not self.context.execute_async_v3(stream.address):
            raise EdgefaError(f"{self.label}: TensorRT failed to run it")

    def fetch(self, name: str, stream: Stream) -> np.ndarray:
        return self.buffers[name].download(stream, tuple(self.context.get_tensor_shape(name)))

    def close(self) -> None:
        for buf in self.buffers.values():
            buf.free()


class TensorRTEngine(DeviceEngine):
    on_gpu = True

    def __init__(self, bundle: Bundle):
        problem = engines_problem(bundle)
        if problem:
            raise EdgefaError(f"tensorrt backend: {problem}")
        import tensorrt as trt

        super().__init__(bundle)
        self.trt = trt
        self.version, self.refit_version = 0, None      # bumped by every accepted step and load
        self.logger = trt.Logger(trt.Logger.WARNING)
        profile = bundle_profile(bundle.manifest)
        self.min_batch, self.max_batch = profile["min"], profile["max"]
        self.stream = Stream()
        # GPU copies of everything the graphs read: two sides of state, feedback and frozen weights.
        side_a = self.initial_side()
        self.sides = [{n: DeviceArray(a.shape, np.float32) for n, a in side_a.items()} for _ in (0, 1)]
        self.feedback_gpu = {feedback_input_name(l): self._to_gpu(a) for l, a in self.feedback.items()}
        self.frozen_gpu = {n: self._to_gpu(a) for n, a in self.frozen.items()}
        self._write_current(side_a)
        self.bounds.reset(side_a)

        runtime = trt.Runtime(self.logger)
        engines = bundle.manifest["engines"]
        state_io = set(self.state_names) | {next_name(n) for n in self.state_names}
        fixed = set(self.feedback_gpu) | set(self.frozen_gpu)
        path = {g: bundle.path / engines[g]["file"] for g in ("train_step", "infer")}   # hashed by read_bundle
        fed = {"x_chosen", "x_rejected"} if self.preference else {"x", "labels"}
        self.train = _Engine(trt, runtime, path["train_step"].read_bytes(), str(path["train_step"]),
                             self.max_batch, state_io | fixed, fed | {"lr"})
        self.infer = _Engine(trt, runtime, path["infer"].read_bytes(), str(path["infer"]),
                             self.max_batch, set(self.params) | fixed, {"x"})
        for e in (self.train, self.infer):
            for name in e.names:
                if name in fixed:
                    e.bind(name, {**self.feedback_gpu, **self.frozen_gpu}[name].ptr)
        self.refittable = bool(engines["infer"].get("refittable"))
        self.refitter = trt.Refitter(self.infer.engine, self.logger) if self.refittable else None

    def _to_gpu(self, arr: np.ndarray) -> DeviceArray:
        buf = DeviceArray(arr.shape, np.float32)
        buf.upload(np.ascontiguousarray(arr, dtype=np.float32), self.stream)
        self.stream.synchronize()
        return buf

    # -- running the engines -----------------------------------------------------------------------
    def _check_batch(self, n: int) -> None:
        if not self.min_batch <= n <= self.max_batch:
            raise EdgefaError(f"a batch of {n} is outside the engines' profile {self.min_batch}..{self.max_batch} "
                              "(export --batch-profile MIN,OPT,MAX and rebuild them)")

    def _run_step(self, inputs: dict[str, np.ndarray], lr: float, per_sample: tuple[str, ...]):
        self._check_batch(len(next(iter(inputs.values()))))
        src, dst = self.sides[self.current], self.sides[1 - self.current]
        for n in self.state_names:
            self.train.bind(n, src[n].ptr)
            self.train.bind(next_name(n), dst[n].ptr)
        keep = [self.train.feed(name, arr, self.stream)
                for name, arr in {**inputs, "lr": np.array(lr, dtype=np.float32)}.items()]
        self.train.run(self.stream)
        loss = float(self.train.fetch("loss", self.stream))     # each fetch synchronizes the stream
        update_bound = self.train.fetch("update_bound", self.stream)
        rest = [self.train.fetch(name, self.stream) for name in per_sample]
        del keep
        return loss, update_bound, rest

    def _checked_step(self, inputs, lr, per_sample):
        loss, accepted, rest = super()._checked_step(inputs, lr, per_sample)
        self.version += accepted
        return loss, accepted, rest

    def _infer_batch(self, x: np.ndarray) -> np.ndarray:
        rows = len(x)
        if rows < self.min_batch:          # a last, short chunk: pad it to the profile's smallest batch
            x = np.concatenate([x, np.zeros((self.min_batch - rows, *x.shape[1:]), x.dtype)])
        self._check_batch(len(x))
        if self.refittable:
            self._refit()
        else:
            for n in self.params:
                self.infer.bind(n, self.sides[self.current][n].ptr)
        keep = self.infer.feed("x", x, self.stream)
        self.infer.run(self.stream)
        logits = self.infer.fetch("logits", self.stream)
        del keep
        return logits[:rows]

    def _refit(self) -> None:
        """Put the current weights into the inference engine, once per change of weights."""
        if self.refit_version == self.version:
            return
        trt, side = self.trt, self.sides[self.current]
        on_device = int(trt.__version__.split(".")[0]) >= 10        # TensorLocation arrived in 10.0
        host = {} if on_device else {n: side[n].download(self.stream) for n in self.params}
        for n in self.params:
            if on_device:
                ok = self.refitter.set_named_weights(n, trt.Weights(trt.DataType.FLOAT, side[n].ptr, side[n].capacity),
                                                     trt.TensorLocation.DEVICE)
            else:
                ok = self.refitter.set_named_weights(n, trt.Weights(host[n]))
            if not ok:
                raise EdgefaError(f"the infer engine refused new weights for {n!r}; rebuild it "
                                  f"(edgefa device build-engine {self.bundle.path} --force)")
        for n in self.refitter.get_missing_weights():               # frozen weights fused with trained ones
            if n not in self.frozen:
                raise EdgefaError(f"the infer engine wants weights {n!r} that this bundle does not have")
            self.refitter.set_named_weights(n, trt.Weights(self.frozen[n]))
        done = (self.refitter.refit_cuda_engine_async(self.stream.address) if on_device
                else self.refitter.refit_cuda_engine())
        self.stream.synchronize()
        del host
        if not done:
            raise EdgefaError("TensorRT could not refit the infer engine (its log says why)")
        self.refit_version = self.version

    # -- state in and out --------------------------------------------------------------------------
    def _host(self, k: int) -> dict[str, np.ndarray]:
        return {n: buf.download(self.stream) for n, buf in self.sides[k].items()}

    def _write_current(self, arrays: dict[str, np.ndarray]) -> None:
        for n, arr in arrays.items():
            self.sides[self.current][n].upload(arr, self.stream)
        self.stream.synchronize()
        self.version += 1

    @property
    def providers(self) -> list[str]:
        return [BACKEND]

    def close(self) -> None:
        """Free the GPU buffers now (they are freed at exit anyway)."""
        for e in (self.train, self.infer):
            e.close()
        for buf in [*self.sides[0].values(), *self.sides[1].values(), *self.feedback_gpu.values(),
                    *self.frozen_gpu.values()]:
            buf.free()
        self.stream.close()
