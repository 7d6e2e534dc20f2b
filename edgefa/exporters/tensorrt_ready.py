"""Will these graphs build into TensorRT engines? Checked on the host at export, where TensorRT is absent.

The device may run a bundle's graphs through TensorRT (onnxruntime's TensorRT provider, or engines
built with `trtexec`). That only works when the graphs use operators TensorRT's ONNX parser
imports, an opset it accepts, and shapes an optimization profile can cover. This module checks
those from the ONNX files alone, against the parser's published support matrix for the targeted
TensorRT release (tensorrt_onnx_ops.toml, next to this file, names its sources):

    check_graph(model, name, target, profile)  -> problems, one line each (empty: ready)
    readiness(graphs, target, profile)         -> a JSON-able summary of both graphs
    trtexec_lines(graphs, profile, fp16_infer) -> a shell script that builds the engines on the device

What is checked, per graph:
  * every node's op type is in the target's supported ONNX operators, in the default ONNX domain
    ('' or 'ai.onnx'): a custom-domain node would need a TensorRT plugin;
  * the default-domain opset is inside the target's range;
  * static ranks: every graph input and output has a known rank, every dim but dim 0 (the batch)
    is a fixed integer; dim 0 may be symbolic;
  * the batch profile fits: 1 <= min <= opt <= max (integers). It applies to the inputs whose dim 0
    is symbolic; inputs with a fixed dim 0 or none (the scalar `lr`, weights [out, in]) are static
    and need no profile.
The "Supported Types" and "Restrictions" columns of the matrix are not checked.

Host only (needs onnx); the device side never imports this.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import onnx

from ..bundle import REFIT_GRAPH
from ..errors import EdgefaError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DATA_FILE = Path(__file__).with_name("tensorrt_onnx_ops.toml")
DEFAULT_PROFILE = (1, 32, 256)
DEFAULT_DOMAINS = ("", "ai.onnx")
INFER, TRAIN_STEP = "infer.onnx", "train_step.onnx"
FP16_GRAPHS = (INFER,)          # the DFA update in train_step stays FP32
TRTEXEC_SCRIPT = "tensorrt/trtexec.sh"
READINESS_FILE = "tensorrt/readiness.json"
TIMING_CACHE = "timing.cache"


@dataclass(frozen=True)
class TensorRTTarget:
    """One TensorRT release's ONNX parser, as tensorrt_onnx_ops.toml describes it."""
    version: str
    jetpack: str
    opset_min: int
    opset_max: int
    ops: frozenset
    source: str
    source_header: str

    def describe(self) -> str:
        return f"TensorRT {self.version} ({self.jetpack})"


@lru_cache(maxsize=1)
def _data() -> dict:
    with open(DATA_FILE, "rb") as f:
        return tomllib.load(f)


def target_names() -> list[str]:
    """The TensorRT versions the data file describes, oldest first."""
    return sorted((k for k, v in _data().items() if isinstance(v, dict)),
                  key=lambda v: tuple(int(p) for p in v.split(".")))


def default_target() -> str:
    return _data()["default"]


def load_target(target: str | TensorRTTarget) -> TensorRTTarget:
    """The named target (e.g. "10.3"); an unknown name is a one-line EdgefaError."""
    if isinstance(target, TensorRTTarget):
        return target
    entry = _data().get(str(target))
    if not isinstance(entry, dict):
        raise EdgefaError(f"tensorrt target {str(target)!r}: this edgefa knows TensorRT "
                          f"{', '.join(target_names())}")
    return TensorRTTarget(version=entry["tensorrt"], jetpack=entry["jetpack"],
                          opset_min=int(entry["opset_min"]), opset_max=int(entry["opset_max"]),
                          ops=frozenset(entry["supported_ops"]), source=entry["source"],
                          source_header=entry["source_header"])


# --- the batch profile ----------------------------------------------------------------------

def profile_dict(profile) -> dict:
    """(min, opt, max) or {"min", "opt", "max"} -> {"min": .., "opt": .., "max": ..}, unchecked."""
    if isinstance(profile, dict):
        return {k: profile.get(k) for k in ("min", "opt", "max")}
    values = list(profile)
    if len(values) != 3:
        raise EdgefaError(f"batch profile {values!r}: expected three values, MIN,OPT,MAX")
    return dict(zip(("min", "opt", "max"), values))


def profile_problems(profile) -> list[str]:
    """Why a batch profile cannot be an optimization profile (empty: it can)."""
    p = profile_dict(profile)
    text = f"min {p['min']}, opt {p['opt']}, max {p['max']}"
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in p.values()):
        return [f"batch profile {text}: min, opt and max must be integers"]
    if p["min"] < 1:
        return [f"batch profile {text}: min must be at least 1"]
    if not p["min"] <= p["opt"] <= p["max"]:
        return [f"batch profile {text}: needs min <= opt <= max"]
    return []


def check_profile(profile) -> dict:
    """The profile as a dict; a profile TensorRT would refuse is a one-line EdgefaError."""
    problems = profile_problems(profile)
    if problems:
        raise EdgefaError(problems[0])
    return profile_dict(profile)


