"""A device store that cannot be bricked: a deploy is unpacked, verified and loaded beside the
current bundle and only then swapped in; a crash at every I/O point of a deploy (and a full disk
from every point) leaves a store that the next start serves, with the old bundle or the new one;
what a start cannot load is quarantined, never deleted, and the last good bundle serves.

The deploy runs through DeviceService.handle (the server's own entry point) under the documented
fault seam edgefa.storage.faults; the issue's case runs against a real `edgefa device serve`."""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_error_line, run_edgefa
from edgefa import storage
from edgefa.bundle import pack_archive, sha256_file
from edgefa.shared.datasets import load_npz
from edgefa.link.client import ClientConfig, DeviceClient
from edgefa.link.messages import decode, encode
from edgefa.link.service import DeviceService, ServiceConfig
from test_link_live import device_server, fast_timing

BATCH = 16


# --- bundles: another good one, and the issue's broken one --------------------------------------

def variant(src: Path, dst: Path, lr: float) -> Path:
    """The same bundle with another learning rate in its manifest: another archive, another sha."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["optimizer"]["lr"] = lr
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst


def truncated_train_step(src: Path, dst: Path) -> Path:
    """The issue's case: train_step.onnx cut in half and the manifest re-hashed, so every hash
    matches and only loading the graph can tell."""
    shutil.copytree(src, dst)
    graph = dst / "train_step.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["files"]["train_step.onnx"] = {"sha256": sha256_file(graph), "bytes": graph.stat().st_size}
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst


def archive_sha(bundle: Path) -> str:
    return hashlib.sha256(pack_archive(bundle)).hexdigest()


# --- driving a service in this process -----------------------------------------------------------

def call(service: DeviceService, op: str, arrays=None, **fields):
    return decode(service.handle(encode({"op": op, **fields}, arrays)))


def upload(service: DeviceService, bundle: Path) -> str:
    """upload_begin and one chunk: everything of a deploy but its upload_end."""
    archive = pack_archive(bundle)
    sha = hashlib.sha256(archive).hexdigest()
    assert call(service, "upload_begin", sha256=sha, size=len(archive))["ok"]
    assert call(service, "upload_chunk", {"blob": np.frombuffer(archive, np.uint8)}, sha256=sha, offset=0)["ok"]
    return sha


def deploy(service: DeviceService, bundle: Path):
    return call(service, "upload_end", sha256=upload(service, bundle))


def train(service: DeviceService, data, steps: int) -> None:
    for _ in range(steps):
        idx = np.arange(service.step * BATCH, (service.step + 1) * BATCH) % len(data.y)
        reply = call(service, "train", {"x": data.X[idx].astype(np.float32), "y": data.y[idx].astype(np.int64)},
                     step=service.step)
        assert reply["ok"], reply


def open_service(store: Path, log: list[str] | None = None) -> DeviceService:
    return DeviceService(ServiceConfig(store, checkpoint_every=0, threads=1),
                         log=(log if log is not None else []).append)


def tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def world(tiny_bundle_master, digits_npz, tmp_path_factory):
    """A store that has seen two deploys (the first bundle is its bundle.prev), whose bundle A has
    trained 7 steps (checkpoint at 5), with bundle B fully uploaded and not yet deployed."""
    root = tmp_path_factory.mktemp("store-faults")
    a, b = tiny_bundle_master, variant(tiny_bundle_master, root / "b", lr=0.5)
    first = variant(tiny_bundle_master, root / "first", lr=0.25)
    data = load_npz(digits_npz)
    template = root / "template"
    service = open_service(template)
    for bundle in (first, a):
        assert deploy(service, bundle)["ok"]
    train(service, data, 5)
    service.checkpoint()
    train(service, data, 2)
    sha_b = upload(service, b)
    states = {5: None, 7: service.engine.state()}
    service.close()
    with_checkpoint = open_service(template)            # the state on disk: step 5
    states[5] = with_checkpoint.engine.state()
    with_checkpoint.close()
    return {"template": template, "a": a, "b": b, "sha_a": archive_sha(a), "sha_b": sha_b, "data": data,
            "states": states, "root": root}


def fresh_store(world, tmp_path) -> tuple[Path, DeviceService]:
    """A copy of the template store, served and trained to step 7 (2 steps not checkpointed)."""
    store = tmp_path / "store"
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(world["template"], store)
    service = open_service(store)
    assert (service.archive_sha, service.step) == (world["sha_a"], 5)
    train(service, world["data"], 2)
    return store, service


def assert_serves(service: DeviceService, world) -> str:
    """The service serves A with one of its own states, or B fresh; either way it trains."""
    if service.archive_sha == world["sha_a"]:
        assert service.step in (5, 7)
        expected = world["states"][service.step]
        got = service.engine.state()
        assert all(got[k].tobytes() == expected[k].tobytes() for k in expected)
        outcome = "old"
    else:
        assert (service.archive_sha, service.step) == (world["sha_b"], 0)
        outcome = "new"
    step = service.step
    train(service, world["data"], 1)
    assert service.step == step + 1
    return outcome


def assert_clean(store: Path) -> None:
    """Nothing half-done left: no staging or trash folder, no quarantined bundle."""
    assert not (store / "incoming" / "unpacked").exists() and not (store / "incoming" / "trash").exists()
    assert not (store / "quarantine").exists()


# --- a deploy: the issue's broken bundle, in process ---------------------------------------------

def test_a_bundle_that_passes_its_hashes_but_does_not_load_is_refused_and_the_old_one_serves(world, tmp_path):
    store, service = fresh_store(world, tmp_path)
    broken = truncated_train_step(world["a"], tmp_path / "broken")
    on_disk = tree(store / "bundle")
    reply = deploy(service, broken)
    assert reply["ok"] is False and reply["code"] == "bad_bundle"
    assert "\n" not in reply["error"] and "train_step.onnx" in reply["error"]
    assert f"keeps serving bundle {world['sha_a'][:16]}… at step 7" in reply["error"]
    assert tree(store / "bundle") == on_disk                  # its files and its checkpoint untouched
    assert list((store / "incoming").iterdir()) == []          # the broken upload is gone, nothing staged
    assert assert_serves(service, world) == "old" and service.step == 8


# --- a crash at every I/O point of a deploy; a full disk from every point -------------------------

def test_a_crash_at_every_io_point_of_a_deploy_leaves_a_store_that_starts_with_the_old_or_the_new(world, tmp_path):
    store, service = fresh_store(world, tmp_path)
    with storage.faults() as plan:                             # count the deploy's I/O points
        assert call(service, "upload_end", sha256=world["sha_b"])["ok"]
    count = len(plan.ops)
    kinds = {op for op, _ in plan.ops}
    assert {"write", "fsync", "rename", "fsync_dir", "remove", "mkdir"} <= kinds and count >= 25
    service.close()

    outcomes = []
    for n in range(1, count + 1):
        store, service = fresh_store(world, tmp_path)
        with storage.faults(crash_at=n), pytest.raises(storage.InjectedCrash):
            service.handle(encode({"op": "upload_end", "sha256": world["sha_b"]}))
        service.close()                                        # the process is gone: its locks go with it
        log = []
        restarted = open_service(store, log)
        outcomes.append(assert_serves(restarted, world))
        assert_clean(store)
        # silent, but for a crash between the two renames of the old bundle's last checkpoint
        assert all("missing (a save was interrupted); resumed from checkpoint.prev.npz" in line
                   for line in log) and len(log) <= 1, (n, log)
        restarted.close()
    # crashes before the swap's second rename start with A, from it on with B
    flip = outcomes.index("new")
    assert outcomes == ["old"] * flip + ["new"] * (count - flip) and 0 < flip < count


def test_a_full_disk_at_every_io_point_of_a_deploy_keeps_the_old_bundle_serving(world, tmp_path):
    store, service = fresh_store(world, tmp_path)
    with storage.faults() as plan:
        assert call(service, "upload_end", sha256=world["sha_b"])["ok"]
    count = len(plan.ops)
    service.close()

    for n in range(1, count + 1):
        store, service = fresh_store(world, tmp_path)
        with storage.faults(disk_full_from=n) as faulty:
            reply = call(service, "upload_end", sha256=world["sha_b"])
        if not any(op in storage.WRITING_OPS for op, _ in faulty.ops[n - 1:]):
            assert reply["ok"], (n, reply)                     # nothing written from n on: it deploys
            service.close()
            continue
        assert reply["ok"] is False and reply["code"] == "store_failed", (n, reply)
        assert "\n" not in reply["error"] and "No space left" in reply["error"]
        assert "keeps serving bundle" in reply["error"]
        assert assert_serves(service, world) == "old"          # the running service, at once
        service.close()
        restarted = open_service(store)
        assert assert_serves(restarted, world) == "old"        # and after a restart
        assert_clean(store)
        restarted.close()


# --- a start quarantines what it cannot load ----------------------------------------------------

def test_a_start_quarantines_a_bundle_it_cannot_load_and_serves_the_previous_one(world, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(world["template"], store)
    shutil.rmtree(store / "bundle.prev")                       # (this test's own copy)
    shutil.move(store / "bundle", store / "bundle.prev")       # the store an older edgefa left behind:
    truncated_train_step(world["a"], store / "bundle")         # a broken bundle swapped in, A beside it
    log = []
    service = open_service(store, log)
    assert (service.archive_sha, service.step) == (world["sha_a"], 5)
    assert len(log) == 1 and "train_step.onnx" in log[0] and "moved it to" in log[0] and "previous" in log[0]
    [quarantined] = (store / "quarantine").iterdir()
    assert quarantined.name.startswith("bundle-") and (quarantined / "train_step.onnx").exists()
    service.close()

    # now nothing loads: the bundle is quarantined too, and the store serves nothing, saying so
    truncate = store / "bundle" / "weights.npz"
    truncate.write_bytes(truncate.read_bytes()[:100])
    log = []
    service = open_service(store, log)
    assert service.engine is None and call(service, "status")["bundle"] is None
    assert len(log) == 2 and "weights.npz" in log[0] and "serving with no bundle" in log[0]
    assert "no bundle to serve" in log[1]
    assert len(list((store / "quarantine").iterdir())) == 2
    service.close()


def test_a_crash_at_every_io_point_of_a_repairing_start_is_repaired_by_the_next_start(world, tmp_path):
    def damaged_store() -> Path:
        """A broken bundle swapped in by an older edgefa, A beside it, a deploy's staging left."""
        store = tmp_path / "store"
        shutil.rmtree(store, ignore_errors=True)
        shutil.copytree(world["template"], store)
        shutil.rmtree(store / "bundle.prev")
        shutil.move(store / "bundle", store / "bundle.prev")
        truncated_train_step(world["a"], store / "bundle")
        (store / "incoming" / "unpacked").mkdir()
        (store / "incoming" / "unpacked" / "weights.npz").write_bytes(b"half")
        return store

    with storage.faults() as plan:
        open_service(damaged_store()).close()
    count = len(plan.ops)
    ops = [op for op, _ in plan.ops]
    assert ops[0] == "remove_tree" and ops.count("rename") == 2     # staging; quarantined, bundle.prev back

    for n in range(1, count + 1):
        store = damaged_store()
        with storage.faults(crash_at=n), pytest.raises(storage.InjectedCrash):
            open_service(store)
        gc.collect()                                           # the dead service's locks go with it
        service = open_service(store)
        assert (service.archive_sha, service.step) == (world["sha_a"], 5), n
        [quarantined] = (store / "quarantine").iterdir()       # the broken bundle: moved once, never lost
        assert (quarantined / "train_step.onnx").stat().st_size < (world["a"] / "train_step.onnx").stat().st_size
        assert not (store / "incoming" / "unpacked").exists()
        service.close()


