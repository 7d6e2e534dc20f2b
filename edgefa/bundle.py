"""The bundle: the one thing that crosses from host to device. numpy only (device side).

    BUNDLE/
      manifest.json    format + version, model topology, input scaling, loss, update rule,
                       optimizer, feedback provenance, graph signatures, sha256 of every file
      infer.onnx       x + weights -> logits                       (dynamic batch)
      train_step.onnx  x, labels, lr, weights [, momentum], feedback
                         -> next weights [, next momentum], update_bound, loss, logits
                       (loss "bradley-terry": x_chosen, x_rejected instead of x, labels;
                        -> ..., update_bound, loss, score_chosen, score_rejected)
      weights.npz      float32, keys "<layer>.weight" / "<layer>.bias" (every layer)
      feedback.npz     float32, one B [classes, width] per trainable hidden stage (see below)
      state/           written by the device (runtime/state.py); not part of the manifest

Weights and feedback are graph *inputs*, not initializers: the file holds one copy of them, and
the device binds its live buffers straight into both graphs.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from math import prod
from pathlib import Path, PurePosixPath

import numpy as np

from . import storage
from .errors import BundleError

FORMAT = "edgefa-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PAYLOAD_FILES = ("infer.onnx", "train_step.onnx", "weights.npz", "feedback.npz")
STATE_DIR = "state"
# what the device writes in a bundle's state/ (runtime/state.py writes it; the --out policy reads it)
CHECKPOINT = "checkpoint.npz"
PREVIOUS = "checkpoint.prev.npz"
LOCK = ".lock"
CHECKPOINT_NAMES = (CHECKPOINT, PREVIOUS)     # newest first
TEMPORARY_PATTERN = f".{CHECKPOINT}.*.tmp"    # storage.replace_file's `.NAME.PID.tmp`
TRT_CACHE = "trt_cache"                       # TensorRT's caches (runtime/engine.py, tensorrt_build.py)
# trunk features cached per sample (runtime/feature_cache.py): `.features-<bundle>-<data>.f32` and its
# temporary `.NAME.PID.tmp`; dot files, so a pulled or packed bundle never carries them
FEATURE_CACHE_PATTERNS = (".features-*.f32", "..features-*.f32.*.tmp")
# The forward pass with the weights as initializers, from which TensorRT builds a refittable
# inference engine (exporters.onnx_graphs.refittable_infer_graph; runtime.tensorrt_build).
REFIT_GRAPH = "tensorrt/infer_refit.onnx"


# --- the naming contract shared by the exporter, the graphs and the runtime ------------------
#
# A model's tensors are grouped into *layers*, each with a `.weight` and a `.bias` (a LayerNorm's
# gamma and beta are its weight and bias). The graphs, the runtime's overflow bounds and
# `--trainable` all work layer by layer. What the layers are depends on the manifest's model
# "kind" (absent: "mlp", the bundles written before resmlp existed):
#
#   mlp     fc0 .. fc{L-1}, head                                   (model["layers"])
#   resmlp  embed, blocks.{i}.norm, blocks.{i}.fc1, blocks.{i}.fc2 (i < depth), norm, head
#   cnn     conv{i} .. (the names in model["convs"]; a part cut above conv0 starts later), fc, head
#
# Trainable *units*, counted from the head (`--trainable last:K` trains the last K of them):
#   mlp     [head], [fc{L-1}], ..., [fc0]
#   resmlp  [norm, head], [block depth-1: its norm, fc1, fc2], ..., [block 0], [embed]
#   cnn     [head], [fc], [conv{last}], ..., [conv{first}]

MODEL_KINDS = ("mlp", "resmlp", "cnn")
LOSS_CROSS_ENTROPY = "cross_entropy (mean over the batch)"
LOSS_BRADLEY_TERRY = "bradley-terry"
LOSSES = (LOSS_CROSS_ENTROPY, LOSS_BRADLEY_TERRY)
ACTIVATIONS = {"mlp": ("relu", "tanh", "gelu"), "resmlp": ("relu", "tanh", "gelu"), "cnn": ("relu", "tanh", "gelu")}
NEW_HEAD_ACTIVATIONS = ("relu", "tanh")     # a new head on a trunk (exporters/own_model.py) is edgefa's MLP


def model_kind(model: dict) -> str:
    """The kind of the part the device trains (a frozen trunk under it does not change it)."""
    return model.get("kind", "mlp")


# --- the frozen trunk ------------------------------------------------------------------------
#
# A bundle may carry a frozen *trunk* under the part the device trains: any forward graph (exported
# by torch's own ONNX exporter, or cut from the user's ONNX model) from the bundle's input x
# [batch, in_features] to flat features [batch, features]. manifest["model"]["trunk"] says what it
# is and where the cut is; its tensors are frozen weights (weights.npz, names "trunk.*", bound
# once like every frozen weight); the trainable part's own topology is the rest of
# manifest["model"], whose input is the trunk's features (part_topology). infer.onnx and
# train_step.onnx are the whole model, trunk included; trunk.onnx (x -> features) and
# head_step.onnx (the part's step on features) let the device cache trunk features per sample.

TRUNK_GRAPH = "trunk.onnx"
HEAD_STEP_GRAPH = "head_step.onnx"
TRUNK_PREFIX = "trunk."


def trunk_of(model: dict) -> dict | None:
    """manifest["model"]["trunk"], or None for a bundle the device trains from its input up."""
    return model.get("trunk")


def part_topology(model: dict) -> dict:
    """The trainable part alone: the model without its trunk, its input the trunk's features."""
    trunk = trunk_of(model)
    if trunk is None:
        return model
    part = {k: v for k, v in model.items() if k != "trunk"}
    part["in_features"] = trunk["features"]
    return part