def parse_batch_profile(spec: str) -> dict:
    """"MIN,OPT,MAX" (e.g. "1,32,256") -> {"min": 1, "opt": 32, "max": 256}; else EdgefaError."""
    parts = [p.strip() for p in str(spec).split(",")]
    try:
        if len(parts) != 3:
            raise ValueError
        values = [int(p) for p in parts]
    except ValueError:
        raise EdgefaError(f"--batch-profile {spec!r}: expected MIN,OPT,MAX, three integers "
                          f"(e.g. 1,32,256)") from None
    problems = profile_problems(values)
    if problems:
        raise EdgefaError(f"--batch-profile {spec!r}: {problems[0].split(': ', 1)[1]}")
    return profile_dict(values)


# --- one graph ------------------------------------------------------------------------------

def _as_model(graph) -> onnx.ModelProto:
    return graph if isinstance(graph, onnx.ModelProto) else onnx.load_from_string(bytes(graph))


def _all_nodes(graph: onnx.GraphProto):
    """Every node, those inside control-flow bodies (If, Loop, Scan) included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_nodes(g)


def _node_label(node: onnx.NodeProto, index: int) -> str:
    if node.name:
        return f"node '{node.name}' (op {node.op_type})"
    return f"node #{index} (op {node.op_type}, no name, output '{node.output[0] if node.output else ''}')"


def _dims(value: onnx.ValueInfoProto) -> list | None:
    """[int | str | None, ...] for a tensor of known rank (str: symbolic, None: unknown); None
    when the value is not a tensor or its rank is unknown."""
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return None
    out = []
    for d in value.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def batch_inputs(model: onnx.ModelProto) -> dict[str, list]:
    """The graph inputs the batch profile applies to: rank >= 1 and dim 0 not a fixed integer.
    name -> dims, in input order (initializers listed as inputs are constants, left out)."""
    constants = {t.name for t in model.graph.initializer}
    out = {}
    for value in model.graph.input:
        dims = _dims(value)
        if value.name not in constants and dims and not isinstance(dims[0], int):
            out[value.name] = dims
    return out


def _shape_problems(name: str, kind: str, value: onnx.ValueInfoProto) -> list[str]:
    where = f"{name}: {kind} '{value.name}'"
    if not value.type.HasField("tensor_type"):
        return [f"{where} is not a tensor (TensorRT takes tensors only, no sequences, maps or optionals)"]
    dims = _dims(value)
    if dims is None:
        return [f"{where} has no known rank (TensorRT needs static ranks)"]
    problems = []
    for axis, d in enumerate(dims[1:], start=1):
        if isinstance(d, int) and d > 0:
            continue
        what = f"symbolic ({d!r})" if isinstance(d, str) else "unknown" if d is None else f"{d}"
        problems.append(f"{where} dim {axis} is {what}: only dim 0 (the batch) may vary, "
                        f"every other dim must be a fixed integer")
    return problems


def check_graph(model: onnx.ModelProto, name: str, target: str | TensorRTTarget = "10.3",
                profile=DEFAULT_PROFILE) -> list[str]:
    """Everything that would keep `model` (called `name`, e.g. "infer.onnx") from building into a
    TensorRT engine for `target` under the batch `profile`; one line each, empty when ready."""
    trt = load_target(target)
    model = _as_model(model)
    problems = []
    opsets = [o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    if not opsets:
        problems.append(f"{name}: imports no default-domain ONNX opset")
    for version in opsets:
        if not trt.opset_min <= version <= trt.opset_max:
            problems.append(f"{name}: opset {version} is outside TensorRT {trt.version}'s supported range "
                            f"(opset {trt.opset_min} to {trt.opset_max})")
    for i, node in enumerate(_all_nodes(model.graph)):
        if node.domain not in DEFAULT_DOMAINS:
            problems.append(f"{name}: {_node_label(node, i)} is in domain '{node.domain}', not the default "
                            f"ONNX domain: TensorRT {trt.version} would need a plugin for it")
        elif node.op_type not in trt.ops:
            problems.append(f"{name}: {_node_label(node, i)} is not in TensorRT {trt.version}'s "
                            f"supported ONNX operators")
    constants = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name not in constants:
            problems += _shape_problems(name, "input", value)
    for value in model.graph.output:
        problems += _shape_problems(name, "output", value)
    batched = batch_inputs(model)
    if batched:
        names = ("input " if len(batched) == 1 else "inputs ") + ", ".join(f"'{n}'" for n in batched)
        problems += [f"{name}: {p} (it applies to {names})" for p in profile_problems(profile)]
    return problems


# --- both graphs ----------------------------------------------------------------------------

def readiness(graphs: dict, target: str | TensorRTTarget = "10.3", profile=DEFAULT_PROFILE) -> dict:
    """A JSON-able summary: per graph its opset, op types, batched inputs and problems; overall
    `ready` and every problem in graph order. `graphs`: name -> serialized ONNX (or ModelProto)."""
    trt = load_target(target)
    summary = {"target": trt.version, "jetpack": trt.jetpack,
               "opset_range": [trt.opset_min, trt.opset_max],
               "source": trt.source, "source_header": trt.source_header,
               "profile": profile_dict(profile), "ready": True, "problems": [], "graphs": {}}
    for name, data in graphs.items():
        try:
            model = _as_model(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is one line
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            problems = [f"{name}: not a readable ONNX model ({why})"]
            entry = {"ready": False, "problems": problems}
        else:
            problems = check_graph(model, name, trt, profile)
            entry = {"ready": not problems,
                     "opset": next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), None),
                     "ops": sorted({n.op_type for n in _all_nodes(model.graph)}),
                     "batch_inputs": batch_inputs(model),
                     "fp16": name in FP16_GRAPHS,
                     "problems": problems}
        summary["graphs"][name] = entry
        summary["problems"] += problems
    summary["ready"] = not summary["problems"]
    return summary


def summary_line(summary: dict) -> str:
    """`not ready: <first problem> (+N more)`, or `ready (infer.onnx, train_step.onnx)`."""
    if summary["ready"]:
        return f"ready ({', '.join(summary['graphs'])})"
    problems = summary["problems"]
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"not ready: {problems[0]}{more}"


def _shape_spec(batched: dict[str, list], batch: int) -> str:
    return ",".join(f"{name}:" + "x".join(str(d) for d in [batch, *dims[1:]]) for name, dims in batched.items())


def trtexec_lines(graphs: dict, profile=DEFAULT_PROFILE, fp16_infer: bool = True, *,
                  target: str | TensorRTTarget | None = None) -> str:
    """A POSIX shell script with one `trtexec` invocation per graph, run from the bundle's root
    (the script cds there from BUNDLE/tensorrt/): the batch profile as --minShapes/--optShapes/
    --maxShapes for every input whose dim 0 is symbolic, --fp16 for infer.onnx only and only when
    `fp16_infer`, and one timing cache shared by both builds."""
    p = check_profile(profile)
    trt = load_target(target) if target is not None else None
    built_for = f" for {trt.describe()}" if trt else ""
    lines = [
        "#!/bin/sh",
        f"# Build TensorRT engines from this bundle's graphs, on the device{built_for}.",
        f"# Written by edgefa at export. Batch profile: min {p['min']}, opt {p['opt']}, max {p['max']}.",
        "# infer.onnx " + ("may run in FP16" if fp16_infer else "stays FP32")
        + "; train_step.onnx stays FP32 (the DFA update is never done in half precision).",
        "# Usage: sh BUNDLE/tensorrt/trtexec.sh      (TRTEXEC=/path/to/trtexec picks the binary)",
        "set -eu",
        'cd "$(dirname "$0")/.."',
        'trtexec="${TRTEXEC:-trtexec}"',
        'command -v "$trtexec" >/dev/null 2>&1 || trtexec=/usr/src/tensorrt/bin/trtexec   # where JetPack puts it',
    ]
    for name, data in graphs.items():
        model = _as_model(data)
        stem = name[:-len(".onnx")] if name.endswith(".onnx") else name
        args = [f"--onnx={name}", f"--saveEngine={stem}.engine"]
        batched = batch_inputs(model)
        if batched:
            args += [f"--minShapes={_shape_spec(batched, p['min'])}",
                     f"--optShapes={_shape_spec(batched, p['opt'])}",
                     f"--maxShapes={_shape_spec(batched, p['max'])}"]
        if fp16_infer and name in FP16_GRAPHS:
            args.append("--fp16")
        args.append(f"--timingCacheFile={TIMING_CACHE}")
        lines.append('"$trtexec" ' + " ".join(shlex.quote(a) for a in args))
    return "\n".join(lines) + "\n"


def bundle_files(summary: dict, graphs: dict, fp16_infer: bool) -> dict[str, bytes]:
    """The two files export adds to the bundle: tensorrt/trtexec.sh and tensorrt/readiness.json."""
    script = trtexec_lines(graphs, summary["profile"], fp16_infer, target=summary["target"])
    record = dict(summary, fp16_infer=bool(fp16_infer), fp16_train_step=False, trtexec=TRTEXEC_SCRIPT)
    return {TRTEXEC_SCRIPT: script.encode(), READINESS_FILE: (json.dumps(record, indent=2) + "\n").encode()}


def manifest_section(summary: dict, fp16_infer: bool, refit_graph: bool = False) -> dict:
    """The manifest's "tensorrt" table (the device runtime reads profile and fp16_infer).
    "refit_graph": the bundle's tensorrt/infer_refit.onnx, or None where it does not carry one
    (the device then derives it: runtime/refit_graph.py)."""
    return {"target": summary["target"], "ready": summary["ready"], "problems": list(summary["problems"]),
            "profile": dict(summary["profile"]), "fp16_infer": bool(fp16_infer), "fp16_train_step": False,
            "trtexec": TRTEXEC_SCRIPT, "readiness": READINESS_FILE,
            "refit_graph": REFIT_GRAPH if refit_graph else None}