@pytest.mark.parametrize("names", [("checkpoint.npz",), ("checkpoint.npz", "checkpoint.prev.npz")],
                         ids=["the only one truncated", "both truncated"])
def test_a_start_with_no_usable_checkpoint_quarantines_it_and_serves_the_bundle(world, tmp_path, names):
    store = tmp_path / "store"
    shutil.copytree(world["template"], store)
    state = store / "bundle" / "state"
    assert not (state / "checkpoint.prev.npz").exists()
    torn = (state / "checkpoint.npz").read_bytes()[:300]
    for name in names:
        (state / name).write_bytes(torn)
    log = []
    service = open_service(store, log)
    assert (service.archive_sha, service.step) == (world["sha_a"], 0)
    assert len(log) == 1 and "serving the bundle from its own weights" in log[0]
    # the line says what was done (moved to quarantine), not the advice to move them (issue 17 B.5)
    assert "move" not in log[0].replace("moved", "") and f"; moved {names[0]}-" in log[0]
    assert ("previous one is unusable too" in log[0]) == (len(names) == 2)
    assert sorted(p.name.split("-")[0] for p in (store / "quarantine").iterdir()) == list(names)
    assert train(service, world["data"], 1) is None and service.step == 1
    service.close()


# --- the issue's case end to end: a real server, the CLI, a restart -------------------------------

