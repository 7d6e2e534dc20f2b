"""The bundle: the one thing that crosses from host to device. numpy only (device side).

    BUNDLE/
      manifest.json    format + version, model topology, input scaling, loss, update rule,
                       optimizer, feedback provenance, graph signatures, sha256 of every file
      infer.onnx       x + weights -> logits                       (dynamic batch)
      train_step.onnx  x, labels, lr, weights [, momentum], feedback
                         -> next weights [, next momentum], loss, logits
      weights.npz      float32, keys "<layer>.weight" / "<layer>.bias"
      feedback.npz     float32, key "<layer>" for every hidden layer: B_l [classes, width_l]
      state/           written by the device (runtime/state.py); not part of the manifest

Weights and feedback are graph *inputs*, not initializers: the file holds one copy of them, and
the device binds its live buffers straight into both graphs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from .errors import BundleError

FORMAT = "edgefa-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PAYLOAD_FILES = ("infer.onnx", "train_step.onnx", "weights.npz", "feedback.npz")
STATE_DIR = "state"


# --- the naming contract shared by the exporter, the graphs and the runtime ------------------

def layer_names(model: dict) -> list[str]:
    return [layer["name"] for layer in model["layers"]]


def param_shapes(model: dict) -> dict[str, tuple[int, ...]]:
    """Trainable tensors in graph order: `<layer>.weight` [out, in] and `<layer>.bias` [out]."""
    shapes = {}
    for layer in model["layers"]:
        shapes[f"{layer['name']}.weight"] = (layer["out"], layer["in"])
        shapes[f"{layer['name']}.bias"] = (layer["out"],)
    return shapes


def feedback_shapes(model: dict) -> dict[str, tuple[int, int]]:
    """DFA feedback B_l [classes, width_l] for every hidden layer (all layers but the head)."""
    return {layer["name"]: (model["n_classes"], layer["out"]) for layer in model["layers"][:-1]}


def momentum_name(param: str) -> str:
    return f"{param}.momentum"


def next_name(tensor: str) -> str:
    return f"{tensor}.next"


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
    except (OSError, ValueError, EOFError) as exc:
        raise BundleError(f"{path.name}: unreadable npz ({str(exc).splitlines()[0]})") from None


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, **{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()})


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- writing (host) -------------------------------------------------------------------------

def write_bundle(out_dir: str | os.PathLike, manifest: dict, graphs: dict[str, bytes],
                 weights: dict[str, np.ndarray], feedback: dict[str, np.ndarray]) -> Path:
    """Write a complete bundle into a temporary sibling and rename it into place, so a crash
    leaves either no bundle or a whole one. An existing bundle at `out_dir` is replaced."""
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, data in graphs.items():
            (tmp / name).write_bytes(data)
        save_npz(tmp / "weights.npz", weights)
        save_npz(tmp / "feedback.npz", feedback)
        manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION)
        manifest["files"] = {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                             for name in PAYLOAD_FILES}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        check_arrays(manifest["model"], weights, feedback, where=str(out))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


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
    if version != FORMAT_VERSION:
        raise BundleError(f"{manifest_path}: unknown format version {version!r} (this edgefa reads {FORMAT_VERSION})")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleError(f"{manifest_path}: no 'files' table")
    for name in files:
        if not _safe_relative(name):
            raise BundleError(f"{manifest_path}: file entry {name!r} escapes the bundle")
    for name in PAYLOAD_FILES:
        if name not in files:
            raise BundleError(f"{manifest_path}: '{name}' is not listed")
    for name, entry in files.items():
        f = root / name
        if not f.is_file():
            raise BundleError(f"{f}: missing")
        if sha256_file(f) != entry.get("sha256"):
            raise BundleError(f"{f}: sha256 mismatch (corrupt or modified)")
    try:
        weights = load_npz_strict(root / "weights.npz")
        feedback = load_npz_strict(root / "feedback.npz")
        check_arrays(manifest["model"], weights, feedback, where=str(root))
    except KeyError as exc:
        raise BundleError(f"{manifest_path}: missing field {exc}") from None
    return Bundle(root, manifest, weights, feedback)
