"""A corrupt graph whose hashes match is one line, exit 2, naming the file (issue 17 B.1).

Someone truncates train_step.onnx (or fills infer.onnx with random bytes) and rewrites its sha256
and size in manifest.json: read_bundle passes, and every local command used to crash with a
~43-line onnxruntime InvalidProtobuf traceback, exit 1. The fix is at the source
(runtime.engine.load_session), so every caller gets one BundleError line naming the file; and
`device verify`, which exited 0 on such a bundle (and on one with both checkpoints truncated),
now builds the sessions, runs a forward pass and says what state/ holds. Real parts throughout:
real exported bundles, real onnxruntime sessions, the real CLI entry point.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from conftest import assert_one_error_line, cli_in_process
from edgefa.bundle import read_bundle
from edgefa.errors import BundleError
from edgefa.runtime.engine import OrtEngine


def rehashed(bundle: Path, name: str, data: bytes) -> Path:
    """Write `data` as the bundle's file `name` and make the manifest agree with it."""
    (bundle / name).write_bytes(data)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return bundle / name


def truncated(bundle: Path, name: str) -> Path:
    data = (bundle / name).read_bytes()
    return rehashed(bundle, name, data[: len(data) // 2])


def garbled(bundle: Path, name: str) -> Path:
    size = (bundle / name).stat().st_size
    return rehashed(bundle, name, random.Random(0).randbytes(size))


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def local_commands(bundle: Path, data: Path, tmp_path: Path) -> dict[str, tuple]:
    return {
        "device finetune": ("device", "finetune", bundle, "--data", data, "--steps", "2"),
        "device evaluate": ("device", "evaluate", bundle, "--data", data),
        "profile": ("profile", bundle, "--data", data, "--steps", "2", "--warmup", "0", "--out", tmp_path / "prof"),
        "fpga simulate": ("fpga", "simulate", bundle, "--data", data, "--steps", "1"),
        "fpga sweep": ("fpga", "sweep", bundle, "--data", data, "--steps", "1", "--widths", "8",
                       "--rounding", "AP_RND_CONV", "--out", tmp_path / "sweep"),
        "device verify": ("device", "verify", bundle),
    }


# step_factors.onnx: the step graph the CPU engine runs (train_step.onnx is the GPU's and old runtimes')
@pytest.mark.parametrize("damage, graph", [(truncated, "step_factors.onnx"), (garbled, "infer.onnx")],
                         ids=["step graph truncated", "infer random bytes"])
def test_every_local_command_on_a_rehashed_corrupt_graph_is_one_line_naming_it(
        tiny_bundle, digits_npz, tmp_path, damage, graph):
    bad = damage(tiny_bundle, graph)
    read_bundle(tiny_bundle)                                  # the hashes match: only loading finds it
    before = files(tiny_bundle)
    for name, args in local_commands(tiny_bundle, digits_npz, tmp_path).items():
        proc = cli_in_process(*args)
        try:
            assert_one_error_line(proc, str(bad), "cannot load this graph")
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None
    assert files(tiny_bundle) == before                       # nothing written into the bundle
    assert not (tmp_path / "prof").exists() and not (tmp_path / "sweep").exists()


def test_the_engine_refuses_a_corrupt_graph_for_every_caller(tiny_bundle):
    """The library, not only the CLI: the one BundleError line a server's deploy and start use too."""
    bad = truncated(tiny_bundle, "step_factors.onnx")      # the step graph a CPU engine runs
    with pytest.raises(BundleError) as refused:
        OrtEngine(read_bundle(tiny_bundle), ("CPUExecutionProvider",))
    assert str(refused.value).startswith(f"{bad}: onnxruntime ") and "\n" not in str(refused.value)


def test_verify_vouches_for_the_whole_step_graph_a_cpu_engine_does_not_run(tiny_bundle):
    """A CPU engine steps with step_factors.onnx; a GPU device runs train_step.onnx: verify loads both."""
    bad = truncated(tiny_bundle, "train_step.onnx")
    OrtEngine(read_bundle(tiny_bundle), ("CPUExecutionProvider",))     # the CPU engine never opens it
    assert_one_error_line(cli_in_process("device", "verify", tiny_bundle), str(bad), "onnxruntime")


def test_a_rehashed_truncated_npz_is_one_line_naming_it(tiny_bundle):
    bad = truncated(tiny_bundle, "weights.npz")
    assert_one_error_line(cli_in_process("device", "verify", tiny_bundle), str(bad), "unreadable npz")


def test_verify_says_what_state_holds_and_fails_when_no_checkpoint_is_usable(tiny_bundle, digits_npz):
    ok = cli_in_process("device", "verify", tiny_bundle)
    assert ok.returncode == 0, ok.stderr
    assert "graphs: infer.onnx, train_step.onnx, step_factors.onnx load" in ok.stdout
    assert "state/: no checkpoint (a fine-tune starts from the bundle's weights)" in ok.stdout

    tuned = cli_in_process("device", "finetune", tiny_bundle, "--data", digits_npz, "--steps", "4",
                           "--checkpoint-every", "2")
    assert tuned.returncode == 0, tuned.stderr
    state = tiny_bundle / "state"
    ok = cli_in_process("device", "verify", tiny_bundle)
    assert ok.returncode == 0, ok.stderr
    assert ("state/: checkpoint.npz at step 4 (a fine-tune resumes from it); checkpoint.prev.npz at step 2"
            in ok.stdout.replace("\n", ""))

    torn = (state / "checkpoint.npz").read_bytes()[:300]
    (state / "checkpoint.npz").write_bytes(torn)
    fallback = cli_in_process("device", "verify", tiny_bundle)
    assert fallback.returncode == 0, fallback.stderr
    text = fallback.stdout.replace("\n", "")
    assert "checkpoint.npz damaged (unreadable device checkpoint" in text
    assert "checkpoint.prev.npz at step 2 (a fine-tune resumes from it)" in text

    (state / "checkpoint.prev.npz").write_bytes(torn)
    before = files(tiny_bundle)
    assert_one_error_line(cli_in_process("device", "verify", tiny_bundle),
                          "checkpoint.npz", "checkpoint.prev.npz", "move both out of")
    assert files(tiny_bundle) == before                       # verify only reads