def _block_layers(i: int) -> list[str]:
    return [f"blocks.{i}.norm", f"blocks.{i}.fc1", f"blocks.{i}.fc2"]


def layer_names(model: dict) -> list[str]:
    """Every parameter layer, in graph order."""
    if model_kind(model) == "resmlp":
        return ["embed", *[n for i in range(model["depth"]) for n in _block_layers(i)], "norm", "head"]
    return [conv["name"] for conv in model.get("convs", [])] + [layer["name"] for layer in model["layers"]]


def conv_spatial(conv: dict) -> list[int]:
    """A cnn conv stage's spatial size after the convolution, before its pool (torch's arithmetic;
    the pool then floors: out_spatial = conv_spatial // pool)."""
    return [(s + 2 * conv["padding"] - conv["kernel"]) // conv["stride"] + 1 for s in conv["in_spatial"]]


def layer_shapes(model: dict) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """layer -> (weight shape, bias shape), in graph order."""
    model = part_topology(model)
    if model_kind(model) != "resmlp":   # a cnn's convs [O, C, k] or [O, C, k, k], then its Linear layers
        convs = {c["name"]: ((c["out_channels"], c["in_channels"], *[c["kernel"]] * len(c["in_spatial"])),
                             (c["out_channels"],)) for c in model.get("convs", [])}
        return convs | {layer["name"]: ((layer["out"], layer["in"]), (layer["out"],)) for layer in model["layers"]}
    d, hidden, classes = model["width"], model["width"] * model["expansion"], model["n_classes"]
    shapes = {"embed": ((d, model["in_features"]), (d,))}
    for i in range(model["depth"]):
        shapes[f"blocks.{i}.norm"] = ((d,), (d,))
        shapes[f"blocks.{i}.fc1"] = ((hidden, d), (hidden,))
        shapes[f"blocks.{i}.fc2"] = ((d, hidden), (d,))
    shapes["norm"] = ((d,), (d,))
    shapes["head"] = ((classes, d), (classes,))
    return shapes


def param_shapes(model: dict) -> dict[str, tuple[int, ...]]:
    """Every weight tensor in graph order: the trunk's (frozen), then `<layer>.weight` and
    `<layer>.bias` of the part's layers (weights.npz)."""
    trunk = trunk_of(model)
    shapes = {name: tuple(shape) for name, shape in trunk["params"].items()} if trunk else {}
    for layer, (w, b) in layer_shapes(model).items():
        shapes[f"{layer}.weight"] = w
        shapes[f"{layer}.bias"] = b
    return shapes


def trainable_units(model: dict) -> list[list[str]]:
    """The units `--trainable last:K` counts, from the head back (see the table above)."""
    if model_kind(model) == "resmlp":
        return [["norm", "head"], *[_block_layers(i) for i in reversed(range(model["depth"]))], ["embed"]]
    return [[name] for name in reversed(layer_names(model))]


def check_trainable_syntax(spec) -> int | None:
    """`all` -> None; `last:K` -> K (an integer; its range depends on the model); `head` -> 1.
    Else BundleError."""
    if spec is None or spec == "all":
        return None
    if spec == "head":
        return 1
    text = str(spec)
    kind, sep, count = text.partition(":")
    if kind != "last" or not sep:
        raise BundleError(f"trainable {text!r}: expected 'all', 'head' or 'last:K'")
    try:
        return int(count)
    except ValueError:
        raise BundleError(f"trainable {text!r}: K must be an integer, got {count!r}") from None


def parse_trainable(spec, model: dict) -> int | None:
    """`all` -> None; `last:K` -> K (1 <= K <= the model's unit count). Anything else: BundleError."""
    k = check_trainable_syntax(spec)
    if k is None:
        return None
    units, text = trainable_units(model), str(spec)
    if not 1 <= k <= len(units):
        names = ", ".join("+".join(u) if len(u) < 3 else u[0].rsplit(".", 1)[0] for u in units)
        raise BundleError(f"trainable {text!r}: K must be between 1 and {len(units)} "
                          f"(this {model_kind(model)}'s units from the head: {names})")
    return k


def trainable_layers(model: dict) -> list[str]:
    """The layers the train_step graph updates, in graph order (model["trainable"], default all)."""
    k = parse_trainable(model.get("trainable", "all"), model)
    if k is None:
        return layer_names(model)
    chosen = {name for unit in trainable_units(model)[:k] for name in unit}
    return [name for name in layer_names(model) if name in chosen]


def trainable_params(model: dict) -> dict[str, tuple[int, ...]]:
    """The tensors the device trains (with momentum and ping-pong buffers), in graph order."""
    layers = set(trainable_layers(model))
    return {n: s for n, s in param_shapes(model).items() if n.rsplit(".", 1)[0] in layers}


def layer_params(layer: str) -> list[str]:
    return [f"{layer}.weight", f"{layer}.bias"]


def feedback_shapes(model: dict) -> dict[str, tuple[int, int]]:
    """DFA feedback B [classes, width] for every trainable stage that is not the readout:
    mlp: every hidden layer fc{l}; resmlp: `embed` and `block{i}` (the residual stream, width d);
    cnn: every conv{i} (width: its output after the pool, flattened C-major) and fc."""
    classes, trained = model["n_classes"], set(trainable_layers(model))
    if model_kind(model) == "resmlp":
        stages = {"embed": ["embed"]}
        stages.update({f"block{i}": _block_layers(i) for i in range(model["depth"])})
        return {s: (classes, model["width"]) for s, layers in stages.items() if trained & set(layers)}
    convs = {c["name"]: (classes, c["out_channels"] * prod(c["out_spatial"])) for c in model.get("convs", [])}
    return {name: shape for name, shape in convs.items() if name in trained} | {
        layer["name"]: (classes, layer["out"]) for layer in model["layers"][:-1] if layer["name"] in trained}


def describe_model(model: dict) -> str:
    """One line for tables: `64 -> 32 -> 10 (relu)`, or the residual MLP's shape; a trunk first."""
    trunk, model = trunk_of(model), dict(part_topology(model), in_features=model["in_features"])
    part_in = trunk["features"] if trunk else model["in_features"]
    if model_kind(model) == "resmlp":
        text = (f"resmlp {model['in_features']} -> {model['depth']} x [{model['width']} -> "
                f"{model['width'] * model['expansion']} -> {model['width']}] -> {model['n_classes']} "
                f"({model['activation']}, pre-LN)")
    elif model_kind(model) == "cnn":     # cnn 1x8x8 -> conv0 8x4x4 -> conv1 16x2x2 -> 64 -> 10  (relu)
        stages = [f"{c['name']} {'x'.join(map(str, [c['out_channels'], *c['out_spatial']]))}" for c in model["convs"]]
        text = " -> ".join([f"cnn {'x'.join(map(str, model['in_shape']))}", *stages]
                           + [str(l["out"]) for l in model["layers"]]) + f"  ({model['activation']})"
    else:
        text = " -> ".join([str(part_in)] + [str(l["out"]) for l in model["layers"]]) \
            + f"  ({model['activation']})"
    trainable = model.get("trainable", "all")
    if trunk:
        text = f"frozen trunk {model['in_features']} -> {trunk['features']} ({trunk['source']}), then " + text
    return text + ("" if trainable == "all" else f", trains {trainable}")


def momentum_name(param: str) -> str:
    return f"{param}.momentum"


def next_name(tensor: str) -> str:
    return f"{tensor}.next"


# The step-factors graph (STEP_FACTORS_GRAPH, optional: bundles written before it train by
# ping-pong) is train_step.onnx up to the gradients: per trainable tensor grad.<param>, or for a
# linear weight its two factors grad.<param>.delta [rows, out] and grad.<param>.input [rows, in]
# (gradient delta^T input), and no next weights. The CPU runtime applies the update in place.
STEP_FACTORS_GRAPH = "step_factors.onnx"
HEAD_FACTORS_GRAPH = "head_factors.onnx"      # the same for head_step.onnx (a bundle with a trunk)
DELTA, INPUT = "delta", "input"


def grad_name(param: str, factor: str | None = None) -> str:
    return f"grad.{param}" + (f".{factor}" if factor else "")


def feedback_input_name(layer: str) -> str:
    return f"feedback.{layer}"


# --- hashing and npz ------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_npz_strict(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz, never unpickling; one-line BundleError on any problem."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:   # a torn zip: the last two
        raise BundleError(f"{path}: unreadable npz ({str(exc).splitlines()[0]})") from None


def _save_float32_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """weights.npz / feedback.npz: every array float32 (a data set file is shared/datasets.save_npz)."""
    with open(path, "wb") as f:
        np.savez(f, **{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()})


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` whole or not at all (storage.replace_file: a temporary file beside
    it, fsynced, renamed over the old one, the folder fsynced)."""
    storage.replace_file(path, data)


# --- writing (host) -------------------------------------------------------------------------

def write_bundle(out_dir: str | os.PathLike, manifest: dict, graphs: dict[str, bytes],
                 weights: dict[str, np.ndarray], feedback: dict[str, np.ndarray],
                 extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a complete bundle into a temporary sibling and rename it into place, so a crash
    leaves either no bundle or a whole one. An existing bundle at `out_dir` is replaced
    (replace_folder); any other non-empty folder is refused before anything is written.
    `extra_files`: relative posix path (subfolders allowed, e.g. "tensorrt/trtexec.sh") -> bytes,
    written and hashed in the manifest like the payload files."""
    extra_files = dict(extra_files or {})
    for name in extra_files:  # read_bundle must accept it and pack_archive ship it (no '.' parts)
        parts = PurePosixPath(name).parts if isinstance(name, str) else ()
        if (not parts or not _safe_relative(name) or PurePosixPath(name).as_posix() != name
                or any(p.startswith(".") for p in parts) or parts[0] == STATE_DIR
                or name in (*PAYLOAD_FILES, MANIFEST)):
            raise BundleError(f"extra bundle file {name!r}: needs a plain relative posix path inside the "
                              f"bundle, outside {STATE_DIR}/, not a payload file or the manifest")
    out = Path(out_dir).resolve()
    check_replaceable(out)                          # before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, data in graphs.items():
            (tmp / name).write_bytes(data)
        _save_float32_npz(tmp / "weights.npz", weights)
        _save_float32_npz(tmp / "feedback.npz", feedback)
        for name, data in sorted(extra_files.items()):
            path = tmp.joinpath(*PurePosixPath(name).parts)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION)
        manifest["files"] = {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                             for name in (*PAYLOAD_FILES, *sorted(extra_files))}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        check_arrays(manifest["model"], weights, feedback, where=str(out))
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_state_file(relative: PurePosixPath) -> bool:
    """Whether a file at `relative` (inside state/) is one edgefa writes there: the two checkpoints,
    the lock, a save's temporary file, TensorRT's engine and timing caches (trt_cache/, named by
    TensorRT), or a feature cache and its temporary file. Anything else is the user's: a bundle holding it is not edgefa's to replace."""
    if relative.parts[:1] == (TRT_CACHE,):
        return len(relative.parts) > 1
    name = relative.as_posix()
    return name in (*CHECKPOINT_NAMES, LOCK) or any(fnmatch.fnmatchcase(name, pattern)
                                                     for pattern in (TEMPORARY_PATTERN, *FEATURE_CACHE_PATTERNS))



# --- replacing a bundle folder: never delete a file edgefa did not write ---------------------

def foreign_files(root: str | os.PathLike, limit: int = 3) -> list[str] | None:
    """The first `limit` files under `root` that edgefa did not write as a bundle (relative posix
    paths), [] when there are none, None when `root` has no edgefa-bundle manifest. edgefa's are:
    the manifest, the files it lists, edgefa's temporary files (`.NAME.*` beside a listed NAME),
    and in state/ only what the device writes there (is_state_file). Hashes are not
    checked: a damaged bundle is still edgefa's to replace."""
    root = Path(root)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        listed = {MANIFEST, *manifest["files"]} if manifest.get("format") == FORMAT else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    if listed is None:
        return None
    foreign = []
    for path in sorted(root.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        relative = PurePosixPath(path.relative_to(root).as_posix())
        temporary = path.name.startswith(".") and any(
            path.name.startswith(f".{PurePosixPath(name).name}.") for name in listed)
        in_state = relative.parts[0] == STATE_DIR and is_state_file(relative.relative_to(STATE_DIR))
        if not (relative.as_posix() in listed or in_state or temporary):
            foreign.append(relative.as_posix())
            if len(foreign) == limit:
                break
    return foreign


def is_edgefa_bundle_folder(root: str | os.PathLike) -> bool:
    """Whether every file under `root` is one edgefa wrote as a bundle (foreign_files)."""
    return foreign_files(root, limit=1) == []


def device_checkpoints(root: str | os.PathLike) -> list[Path]:
    """The device's fine-tuning checkpoints in a bundle folder's state/ (runtime/state.py)."""
    return sorted((Path(root) / STATE_DIR).glob("checkpoint*.npz"))


def holds_current_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is the current folder or one of the folders it is in."""
    here, path = Path.cwd().resolve(), Path(path).resolve()
    return path == here or path in here.parents


def check_replaceable(out: str | os.PathLike) -> None:
    """A BundleError unless a bundle may be written at `out`: nothing there, an empty folder, or a
    folder that is wholly an edgefa bundle; never the current folder or one holding it."""
    out = Path(out)
    if not os.path.lexists(out):
        return
    if holds_current_folder(out):
        raise BundleError(f"{out}: is the current folder (or holds it); edgefa will not replace it: "
                          "name a new folder")
    if not out.is_dir() or out.is_symlink():
        raise BundleError(f"{out}: exists and is not a folder; edgefa will not replace it")
    foreign = foreign_files(out) if any(out.iterdir()) else []
    if foreign != []:
        raise BundleError(f"{out}: holds files that are not an edgefa bundle"
                          + (f" ({', '.join(foreign)})" if foreign else "") + "; edgefa will not replace it")


def replace_folder(staged: Path, out: Path) -> None:
    """Move the finished bundle folder `staged` to `out` (a sibling: one file system). A bundle
    already at `out` (check_replaceable) is renamed aside to a hidden sibling, `staged` renamed in,
    and only then the old one removed; a failure between the renames puts the old one back. A crash
    between them leaves the old bundle whole in `.NAME.old-XXXX/`."""
    check_replaceable(out)
    if not os.path.lexists(out):
        storage.rename(staged, out)
        storage.fsync_dir(out.parent)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))   # empty: renamed over
    try:
        storage.rename(out, old)
    except Exception:
        old.rmdir()
        raise
    try:
        storage.rename(staged, out)
    except Exception:
        storage.rename(old, out)
        raise
    storage.fsync_dir(out.parent)
    storage.remove_tree(old)


# --- reading and verifying (device) ---------------------------------------------------------

@dataclass
class Bundle:
    path: Path
    manifest: dict
    weights: dict[str, np.ndarray]
    feedback: dict[str, np.ndarray]

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    def graph_path(self, name: str) -> Path:
        return self.path / f"{name}.onnx"

    @property
    def state_dir(self) -> Path:
        return self.path / STATE_DIR

    def size_bytes(self) -> int:
        return sum(f["bytes"] for f in self.manifest["files"].values()) + (self.path / MANIFEST).stat().st_size


def _safe_relative(name: str) -> bool:
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name


def check_arrays(model: dict, weights: dict, feedback: dict, where: str) -> None:
    for kind, expected, arrays in (("weights.npz", param_shapes(model), weights),
                                   ("feedback.npz", feedback_shapes(model), feedback)):
        for name, shape in expected.items():
            if name not in arrays:
                raise BundleError(f"{where}/{kind}: missing array '{name}'")
            got = tuple(arrays[name].shape)
            if got != tuple(shape):
                raise BundleError(f"{where}/{kind}: '{name}' has shape {got}, manifest says {tuple(shape)}")
            if arrays[name].dtype != np.float32:
                raise BundleError(f"{where}/{kind}: '{name}' is {arrays[name].dtype}, expected float32")
            bad = int(arrays[name].size - np.count_nonzero(np.isfinite(arrays[name])))
            if bad:
                raise BundleError(f"{where}/{kind}: '{name}' holds {bad} non-finite values (NaN/Inf)")
        extra = sorted(set(arrays) - set(expected))
        if extra:
            raise BundleError(f"{where}/{kind}: unexpected arrays {', '.join(extra)}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_manifest(m: dict, where) -> None:
    """The fields the device relies on, with their types, and a layer chain that connects."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise BundleError(f"{where}: {what}")

    files = m.get("files")
    need(isinstance(files, dict), "no 'files' table")
    for name, entry in files.items():
        need(_safe_relative(name), f"file entry {name!r} escapes the bundle")
        need(isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
             and isinstance(entry.get("bytes"), int), f"file entry {name!r} needs a sha256 and a byte count")
    model = m.get("model")
    need(isinstance(model, dict), "no 'model' table")
    kind = model.get("kind", "mlp")
    need(kind in MODEL_KINDS, f"unknown model kind {kind!r} (this edgefa's device trains {', '.join(MODEL_KINDS)})")
    need(all(isinstance(model.get(k), int) and model[k] > 0 for k in ("in_features", "n_classes")),
         "model needs positive integers in_features and n_classes")
    need(model.get("activation") in ACTIVATIONS[kind], f"unknown activation {model.get('activation')!r}")
    if trunk_of(model) is not None:
        _check_trunk(model, files, need)
    if kind == "resmlp":
        need(all(isinstance(model.get(k), int) and not isinstance(model.get(k), bool) and model[k] > 0
                 for k in ("width", "depth", "expansion")),
             "a resmlp model needs positive integers width, depth and expansion")
        need(_is_number(model.get("ln_eps")) and model["ln_eps"] > 0, "a resmlp model needs a number ln_eps > 0")
    else:
        layers = model.get("layers")
        need(isinstance(layers, list) and len(layers) >= 1
             and all(isinstance(l, dict) and isinstance(l.get("name"), str)
                     and all(isinstance(l.get(k), int) and l[k] > 0 for k in ("in", "out")) for l in layers),
             "model.layers must list at least one layer, each with a name and positive in/out widths")
        first = _check_convs(model, need) if kind == "cnn" else part_topology(model)["in_features"]
        widths = [first] + [l["out"] for l in layers]
        need([l["in"] for l in layers] == widths[:-1] and widths[-1] == model["n_classes"],
             "model.layers do not connect in_features to n_classes")
    try:
        parse_trainable(model.get("trainable", "all"), model)
    except BundleError as exc:
        need(False, f"model.{exc}")
    loss = m.get("loss", LOSS_CROSS_ENTROPY)
    need(loss in LOSSES, f"unknown loss {loss!r} (expected one of: {', '.join(LOSSES)})")
    need(loss != LOSS_BRADLEY_TERRY or model["n_classes"] == 1,
         "a bradley-terry bundle scores with one output (n_classes 1)")
    opt = m.get("optimizer")
    need(isinstance(opt, dict) and _is_number(opt.get("lr")) and _is_number(opt.get("momentum"))
         and 0 <= opt["momentum"] < 1, "optimizer needs numbers lr and momentum (0 <= momentum < 1)")
    std = (m.get("input") or {}).get("standardize") if isinstance(m.get("input"), dict) else None
    need(isinstance(std, dict) and _is_number(std.get("mean")) and _is_number(std.get("std")) and std["std"] > 0,
         "input.standardize needs numbers mean and std > 0")
    need(isinstance(m.get("feedback"), dict), "no 'feedback' table")


def _positive_ints(values, count: int | None = None) -> bool:
    return (isinstance(values, list) and (count is None or len(values) == count)
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values))


def _check_convs(model: dict, need) -> int:
    """A cnn's in_shape and conv stages chain (channels, spatial sizes, conv and pool arithmetic);
    returns the width its Linear layers start from (the last stage's output, flattened)."""
    shape = model.get("in_shape")
    need(_positive_ints(shape) and len(shape) in (2, 3) and prod(shape) == part_topology(model)["in_features"],
         "a cnn model needs in_shape [C, L] or [C, H, W] of positive integers, in_features in all")
    convs, channels, spatial = model.get("convs"), shape[0], shape[1:]
    need(isinstance(convs, list) and len(convs) >= 1, "a cnn model needs a non-empty list 'convs'")
    for conv in convs:
        need(isinstance(conv, dict) and isinstance(conv.get("name"), str)
             and _positive_ints([conv.get(k) for k in ("in_channels", "out_channels", "kernel", "stride")])
             and type(conv.get("padding")) is int and conv["padding"] >= 0 and conv.get("pool") in (1, 2)
             and _positive_ints(conv.get("in_spatial"), len(spatial))
             and _positive_ints(conv.get("out_spatial"), len(spatial)),
             "each cnn conv needs a name, positive integer channels, kernel and stride, padding >= 0, "
             "pool 1 or 2 and in/out spatial sizes")
        name = conv["name"]
        need(conv["in_channels"] == channels and conv["in_spatial"] == spatial,
             f"cnn conv {name} does not take the previous stage's output ({channels} x {spatial})")
        need(conv["out_spatial"] == [s // conv["pool"] for s in conv_spatial(conv)],
             f"cnn conv {name}: out_spatial {conv['out_spatial']} is not its conv and pool arithmetic")
        channels, spatial = conv["out_channels"], conv["out_spatial"]
    return channels * prod(spatial)


def _check_trunk(model: dict, files: dict, need) -> None:
    trunk = model["trunk"]
    need(isinstance(trunk, dict), "model.trunk must be a table")
    need(model_kind(model) != "resmlp", "a resmlp part cannot sit on a trunk (mlp and cnn parts can)")
    need(isinstance(trunk.get("features"), int) and not isinstance(trunk["features"], bool) and trunk["features"] > 0,
         "model.trunk needs a positive integer 'features'")
    need(isinstance(trunk.get("source"), str), "model.trunk needs a 'source' line")
    params = trunk.get("params")
    need(isinstance(params, dict) and all(
        isinstance(n, str) and n.startswith(TRUNK_PREFIX) and isinstance(s, list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in s) for n, s in params.items()),
        f"model.trunk.params must map '{TRUNK_PREFIX}*' names to shapes")
    for graph in (TRUNK_GRAPH, HEAD_STEP_GRAPH):
        need(graph in files, f"a bundle with a trunk lists {graph}")


def read_bundle(path: str | os.PathLike) -> Bundle:
    """Read a bundle and verify it: format and version, every file present with its sha256, no
    path that escapes the bundle, array shapes that match the topology. Any failure is a
    one-line BundleError naming the file and the problem."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle directory")
    manifest_path = root / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{manifest_path}: missing") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{manifest_path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path}: not an {FORMAT} manifest")
    version = manifest.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:  # True == 1 and 1.0 == 1: not versions
        raise BundleError(f"{manifest_path}: unknown format version {version!r} (this edgefa reads {FORMAT_VERSION})")
    check_manifest(manifest, manifest_path)
    files = manifest["files"]
    for name in PAYLOAD_FILES:
        if name not in files:
            raise BundleError(f"{manifest_path}: '{name}' is not listed")
    for name, entry in files.items():
        f = root / name
        if not f.is_file():
            raise BundleError(f"{f}: missing")
        if sha256_file(f) != entry.get("sha256"):
            raise BundleError(f"{f}: sha256 mismatch (corrupt or modified)")
    weights = load_npz_strict(root / "weights.npz")
    feedback = load_npz_strict(root / "feedback.npz")
    check_arrays(manifest["model"], weights, feedback, where=str(root))
    return Bundle(root, manifest, weights, feedback)


# --- the single-file archive that travels over the link ---------------------------------------

ARCHIVE_MAX_FILES = 64


def pack_archive(root: str | os.PathLike) -> bytes:
    """The bundle directory (with its state/, if any) as an uncompressed tar. Deterministic: the
    same files give the same bytes, so the archive's sha256 names the content."""
    root = Path(root)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
            info = tarfile.TarInfo(path.relative_to(root).as_posix())
            info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
            with open(path, "rb") as f:
                tar.addfile(info, f)
    return buf.getvalue()


def unpack_archive(archive: str | os.PathLike, dest: str | os.PathLike, max_bytes: int) -> Path:
    """Unpack an archive into `dest` (which must not exist) and verify it as a bundle. Only regular
    files with safe relative names are accepted: no absolute paths, no '..', no links or devices,
    at most ARCHIVE_MAX_FILES files and `max_bytes` in all. Nothing is written outside `dest`."""
    dest = Path(dest)
    try:
        with tarfile.open(archive, mode="r:") as tar:
            members = tar.getmembers()
            if len(members) > ARCHIVE_MAX_FILES:
                raise BundleError(f"archive holds {len(members)} entries (limit {ARCHIVE_MAX_FILES})")
            if sum(m.size for m in members) > max_bytes:
                raise BundleError(f"archive unpacks to more than {max_bytes} bytes")
            for m in members:
                if not m.isfile() or not _safe_relative(m.name) or m.name.startswith("."):
                    raise BundleError(f"archive entry '{m.name}' is not a plain file with a safe relative path")
            names = [PurePosixPath(m.name).as_posix() for m in members]
            folders = {str(parent) for name in names for parent in PurePosixPath(name).parents}
            if len(set(names)) != len(names) or folders & set(names):
                raise BundleError("archive holds the same path twice (as two files, or as a file and a folder)")
            if dest.exists():
                raise BundleError(f"{dest}: already exists")
            # Every file fsynced before the caller renames the bundle into place: after a power
            # loss a swapped-in bundle holds its bytes, not empty files.
            storage.make_dir(dest)
            for m in members:
                out = dest / m.name
                storage.make_dir(out.parent)
                with tar.extractfile(m) as src:
                    data = src.read()
                storage.write_file(out, data)
    except tarfile.TarError as exc:
        raise BundleError(f"not a bundle archive ({exc})") from None
    read_bundle(dest)
    return dest
