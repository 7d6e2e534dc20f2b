"""What on-device DFA fine-tuning of a bundle will cost on a device, before it runs there.

Memory is the peak resident set of the fine-tuning process, added up from what the runtime holds
(see runtime/engine.py):

    runtime      python + numpy + onnxruntime (the profile's figure) + edgefa and two sessions
    weights      the bundle's weights, read once (trainable ones become ping-pong side A; frozen
                 ones are bound as they are)
    optimizer    the momentum buffers of the trainable layers, side A
    ping-pong    side B: a second copy of trainable weights and momentum the step writes into
                 (none where the CPU updates in place: a bundle with step_factors.onnx)
    feedback     the stored B_l matrices (trainable stages only)
    update temp  one weight-sized temporary per trainable layer inside the step graph (lr * v', or
                 delta^T h); updating in place, one scratch the size of the largest trainable tensor
    checkpoint   a checkpoint copies trainable weights and momentum out of the engine before writing them
    activations  per layer and sample: a, h, f'(a), e B_l and delta (5 floats per unit), plus x,
                 and logits, log-softmax, exp, one-hot and e at the head (a resmlp: 5 per unit of
                 the stream and of each block's hidden layer, 2 per unit for the terminal LN);
                 the same whatever `trainable` says, a slight overestimate for frozen layers
    data         the fine-tuning set: as read and standardized, both float32 (when its size is given;
                 a Bradley-Terry set holds two samples per pair)

So a `--trainable last:K` bundle saves optimizer, ping-pong, update temp, checkpoint and feedback
memory for every frozen layer; its weights are still held once.

A bundle with a frozen trunk (bundle.trunk_of) adds the trunk's forward pass to every whole step
(its FLOPs and activations per sample are in the manifest, counted at export), and, with the
feature cache on (runtime/feature_cache.py), one more part:

    feature cache  samples x (features x 4 + 8) bytes, in memory when that fits the cache's budget,
                   else in a file in state/ (then not counted here: the kernel's page cache)

and the time splits in two: the trunk runs once per sample (the first epoch), and every step
after that is the part's step on cached features, whose bound is the step bound reported.

Time is a roofline lower bound: a step cannot beat its FLOPs at the peak FLOP/s of the compute
unit that runs it, nor its compulsory memory traffic (read weights and momentum, write the new
ones, read the feedback and the batch) at the peak memory bandwidth. Both peaks are upper bounds
(see the profile files), so the bound stays below any real step.

numpy-free, torch-free: this runs on the device too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..bundle import (LOSS_BRADLEY_TERRY, feedback_shapes, layer_shapes, model_kind, param_shapes, part_topology,
                      trainable_layers, trainable_params, trunk_of)
from .profile import AUTO_PROVIDERS

FLOAT = 4                                  # bytes: the runtime is float32 throughout
# edgefa's own modules (CLI, profiler and its sampler thread included) and the two onnxruntime
# sessions (train step and inference), beyond the profile's python + numpy + onnxruntime figure.
# Calibrated on the 2-core x86 VM: `edgefa profile` of a 64-32-16-10 bundle (whose weights and
# activations are negligible) peaked at 75 MiB, the probe's python + numpy + onnxruntime at 47 MiB.
EDGEFA_AND_SESSIONS_BYTES = 28 << 20
UNIT_ACTIVATIONS = 5                       # floats per hidden unit and sample (see above)
HEAD_ACTIVATIONS = 5                       # floats per class and sample
SHARE_FOR_OTHERS = 0.2                     # of a profile's memory assumed taken by the OS and others
DEFAULT_FEATURE_CACHE_MB = 256             # the feature cache's memory budget unless told (--cache-mb)
ROW_DIGEST_BYTES = 8                       # a cached row's digest of the sample it came from


def feature_cache_bytes(samples: int, features: int) -> int:
    """What a trunk feature cache of `samples` rows holds: the features and one digest per row."""
    return samples * (features * FLOAT + ROW_DIGEST_BYTES)


@dataclass(frozen=True)
class StepCost:
    flops: float          # floating-point operations of one DFA step (multiply-add = 2)
    bytes_moved: float    # compulsory memory traffic of one step, bytes


def _matmuls(model: dict) -> list[tuple[str, int, int]]:
    """(layer, in, out) of every layer that is a matrix product (LayerNorms are not)."""
    return [(name, w[1], w[0]) for name, (w, _) in layer_shapes(model).items() if len(w) == 2]


def trunk_cost(model: dict, rows: int) -> StepCost:
    """The frozen trunk's forward pass on `rows` samples (zero FLOPs where the manifest does not
    count them: bundles exported before it did); its weights read once, the samples in."""
    trunk = trunk_of(model)
    if trunk is None:
        return StepCost(0.0, 0.0)
    weights = sum(_size(s) for s in trunk["params"].values())
    return StepCost(float(rows * (trunk.get("flops_per_sample") or 0)),
                    float(FLOAT * (weights + rows * model["in_features"])))


def step_cost(model: dict, batch: int, momentum: float, pairs: bool = False, on_features: bool = False) -> StepCost:
    """FLOPs and compulsory bytes of one train_step graph run on `batch` samples (`pairs`: a
    Bradley-Terry step, whose forward pass runs on both items of `batch` pairs). Gradients,
    projections and the optimizer count only the trainable layers (bundle.trainable_layers). A
    bundle with a frozen trunk: the trunk's forward pass too (trunk_cost), unless `on_features`
    (the part's step on cached features, head_step.onnx)."""
    whole = model
    model = part_topology(model)        # the part the step trains (the model itself without a trunk)
    rows = 2 * batch if pairs else batch
    trained = set(trainable_layers(model))
    mats = _matmuls(model)
    params = sum(_size(s) for s in param_shapes(model).values())
    trainable = sum(_size(s) for s in trainable_params(model).values())
    feedback = sum(_size(s) for s in feedback_shapes(model).values())
    forward = 2 * rows * sum(i * o for _, i, o in mats)                      # every Gemm a = h W^T
    gradient = 2 * rows * sum(i * o for n, i, o in mats if n in trained)     # every outer product delta^T h
    projection = 2 * rows * feedback                                         # e B_l
    if model_kind(model) == "resmlp":   # the local backward inside trained blocks and into the readout's LN
        d, hidden = model["width"], model["width"] * model["expansion"]
        projection += 2 * rows * (2 * d * hidden * sum(f"blocks.{i}.fc2" in trained for i in range(model["depth"]))
                                  + (d * model["n_classes"] if "head" in trained else 0))
    optimizer = (4 if momentum else 2) * trainable                           # v' = mu v + g, W' = W - lr v' (or W - g)
    units = sum(o for _, _, o in mats) + sum(w[0] for w, _ in layer_shapes(model).values() if len(w) == 1)
    elementwise = 10 * rows * units                                          # activation, f', LN, softmax...
    # every weight read once; the trainable ones (and their momentum, read too) written once
    state = params + trainable * (3 if momentum else 1)
    traffic = FLOAT * (state + feedback + rows * (model["in_features"] + 1))
    trunk = trunk_cost(whole, rows) if not on_features else StepCost(0.0, 0.0)
    return StepCost(float(forward + gradient + projection + optimizer + elementwise) + trunk.flops,
                    float(traffic) + trunk.bytes_moved)


def activation_floats(model: dict, rows: int) -> int:
    """Floats of activations held during one step of `rows` samples (see the module doc); a frozen
    trunk's are the manifest's count per sample (every tensor its nodes write: an upper bound)."""
    trunk = trunk_of(model)
    if trunk is not None:
        return rows * (trunk.get("activations_per_sample") or 0) + activation_floats(part_topology(model), rows)
    if model_kind(model) == "resmlp":
        d, hidden = model["width"], model["width"] * model["expansion"]
        per_row = (model["in_features"] + UNIT_ACTIVATIONS * d + model["depth"] * UNIT_ACTIVATIONS * (d + hidden)
                   + 2 * d + HEAD_ACTIVATIONS * model["n_classes"])
    else:
        hidden_units = sum(layer["out"] for layer in model["layers"][:-1])
        per_row = model["in_features"] + UNIT_ACTIVATIONS * hidden_units + HEAD_ACTIVATIONS * model["n_classes"]
    return rows * per_row


def _size(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass
class Budget:
    profile: str
    batch: int
    provider: str
    memory: dict[str, int]              # part -> bytes (the table above)
    peak_bytes: int
    available_bytes: int
    available_basis: str
    fits: bool
    cost: StepCost
    peak_flops: float
    bandwidth_bytes_s: float
    compute_s: float
    memory_s: float
    notes: list[str] = field(default_factory=list)
    feature_cache: dict | None = None   # a bundle with a trunk and the cache on: where, bytes, trunk time

    @property
    def step_lower_bound_s(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def bound_by(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory bandwidth"

    def as_dict(self) -> dict:
        return {"profile": self.profile, "batch": self.batch, "provider": self.provider,
                "memory_bytes": self.memory, "peak_bytes": self.peak_bytes,
                "available_bytes": self.available_bytes, "available_basis": self.available_basis,
                "fits": self.fits, "flops_per_step": self.cost.flops, "bytes_per_step": self.cost.bytes_moved,
                "peak_flops": self.peak_flops, "bandwidth_bytes_s": self.bandwidth_bytes_s,
                "step_lower_bound_s": self.step_lower_bound_s, "bound_by": self.bound_by,
                "compute_s": self.compute_s, "memory_s": self.memory_s, "notes": self.notes,
                "feature_cache": self.feature_cache}


def budget(manifest: dict, profile, batch: int, provider: str | None = None, samples: int = 0,
           available_bytes: int | None = None,
           feature_cache_budget: int | None = DEFAULT_FEATURE_CACHE_MB << 20) -> Budget:
    """The predicted peak memory and step-time lower bound of fine-tuning `manifest`'s model with
    batches of `batch` on `profile` (a DeviceProfile). `provider`: the onnxruntime execution
    provider that would run it (default: the one the runtime would choose there). `available_bytes`: the memory free
    for it (default: the profile's memory less SHARE_FOR_OTHERS). `feature_cache_budget`: the
    trunk feature cache's memory budget in bytes (None: the cache is off; see the module doc)."""
    if batch < 1:
        raise ValueError("batch must be at least 1")
    model, momentum = manifest["model"], float(manifest["optimizer"]["momentum"])
    pairs = manifest.get("loss") == LOSS_BRADLEY_TERRY
    params = sum(_size(s) for s in param_shapes(model).values())
    trainable = sum(_size(s) for s in trainable_params(model).values())   # all of them unless last:K
    feedback = sum(_size(s) for s in feedback_shapes(model).values())
    weight_bytes, trained_bytes = FLOAT * params, FLOAT * trainable
    # as the runtime chooses: the first of its automatic choices that the device offers
    provider = provider or next((p for p in AUTO_PROVIDERS if p in profile.providers), "CPUExecutionProvider")
    # On the CPU a bundle with step_factors.onnx is updated in place (runtime/in_place.py): no
    # second side, and one scratch the size of the largest trainable tensor instead of a temporary per layer.
    in_place = provider == "CPUExecutionProvider" and "step_factors" in (manifest.get("graphs") or {})
    largest = max((_size(s) for s in trainable_params(model).values()), default=0)
    memory = {
        "runtime": profile.runtime_overhead_bytes + EDGEFA_AND_SESSIONS_BYTES,
        "weights": weight_bytes,
        "optimizer": trained_bytes if momentum else 0,
        "ping-pong": 0 if in_place else trained_bytes * (2 if momentum else 1),
        "feedback": FLOAT * feedback,
        "update temp": FLOAT * largest if in_place else trained_bytes,
        "checkpoint": trained_bytes * (2 if momentum else 1),
        "activations": FLOAT * activation_floats(model, 2 * batch if pairs else batch),
        "data": 2 * FLOAT * samples * model["in_features"] * (2 if pairs else 1),
    }
    peak = sum(memory.values())
    notes = []
    if not samples:
        notes.append("the fine-tuning data is not included (give its sample count to add it)")
    if available_bytes is None:
        available_bytes = int(profile.memory_bytes * (1 - SHARE_FOR_OTHERS))
        basis = f"{profile.memory_bytes / 2**30:.1f} GiB less {SHARE_FOR_OTHERS:.0%} assumed for the OS and others"
    else:
        basis = "memory available now (MemAvailable)"

    on_gpu = provider != "CPUExecutionProvider" and profile.gpu_peak_flops
    peak_flops = profile.gpu_peak_flops if on_gpu else profile.cpu_peak_flops
    if provider != "CPUExecutionProvider" and not profile.gpu_peak_flops:
        notes.append(f"{profile.name} has no GPU figure: {provider} bounded by the CPU peak")
    bandwidth = profile.memory_bandwidth_gbps * 1e9
    caching = trunk_of(model) is not None and feature_cache_budget is not None and not pairs
    cost = step_cost(model, batch, momentum, pairs, on_features=caching)
    cache = None
    if caching:
        cache, in_memory = _feature_cache(model, samples, feature_cache_budget, peak_flops, bandwidth, notes)
        memory["feature cache"] = in_memory
        peak += in_memory
    elif trunk_of(model) is not None and not trunk_of(model).get("flops_per_sample"):
        notes.append("the trunk's FLOPs are not in this bundle's manifest: its forward pass is not counted")
    return Budget(profile.name, batch, provider, memory, peak, available_bytes, basis, peak <= available_bytes,
                  cost, peak_flops, bandwidth, cost.flops / peak_flops, cost.bytes_moved / bandwidth, notes, cache)


def _feature_cache(model: dict, samples: int, budget_bytes: int, peak_flops: float, bandwidth: float,
                   notes: list[str]) -> tuple[dict, int]:
    """The feature cache's part of a budget: its record and the bytes it holds in memory. The step
    bound is then the part's step on cached features; the trunk's once-per-sample pass is here."""
    trunk = trunk_of(model)
    size = feature_cache_bytes(samples, trunk["features"])
    where = "memory" if size <= budget_bytes else "file in state/"
    once = trunk_cost(model, samples)
    seconds = max(once.flops / peak_flops, once.bytes_moved / bandwidth)
    flops = trunk.get("flops_per_sample")
    notes.append(f"feature cache: {samples} samples x {trunk['features']} features = {size / 2**20:.1f} MiB "
                 f"in {where} (budget {budget_bytes / 2**20:g} MiB); the trunk runs once per sample "
                 + (f"({flops / 1e6:.2f} MFLOP each: >= {seconds * 1e3:.3f} ms in the first epoch)" if flops
                    else "(its FLOPs are not in this bundle's manifest)")
                 + "; the step bound is the part's step on cached features")
    record = {"where": where, "bytes": size, "budget_bytes": budget_bytes, "samples": samples,
              "features": trunk["features"], "trunk_flops_per_sample": flops,
              "trunk_once_lower_bound_s": seconds if flops else None}
    return record, size if where == "memory" else 0
