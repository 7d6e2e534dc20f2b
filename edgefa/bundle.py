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
import io
import json
import os
import shutil
import tarfile
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
        raise BundleError(f"{path}: unreadable npz ({str(exc).splitlines()[0]})") from None


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
    need(all(isinstance(model.get(k), int) and model[k] > 0 for k in ("in_features", "n_classes")),
         "model needs positive integers in_features and n_classes")
    need(model.get("activation") in ("relu", "tanh"), f"unknown activation {model.get('activation')!r}")
    layers = model.get("layers")
    need(isinstance(layers, list) and len(layers) >= 2
         and all(isinstance(l, dict) and isinstance(l.get("name"), str)
                 and all(isinstance(l.get(k), int) and l[k] > 0 for k in ("in", "out")) for l in layers),
         "model.layers must list at least two layers, each with a name and positive in/out widths")
    widths = [model["in_features"]] + [l["out"] for l in layers]
    need([l["in"] for l in layers] == widths[:-1] and widths[-1] == model["n_classes"],
         "model.layers do not connect in_features to n_classes")
    opt = m.get("optimizer")
    need(isinstance(opt, dict) and _is_number(opt.get("lr")) and _is_number(opt.get("momentum"))
         and 0 <= opt["momentum"] < 1, "optimizer needs numbers lr and momentum (0 <= momentum < 1)")
    std = (m.get("input") or {}).get("standardize") if isinstance(m.get("input"), dict) else None
    need(isinstance(std, dict) and _is_number(std.get("mean")) and _is_number(std.get("std")) and std["std"] > 0,
         "input.standardize needs numbers mean and std > 0")
    need(isinstance(m.get("feedback"), dict), "no 'feedback' table")


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
            dest.mkdir(parents=True)
            for m in members:
                out = dest / m.name
                out.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(m) as src, open(out, "xb") as dst:
                    shutil.copyfileobj(src, dst)
    except (tarfile.TarError, OSError) as exc:
        raise BundleError(f"not a bundle archive ({exc})") from None
    read_bundle(dest)
    return dest