def test_issue_case_a_truncated_graph_deploy_fails_in_one_line_and_a_restarted_server_serves_the_old(
        world, tmp_path):
    store, broken = tmp_path / "store", truncated_train_step(world["a"], tmp_path / "broken")
    data = world["data"]
    with device_server(store, listen="127.0.0.1:0") as srv:
        with DeviceClient(srv.url, ClientConfig(timing=fast_timing())) as dev:
            good = dev.deploy(world["a"])
            dev.finetune(data.X, data.y, 6, BATCH, 0)
            dev.call("checkpoint")
        checkpoint = (store / "bundle" / "state" / "checkpoint.npz").read_bytes()

        proc = run_edgefa("deploy", broken, "--device", srv.url, without_torch=True)
        assert_one_error_line(proc, "train_step.onnx", "keeps serving bundle", good["sha256"][:16])

        with DeviceClient(srv.url, ClientConfig(timing=fast_timing())) as dev:
            status = dev.status()
            assert (status["bundle"], status["step"]) == (good["sha256"], 6)
        assert (store / "bundle" / "state" / "checkpoint.npz").read_bytes() == checkpoint
        srv.kill()                                             # SIGKILL: no last checkpoint, no cleanup

    with device_server(store, listen="127.0.0.1:0") as srv:
        with DeviceClient(srv.url, ClientConfig(timing=fast_timing())) as dev:
            status = dev.status()
            assert (status["bundle"], status["step"]) == (good["sha256"], 6)
            assert dev.train_step(6, data.X[:BATCH], data.y[:BATCH])["step"] == 7
        assert "Traceback" not in srv.stderr()
