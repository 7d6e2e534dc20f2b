"""Reading a bundle verifies everything; every bad bundle is one line on stderr and exit status 2.

Each corruption is driven through the real CLI (`device verify` and `device finetune`, run as
subprocesses) and through `edgefa.bundle.read_bundle` directly.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_error_line, run_all, run_edgefa
from edgefa.bundle import (
    MANIFEST,
    PAYLOAD_FILES,
    feedback_shapes,
    param_shapes,
    read_bundle,
    sha256_file,
    write_bundle,
)
from edgefa.errors import BundleError, EdgefaError


# --- helpers ---------------------------------------------------------------------------------


def load_manifest(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST).read_text())


def save_manifest(bundle: Path, manifest: dict) -> None:
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2))


def resave_weights(bundle: Path, arrays: dict, allow_pickle: bool = False) -> None:
    """Replace weights.npz and update its sha256 and size in the manifest, so the hash passes."""
    path = bundle / "weights.npz"
    with open(path, "wb") as f:
        np.savez(f, allow_pickle=allow_pickle, **arrays)
    manifest = load_manifest(bundle)
    manifest["files"]["weights.npz"] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    save_manifest(bundle, manifest)


def original_weights(bundle: Path) -> dict[str, np.ndarray]:
    with np.load(bundle / "weights.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


class _WritesMarkerWhenUnpickled:
    """Unpickling this calls open(marker, 'w'): the marker file proves that something unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --- each bad bundle: corrupt it; return (the path to open, the file the message must name,
#     the problem it must state) -----------------------------------------------------------------

def _missing_payload(b: Path):
    (b / "infer.onnx").unlink()
    return b, str(b / "infer.onnx"), "missing"


def _weights_byte_flipped(b: Path):
    flip_one_byte(b / "weights.npz")
    return b, str(b / "weights.npz"), "sha256 mismatch"


def _train_step_byte_flipped(b: Path):
    flip_one_byte(b / "train_step.onnx")
    return b, str(b / "train_step.onnx"), "sha256 mismatch"


def _unknown_version(b: Path):
    m = load_manifest(b)
    m["format_version"] = 99
    save_manifest(b, m)
    return b, str(b / MANIFEST), "unknown format version 99"


def _manifest_not_json(b: Path):
    (b / MANIFEST).write_text('{"format": "edgefa-bundle", "format_version": 1,\n  oops')
    return b, str(b / MANIFEST), "not valid JSON"


def _files_entry_dotdot(b: Path):
    m = load_manifest(b)
    m["files"]["../evil"] = {"sha256": "0" * 64, "bytes": 1}
    save_manifest(b, m)
    return b, str(b / MANIFEST), "'../evil' escapes the bundle"


def _files_entry_absolute(b: Path):
    m = load_manifest(b)
    m["files"]["/etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}
    save_manifest(b, m)
    return b, str(b / MANIFEST), "'/etc/passwd' escapes the bundle"


def _wrong_shape_hash_updated(b: Path):
    w = original_weights(b)
    w["fc0.weight"] = np.ascontiguousarray(w["fc0.weight"].T)  # (64, 32) instead of (32, 64)
    resave_weights(b, w)
    return b, str(b / "weights.npz"), "'fc0.weight' has shape (64, 32), manifest says (32, 64)"


def _object_array_hash_updated(b: Path):
    w = original_weights(b)
    marker = b.parent / "UNPICKLED"
    bias = np.empty(w["fc0.bias"].shape, dtype=object)
    bias[:] = [_WritesMarkerWhenUnpickled(str(marker))] * bias.size
    w["fc0.bias"] = bias
    resave_weights(b, w, allow_pickle=True)
    return b, "weights.npz: unreadable npz", "allow_pickle=False"


def _markup_in_file_name(b: Path):
    m = load_manifest(b)
    m["files"]["[/x]"] = {"sha256": "0" * 64, "bytes": 1}  # rich markup must print as text
    save_manifest(b, m)
    return b, str(b / "[/x]"), "missing"


def _files_entry_not_a_table(b: Path):
    m = load_manifest(b)
    m["files"]["infer.onnx"] = "abc"
    save_manifest(b, m)
    return b, str(b / MANIFEST), "file entry 'infer.onnx' needs a sha256 and a byte count"


def _layers_not_a_list(b: Path):
    m = load_manifest(b)
    m["model"]["layers"] = 5
    save_manifest(b, m)
    return b, str(b / MANIFEST), "model.layers must list at least one layer"


def _no_optimizer(b: Path):
    m = load_manifest(b)
    del m["optimizer"]
    save_manifest(b, m)
    return b, str(b / MANIFEST), "optimizer needs numbers lr and momentum"


def _version_true(b: Path):
    m = load_manifest(b)
    m["format_version"] = True  # True == 1 in Python; still not a version
    save_manifest(b, m)
    return b, str(b / MANIFEST), "unknown format version True"


def _not_a_directory(b: Path):
    target = b / "infer.onnx"          # a file, not a bundle directory
    return target, str(target), "not a bundle directory"


def _does_not_exist(b: Path):
    target = b.parent / "no-such-bundle"
    return target, str(target), "not a bundle directory"


BAD_BUNDLES = {
    "missing-infer.onnx": _missing_payload,
    "weights.npz-byte-flipped": _weights_byte_flipped,
    "train_step.onnx-byte-flipped": _train_step_byte_flipped,
    "unknown-format-version": _unknown_version,
    "manifest-not-json": _manifest_not_json,
    "files-entry-dotdot": _files_entry_dotdot,
    "files-entry-absolute": _files_entry_absolute,
    "wrong-shape-hash-updated": _wrong_shape_hash_updated,
    "object-array-hash-updated": _object_array_hash_updated,
    "not-a-directory": _not_a_directory,
    "does-not-exist": _does_not_exist,
    "markup-in-file-name": _markup_in_file_name,
    "files-entry-not-a-table": _files_entry_not_a_table,
    "layers-not-a-list": _layers_not_a_list,
    "no-optimizer": _no_optimizer,
    "format-version-true": _version_true,
}

# One case per kind of problem through the CLI (a subprocess each, so kept to the distinct kinds);
# every case goes through read_bundle directly.
CLI_CASES = ["missing-infer.onnx", "weights.npz-byte-flipped", "unknown-format-version",
             "manifest-not-json", "files-entry-dotdot", "wrong-shape-hash-updated",
             "object-array-hash-updated", "not-a-directory", "markup-in-file-name", "no-optimizer"]


# --- the good bundle -------------------------------------------------------------------------

def test_good_bundle_verifies_and_shows_every_file(tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    proc = run_edgefa("device", "verify", tiny_bundle)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr == ""
    assert "64 -> 32 -> 16 -> 10" in proc.stdout
    for name in PAYLOAD_FILES:
        assert name in proc.stdout
        assert manifest["files"][name]["sha256"][:16] in proc.stdout  # the hash it verified

    bundle = read_bundle(tiny_bundle)
    assert bundle.path == tiny_bundle
    assert {k: v.shape for k, v in bundle.weights.items()} == param_shapes(bundle.model)
    assert {k: v.shape for k, v in bundle.feedback.items()} == feedback_shapes(bundle.model)
    assert all(a.dtype == np.float32 for a in [*bundle.weights.values(), *bundle.feedback.values()])
    for name, arr in original_weights(tiny_bundle).items():
        np.testing.assert_array_equal(bundle.weights[name], arr)
    for name in PAYLOAD_FILES:
        assert manifest["files"][name]["sha256"] == sha256_file(tiny_bundle / name)
    assert bundle.size_bytes() == (sum(f["bytes"] for f in manifest["files"].values())
                                   + (tiny_bundle / MANIFEST).stat().st_size)


# --- the bad bundles -------------------------------------------------------------------------

def test_bad_bundles_are_one_line_exit_2_in_the_cli(tiny_bundle_master, digits_npz, tmp_path):
    """Each CLI case through both `device verify` and `device finetune`, the subprocesses at once."""
    cases = {}
    for case in CLI_CASES:
        copy = tmp_path / case / "bundle"
        shutil.copytree(tiny_bundle_master, copy)
        cases[case] = BAD_BUNDLES[case](copy)
    calls = [(case, command) for case in cases for command in ("verify", "finetune")]
    args = [("device", "verify", cases[case][0]) if command == "verify" else
            ("device", "finetune", cases[case][0], "--data", digits_npz, "--steps", "2")
            for case, command in calls]

    results = run_all(*args)

    failures = []
    for (case, command), proc in zip(calls, results):
        _, where, problem = cases[case]
        try:
            assert_one_error_line(proc, where, problem)
        except AssertionError as exc:
            failures.append(f"{case} / device {command}: {exc}")
    assert not failures, "\n\n".join(failures)
    for case in cases:                            # nothing was trained into a refused bundle
        assert not (tmp_path / case / "bundle" / "state").exists(), case
        assert not (tmp_path / case / "UNPICKLED").exists(), case


@pytest.mark.parametrize("case", list(BAD_BUNDLES))
def test_bad_bundle_raises_bundle_error_from_read_bundle(case, tiny_bundle):
    target, where, problem = BAD_BUNDLES[case](tiny_bundle)
    with pytest.raises(BundleError) as info:
        read_bundle(target)
    message = str(info.value)
    assert isinstance(info.value, EdgefaError)
    assert "\n" not in message
    assert where in message and problem in message, message


def test_object_array_is_refused_without_unpickling(tiny_bundle):
    _object_array_hash_updated(tiny_bundle)
    marker = tiny_bundle.parent / "UNPICKLED"
    # The trap is armed: numpy *would* run the pickle if asked to.
    with np.load(tiny_bundle / "weights.npz", allow_pickle=True) as z:
        z["fc0.bias"]
    assert marker.exists()
    marker.unlink()

    with pytest.raises(BundleError, match=r"weights\.npz: unreadable npz \(.*allow_pickle=False"):
        read_bundle(tiny_bundle)
    assert not marker.exists()


def test_wrong_shape_passes_the_hash_and_is_caught_by_the_shape_check(tiny_bundle):
    _wrong_shape_hash_updated(tiny_bundle)
    m = load_manifest(tiny_bundle)
    assert m["files"]["weights.npz"]["sha256"] == sha256_file(tiny_bundle / "weights.npz")
    with pytest.raises(BundleError) as info:
        read_bundle(tiny_bundle)
    assert str(info.value) == (f"{tiny_bundle}/weights.npz: 'fc0.weight' has shape (64, 32), "
                               "manifest says (32, 64)")


# --- write_bundle is atomic ------------------------------------------------------------------

def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _bundle_parts(bundle: Path):
    manifest = load_manifest(bundle)
    graphs = {name: (bundle / name).read_bytes() for name in ("infer.onnx", "train_step.onnx")}
    b = read_bundle(bundle)
    return manifest, graphs, dict(b.weights), dict(b.feedback)


def _leftovers(bundle: Path) -> list[str]:
    return sorted(p for p in os.listdir(bundle.parent) if p.startswith(f".{bundle.name}."))


def test_write_bundle_failing_shape_check_leaves_the_old_bundle_intact(tiny_bundle):
    manifest, graphs, weights, feedback = _bundle_parts(tiny_bundle)
    before = _snapshot(tiny_bundle)
    bad = dict(weights, **{"fc1.bias": np.zeros(17, np.float32)})      # should be (16,)

    with pytest.raises(BundleError, match=r"'fc1\.bias' has shape \(17,\), manifest says \(16,\)"):
        write_bundle(tiny_bundle, manifest, graphs, bad, feedback)

    assert _snapshot(tiny_bundle) == before
    read_bundle(tiny_bundle)                     # still a whole, verifiable bundle
    assert _leftovers(tiny_bundle) == []


def test_write_bundle_replaces_an_existing_bundle_with_a_whole_new_one(tiny_bundle):
    manifest, graphs, weights, feedback = _bundle_parts(tiny_bundle)
    halved = {k: (v * 0.5).astype(np.float32) for k, v in weights.items()}

    out = write_bundle(tiny_bundle, manifest, graphs, halved, feedback)

    assert out == tiny_bundle.resolve()
    b = read_bundle(tiny_bundle)
    for name, arr in halved.items():
        np.testing.assert_array_equal(b.weights[name], arr)
    assert b.manifest["format_version"] == 1
    assert _leftovers(tiny_bundle) == []
