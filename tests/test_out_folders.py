"""`--out DIR` never deletes what edgefa did not write (issue 17, item 3).

export and device pull used to rmtree whatever DIR held and exit 0 (`--out .` wiped the current
folder; exporting over a fine-tuned bundle dropped its state/). Now, for every --out
(edgefa.out_folders): a folder that is not edgefa's own output of the same kind is refused with
one line; --force keeps it whole as DIR.replaced-<time>/ and writes DIR afresh (and puts it back
if the command fails); a bundle with device checkpoints counts as not replaceable; the current
folder is never replaced. Replacing a bundle is atomic (bundle.replace_folder), tested here at
every I/O point with storage's fault seam. Real parts throughout: real exports, a real device
server process for pull, the real CLI entry point.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import assert_one_error_line, cli_in_process, run_edgefa
from edgefa import storage
from edgefa.bundle import (BundleError, check_replaceable, is_edgefa_bundle_folder, read_bundle,
                           replace_folder)
from edgefa.link.client import DeviceClient


def files(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes (hidden ones included)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("a user's notes\n")
    (path / "data").mkdir()
    (path / "data" / "x.npz").write_bytes(b"not edgefa's")
    return path


def set_aside(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f"{name}.replaced-*"))


def ok(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_export_refuses_a_folder_of_user_files_and_force_keeps_it_beside(tiny_run, tmp_path):
    target = user_folder(tmp_path / "target")
    before, everything = files(target), files(tmp_path)
    line = assert_one_error_line(cli_in_process("export", tiny_run, "--out", target),
                                 str(target), "files edgefa did not write", "--force")
    assert "replaced-" in line
    assert files(tmp_path) == everything                      # refused before anything was written

    forced = ok(cli_in_process("export", tiny_run, "--out", target, "--force"))
    (kept,) = set_aside(tmp_path, "target")
    assert files(kept) == before and "kept it as" in forced.stderr
    assert str(kept) in forced.stderr.replace("\n", "")
    read_bundle(target)                                       # the new bundle, whole


def test_export_over_a_bundle_replaces_it_but_device_state_only_with_force(tiny_run, digits_npz, tmp_path):
    out = tmp_path / "bundles" / "dfa"
    ok(cli_in_process("export", tiny_run, "--out", out))
    first = files(out)
    ok(cli_in_process("export", tiny_run, "--lr", "0.02", "--out", out))     # a bundle over a bundle: replaced
    assert files(out) != first and read_bundle(out).manifest["optimizer"]["lr"] == 0.02
    assert sorted(p.name for p in out.parent.iterdir()) == ["dfa"]           # no temporary left behind

    ok(cli_in_process("device", "finetune", out, "--data", digits_npz, "--steps", "3"))
    tuned = files(out)
    assert "state/checkpoint.npz" in tuned
    line = assert_one_error_line(cli_in_process("export", tiny_run, "--out", out),
                                 "device state/ (step 3)", "--force")
    assert "fine-tuning that exists nowhere else" in line
    assert files(out) == tuned

    forced = ok(cli_in_process("export", tiny_run, "--out", out, "--force"))
    (kept,) = set_aside(out.parent, "dfa")
    assert files(kept) == tuned and read_bundle(kept)       # the old bundle, state and all, still a bundle
    assert not (out / "state").exists() and "step 3" in forced.stderr


def test_out_dot_never_wipes_the_current_folder(tiny_run, tmp_path, monkeypatch):
    here = user_folder(tmp_path / "work")
    monkeypatch.chdir(here)
    before = files(tmp_path)
    for extra in ((), ("--force",)):
        assert_one_error_line(cli_in_process("export", tiny_run, "--out", ".", *extra), "current folder")
        assert_one_error_line(cli_in_process("export", tiny_run, "--out", "..", *extra), "current folder")
    assert files(tmp_path) == before
    # an empty current folder takes an in-place kind (train writes its files into it), never a bundle
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    with pytest.raises(BundleError, match="current folder"):
        check_replaceable(".")


def test_every_writer_refuses_before_its_work(tiny_bundle, tmp_path):
    """train (before torch: the device-side process cannot import it), profile, fpga sweep, demo."""
    target = user_folder(tmp_path / "target")
    before = files(tmp_path)
    proc = run_edgefa("train", "--epochs", "1", "--out", target, without_torch=True)
    assert_one_error_line(proc, "files edgefa did not write")
    for args in (("profile", tiny_bundle, "--steps", "1", "--out", target),
                 ("fpga", "sweep", tiny_bundle, "--data", "digits", "--steps", "1", "--out", target),
                 ("demo", "--epochs", "1", "--out", target)):
        assert_one_error_line(cli_in_process(*args), "files edgefa did not write")
    # a folder of another kind is not this kind's either
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    (run_folder / "checkpoint.pt").write_bytes(b"x")
    (run_folder / "metrics.json").write_text("{}")
    assert_one_error_line(cli_in_process("profile", tiny_bundle, "--steps", "1", "--out", run_folder),
                          "an edgefa run folder")
    assert files(tmp_path) == {**before, "run/checkpoint.pt": b"x", "run/metrics.json": b"{}"}


def test_a_forced_set_aside_is_put_back_when_the_command_fails(tiny_bundle, tmp_path):
    target = user_folder(tmp_path / "target")
    before = files(tmp_path)
    proc = cli_in_process("profile", tiny_bundle, "--steps", "1", "--data", f"npz:{tmp_path / 'missing.npz'}",
                          "--out", target, "--force")
    assert proc.returncode == 2 and "missing.npz" in proc.stderr, proc.stderr
    assert files(tmp_path) == before and not set_aside(tmp_path, "target")


def test_a_same_kind_folder_is_written_over_in_place(tiny_bundle, tmp_path):
    out = tmp_path / "prof"
    ok(cli_in_process("profile", tiny_bundle, "--steps", "2", "--warmup", "0", "--out", out))
    (out / "my-notes.txt").write_text("kept\n")               # a user's file beside edgefa's: untouched
    ok(cli_in_process("profile", tiny_bundle, "--steps", "2", "--warmup", "0", "--out", out))
    assert (out / "my-notes.txt").read_text() == "kept\n" and (out / "profile.json").is_file()
    assert not set_aside(tmp_path, "prof")


# --- the library: write_bundle and pull swap folders atomically, and only edgefa's ----------------

def test_a_bundle_folder_is_edgefa_s_only_when_every_file_is(tiny_bundle):
    assert is_edgefa_bundle_folder(tiny_bundle)
    (tiny_bundle / "state").mkdir()
    (tiny_bundle / "state" / "checkpoint.npz").write_bytes(b"device's")
    (tiny_bundle / ".weights.npz.123.tmp").write_bytes(b"a temporary edgefa left")
    assert is_edgefa_bundle_folder(tiny_bundle)
    (tiny_bundle / "README").write_text("mine\n")
    assert not is_edgefa_bundle_folder(tiny_bundle)
    with pytest.raises(BundleError, match="not an edgefa bundle"):
        check_replaceable(tiny_bundle)


def test_replace_folder_leaves_the_old_bundle_or_the_new_at_every_crash_point(tiny_bundle, tmp_path):
    old_files = files(tiny_bundle)

    def staged_copy(n: int) -> Path:
        staged = tmp_path / f".staged-{n}"
        shutil.copytree(tiny_bundle, staged)
        (staged / "state").mkdir()
        (staged / "state" / "checkpoint.npz").write_bytes(b"the new bundle's state")
        return staged

    with storage.faults() as plan:                            # count the I/O points
        out = tmp_path / "count"
        shutil.copytree(tiny_bundle, out)
        replace_folder(staged_copy(0), out)
    n_ops = len(plan.ops)
    assert n_ops >= 3
    for n in range(1, n_ops + 1):
        out = tmp_path / f"out{n}"
        shutil.copytree(tiny_bundle, out)
        new_files = files(staged := staged_copy(n))
        with storage.faults(crash_at=n), pytest.raises(storage.InjectedCrash):
            replace_folder(staged, out)
        held = files(out) if out.exists() else None
        hidden = [p for p in tmp_path.glob(f".out{n}.old-*") if any(p.iterdir())]
        assert held in (old_files, new_files) or (held is None and [files(h) for h in hidden] == [old_files]), n
    # a failure (not a crash) between the two renames puts the old bundle back
    out = tmp_path / "rollback"
    shutil.copytree(tiny_bundle, out)
    with pytest.raises(FileNotFoundError):
        replace_folder(tmp_path / "no-such-staged-folder", out)
    assert files(out) == old_files and not list(tmp_path.glob(".rollback.old-*"))


def test_pull_refuses_user_files_and_device_state_and_force_keeps_them(tiny_bundle, digits_npz, tmp_path):
    from test_link_live import device_server

    target = user_folder(tmp_path / "target")
    with device_server(tmp_path / "store", listen="127.0.0.1:0") as srv:
        with DeviceClient(srv.url) as dev:
            dev.deploy(tiny_bundle)
        before = files(target)
        assert_one_error_line(cli_in_process("device", "pull", srv.url, "--out", target), "files edgefa did not write")
        assert files(target) == before
        ok(cli_in_process("device", "pull", srv.url, "--out", target, "--force"))
        (kept,) = set_aside(tmp_path, "target")
        assert files(kept) == before and read_bundle(target)

        pulled = tmp_path / "pulled"
        ok(cli_in_process("device", "pull", srv.url, "--out", pulled))       # state at step 0: a checkpoint
        assert_one_error_line(cli_in_process("device", "pull", srv.url, "--out", pulled), "device state/ (step 0)")
        ok(cli_in_process("device", "pull", srv.url, "--out", pulled, "--force"))
        assert len(set_aside(tmp_path, "pulled")) == 1


# --- issue 17 B.2: what edgefa writes in state/, and the folders the demo makes -----------------------

def test_state_holds_only_what_the_device_writes(tiny_bundle):
    state = tiny_bundle / "state"
    (state / "trt_cache").mkdir(parents=True)
    for name in ("checkpoint.npz", "checkpoint.prev.npz", ".lock", ".checkpoint.npz.4242.tmp",
                 "trt_cache/TensorrtExecutionProvider_cache_sm80.engine", "trt_cache/timing.cache"):
        (state / name).write_bytes(b"edgefa's")
    assert is_edgefa_bundle_folder(tiny_bundle)
    (state / "my-calibration.json").write_text("{}\n")
    assert not is_edgefa_bundle_folder(tiny_bundle)
    with pytest.raises(BundleError, match=r"not an edgefa bundle \(state/my-calibration.json\)"):
        check_replaceable(tiny_bundle)


def test_export_over_a_bundle_with_a_user_file_in_state_keeps_it(tiny_run, tmp_path):
    """It was deleted, exit 0: state/ counted as edgefa's whatever it held."""
    out = tmp_path / "b"
    ok(cli_in_process("export", tiny_run, "--out", out))
    (out / "state").mkdir()
    (out / "state" / "my-calibration.json").write_text('{"gain": 0.7}\n')
    before = files(tmp_path)
    assert_one_error_line(cli_in_process("export", tiny_run, "--out", out),
                          "files edgefa did not write (state/my-calibration.json)", "--force")
    assert files(tmp_path) == before
    ok(cli_in_process("export", tiny_run, "--out", out, "--force"))
    (kept,) = set_aside(tmp_path, "b")
    assert (kept / "state" / "my-calibration.json").read_text() == '{"gain": 0.7}\n'
    assert not (out / "state").exists() and read_bundle(out)


def earlier_demo(out: Path, bundle: Path) -> Path:
    """What an earlier `edgefa demo --out OUT` left (its marker and bundles), made without running it."""
    out.mkdir(parents=True)
    (out / "demo_report.json").write_text("{}\n")
    for name in ("bundle", "device-bundle"):
        shutil.copytree(bundle, out / name)
    (out / "device-bundle" / "state").mkdir()
    (out / "device-bundle" / "state" / "checkpoint.npz").write_bytes(b"the demo's device state")
    return out


@pytest.mark.parametrize("user_file", ["device-bundle/state/mynote.txt", "bundle/notes.txt", "run/x.txt"])
def test_demo_refuses_a_user_file_in_a_folder_it_makes_before_any_work(tiny_bundle, tmp_path, user_file):
    out = earlier_demo(tmp_path / "demo-out", tiny_bundle)
    (out / user_file).parent.mkdir(parents=True, exist_ok=True)
    (out / user_file).write_text("mine\n")
    before = files(tmp_path)
    line = assert_one_error_line(cli_in_process("demo", "--out", out), str(out), "an edgefa demo folder whose",
                                 user_file.split("/")[0] + "/", "--force")
    assert ("files edgefa did not write" in line) == user_file.startswith(("bundle", "device-bundle")), line
    assert files(tmp_path) == before                          # refused before the pretraining: nothing written


def test_demo_over_an_earlier_demo_never_touches_files_it_did_not_write(tiny_bundle, tmp_path):
    """`edgefa demo` ran rmtree(OUT/device-store): a user's device-store/keep2.txt went with it."""
    out = earlier_demo(tmp_path / "demo-out", tiny_bundle)
    (out / "device-store").mkdir()
    (out / "device-store" / "keep2.txt").write_text("kept\n")
    (out / "my-notes.txt").write_text("kept too\n")
    ok(cli_in_process("demo", "--out", out, "--epochs", "1", "--steps", "4"))
    assert (out / "device-store" / "keep2.txt").read_text() == "kept\n"
    assert (out / "my-notes.txt").read_text() == "kept too\n"
    assert sorted(p.name for p in (out / "device-store").iterdir()) == ["keep2.txt"]   # the store lives elsewhere
    assert read_bundle(out / "device-bundle") and (out / "device-bundle" / "state" / "checkpoint.npz").is_file()
    assert not set_aside(tmp_path, "demo-out")
