"""Frozen trunk, cached features (runtime/feature_cache.py): a small CNN exported with its conv
stages as the frozen trunk (`--trainable last:2`: fc and head train), fine-tuned on real
onnxruntime sessions with and without the cache.

A cached run gives the weights of an uncached run bit for bit, in memory and in a file; the file
is reused by the next session and never by another bundle or other data; a crash at any I/O point
of filling it leaves no half cache in use; over the link the device caches what the host names.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch

from edgefa import storage
from edgefa.bundle import foreign_files, is_state_file, pack_archive, read_bundle
from edgefa.device_profiles import load_profile
from edgefa.device_profiles.budget import budget, feature_cache_bytes, step_cost
from edgefa.errors import DataError
from edgefa.exporters.export import export_bundle
from edgefa.models import CNN, NetConfig
from edgefa.profiling.profiler import Profiler
from edgefa.runtime.engine import OrtEngine
from edgefa.runtime.feature_cache import FeatureCache, cache_path, data_fingerprint
from edgefa.runtime.finetune import FinetuneConfig, Finetuner, bundle_standardizer
from edgefa.shared.datasets import Dataset, Standardizer
from edgefa.training.trainer import Run, TrainConfig, make_optimizer

N, BATCH, STEPS, LR = 96, 16, 20, 0.05       # 6 whole steps an epoch: every epoch meets every sample


@pytest.fixture(scope="module")
def cnn_bundle(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = CNN(NetConfig("cnn", [1, 8, 8], 10, rule="dfa", width=4, depth=2))
    run = Run(model, make_optimizer(model, LR, 0.9), TrainConfig(method="dfa", model="cnn", lr=LR, momentum=0.9),
              Standardizer(0.5, 2.0), {"final_test_accuracy": None})
    return export_bundle(run, tmp_path_factory.mktemp("bundles") / "cnn", trainable="last:2")


@pytest.fixture
def bundle(cnn_bundle, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(cnn_bundle, dst)
    return dst


def data(seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset(rng.normal(0.5, 2.0, (N, 64)).astype(np.float32), rng.integers(0, 10, N), 10, f"data{seed}")


def finetune(path: Path, steps: int = STEPS, ds: Dataset | None = None, **config) -> tuple[dict, dict, Profiler]:
    """Fine-tune the bundle at `path` to `steps`; (its weights and momentum, the report, the profiler)."""
    profiler = Profiler(warmup=0)
    tuner = Finetuner(read_bundle(path), ds or data(), FinetuneConfig(steps=steps, batch_size=BATCH, lr=LR,
                                                                      threads=1, **config), profiler=profiler)
    try:
        result = tuner.run()
        return tuner.engine.state(), result, profiler
    finally:
        tuner.state_lock.release()


def windows(profiler: Profiler) -> dict[str, int]:
    return {name: phase["count"] for name, phase in profiler.summary(include_samples=False)["phases"].items()}


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), f"{name}: max |diff| {np.abs(a[name] - b[name]).max()}"


def cache_files(path: Path) -> list[str]:
    return sorted(p.name for p in (path / "state").glob("*features-*"))


@pytest.fixture
def uncached(cnn_bundle, tmp_path) -> dict:
    """The reference: the same steps with the cache off (every step runs train_step.onnx)."""
    dst = tmp_path / "uncached"
    shutil.copytree(cnn_bundle, dst)
    state, result, profiler = finetune(dst, feature_cache=False)
    assert result["feature_cache"] is None and "trunk_features" not in windows(profiler)
    return state


# --- the same weights, bit for bit ----------------------------------------------------------------

@pytest.mark.parametrize("where, cache_bytes", [("memory", 1 << 20), ("file", 0)])
def test_a_cached_run_gives_the_weights_of_an_uncached_run(bundle, uncached, where, cache_bytes):
    state, result, profiler = finetune(bundle, cache_bytes=cache_bytes)
    assert_same(state, uncached)
    assert result["feature_cache"]["where"] == where and result["feature_cache"]["filled"] == N
    seen = windows(profiler)
    # every step ran the head step alone; the trunk ran in the first epoch's 6 steps, never again
    assert seen["head_step"] == seen["train_step"] == STEPS and seen["trunk_features"] == 6
    assert (cache_files(bundle) != []) == (where == "file")


def test_the_memory_budget_falls_back_to_a_file_at_its_edge(bundle):
    engine = OrtEngine(read_bundle(bundle), threads=1)
    size = feature_cache_bytes(N, engine.bundle.model["trunk"]["features"])
    fingerprint = data_fingerprint(data().X)
    fits = FeatureCache(engine, fingerprint, N, budget_bytes=size)
    spills = FeatureCache(engine, fingerprint, N, budget_bytes=size - 1)
    assert (fits.where, spills.where) == ("memory", "file")
    assert isinstance(spills.features, np.memmap) and not isinstance(fits.features, np.memmap)
    spills.close()
    assert cache_files(bundle) == []            # a file that never filled goes with its cache


# --- the file: edgefa's, reused, invalidated --------------------------------------------------------

def test_the_file_is_reused_by_the_next_session_and_is_edgefa_s(bundle, uncached):
    half, _, _ = finetune(bundle, steps=10, cache_bytes=0)
    (name,) = cache_files(bundle)
    assert name == cache_path(read_bundle(bundle), data_fingerprint(data().X)).name
    # the --out policy knows it as edgefa's; being a dot file it never travels in a packed bundle
    assert is_state_file(PurePosixPath(name)) and foreign_files(bundle) == []
    assert name not in pack_archive(bundle).decode("latin-1")
    state, result, profiler = finetune(bundle, steps=STEPS, cache_bytes=0)     # resumes at step 10
    assert result["resumed_from_step"] == 10 and result["feature_cache"]["where"] == "file (reused)"
    assert "trunk_features" not in windows(profiler)
    assert_same(state, uncached)


def test_a_new_bundle_or_new_data_never_reads_an_old_cache(bundle, tmp_path):
    finetune(bundle, steps=6, cache_bytes=0)
    (first,) = cache_files(bundle)
    # other data: another file beside it; a third data set pushes the oldest out (at most two)
    finetune(bundle, steps=12, ds=data(1), cache_bytes=0)
    assert len(cache_files(bundle)) == 2 and first in cache_files(bundle)
    finetune(bundle, steps=18, ds=data(2), cache_bytes=0)
    assert len(cache_files(bundle)) == 2 and first not in cache_files(bundle)

    # another bundle (another manifest: another lr) with the old bundle's cache in its state/
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    shutil.rmtree(other / "state")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["optimizer"]["lr"] = 0.01
    (other / "manifest.json").write_text(json.dumps(manifest))
    (other / "state").mkdir()
    for name in cache_files(bundle):
        shutil.copy(bundle / "state" / name, other / "state" / name)
    _, result, profiler = finetune(other, steps=6, cache_bytes=0)
    assert result["feature_cache"]["where"] == "file" and windows(profiler)["trunk_features"] == 6
    assert cache_files(other) == [Path(result["feature_cache"]["file"]).name]   # the old bundle's: removed


def test_a_damaged_file_is_filled_again(bundle, uncached):
    finetune(bundle, steps=6, cache_bytes=0)
    (name,) = cache_files(bundle)
    path = bundle / "state" / name
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0x01                            # one bit of one feature
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="damaged trunk feature cache removed"):
        state, result, _ = finetune(bundle, steps=STEPS, cache_bytes=0)
    assert result["feature_cache"]["where"] == "file"
    assert_same(state, uncached)


# --- a crash mid-write ------------------------------------------------------------------------------

def fill(engine: OrtEngine, x: np.ndarray, fingerprint: str) -> FeatureCache:
    cache = FeatureCache(engine, fingerprint, N, budget_bytes=0)
    for start in range(0, N, BATCH):
        idx = np.arange(start, min(start + BATCH, N))
        cache.rows(idx, x[idx])
    return cache


def test_a_crash_at_any_point_of_filling_leaves_no_half_cache_in_use(bundle):
    b = read_bundle(bundle)
    engine = OrtEngine(b, threads=1)
    x = bundle_standardizer(b).apply(data().X)
    expected = engine.features(x)
    fingerprint = data_fingerprint(data().X)
    (bundle / "state").mkdir()
    with storage.faults() as plan:
        fill(engine, x, fingerprint).close()
    ops = [op for op, _ in plan.ops]
    assert ops == ["write", "fsync", "rename", "fsync_dir"], plan.ops
    for n in range(1, len(ops) + 1):
        for name in cache_files(bundle):
            (bundle / "state" / name).unlink()
        with storage.faults(crash_at=n), pytest.raises(storage.InjectedCrash):
            fill(engine, x, fingerprint)        # the process "dies" here: nothing closes its cache
        cache = FeatureCache(engine, fingerprint, N, budget_bytes=0)     # the next start
        # before the rename nothing is the cache; after it, the whole cache (fsynced first)
        assert cache.where == ("file (reused)" if n > ops.index("rename") + 1 else "file"), n
        if cache.where == "file":
            assert len(cache_files(bundle)) == 1          # its own temporary file; the dead run's is gone
            for start in range(0, N, BATCH):
                idx = np.arange(start, min(start + BATCH, N))
                cache.rows(idx, x[idx])
        assert np.array_equal(cache.rows(np.arange(N), x), expected), n
        cache.close()
        assert len(cache_files(bundle)) == 1 and not cache_files(bundle)[0].endswith(".tmp")


@pytest.mark.parametrize("full_from", [1, 2])
def test_a_full_disk_costs_the_speed_up_never_the_run(bundle, uncached, full_from):
    # from the first write (the file cannot be made: no cache) or from its fsync (not saved)
    (bundle / "state").mkdir()
    with storage.faults(disk_full_from=full_from), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        profiler = Profiler(warmup=0)
        tuner = Finetuner(read_bundle(bundle), data(), FinetuneConfig(steps=STEPS, batch_size=BATCH, lr=LR,
                                                                      threads=1, cache_bytes=0,
                                                                      checkpoint_every=10 ** 6), profiler=profiler)
        for step in range(STEPS):
            tuner.train_step(step)
    tuner.state_lock.release()
    text = " ".join(str(w.message) for w in caught)
    assert ("feature cache off" if full_from == 1 else "feature cache not saved") in text, text
    assert_same(tuner.engine.state(), uncached)
    if tuner.cache is not None:
        tuner.cache.close()
    assert cache_files(bundle) == []


# --- budget and profile account for it --------------------------------------------------------------

def test_budget_counts_the_cache_and_the_trunk_once_per_sample(bundle):
    manifest = read_bundle(bundle).manifest
    trunk = manifest["model"]["trunk"]
    assert trunk["flops_per_sample"] > 0 and trunk["activations_per_sample"] > 0
    profile = load_profile("jetson-orin-nano-8gb")
    on = budget(manifest, profile, BATCH, "CPUExecutionProvider", samples=N)
    off = budget(manifest, profile, BATCH, "CPUExecutionProvider", samples=N, feature_cache_budget=None)
    spill = budget(manifest, profile, BATCH, "CPUExecutionProvider", samples=N, feature_cache_budget=0)
    size = feature_cache_bytes(N, trunk["features"])
    assert on.memory["feature cache"] == size and on.peak_bytes == off.peak_bytes + size
    assert spill.memory["feature cache"] == 0 and spill.feature_cache["where"] == "file in state/"
    assert "feature cache" not in off.memory and off.feature_cache is None
    # the step bound: the part's step on features with the cache, trunk included without it
    whole, head = (step_cost(manifest["model"], BATCH, 0.9, on_features=f).flops for f in (False, True))
    assert whole - head == BATCH * trunk["flops_per_sample"]
    assert (on.cost.flops, off.cost.flops) == (head, whole)
    assert on.feature_cache["trunk_flops_per_sample"] == trunk["flops_per_sample"]
    assert any("runs once per sample" in note for note in on.notes)


# --- over the link ------------------------------------------------------------------------------------

def test_over_the_link_the_device_caches_what_the_host_names(bundle, uncached, tmp_path):
    from edgefa.link.client import DeviceClient
    from test_link_live import device_server

    ds = data()
    with device_server(tmp_path / "store", listen="127.0.0.1:0", extra=("--cache-mb", "0")) as srv:
        with DeviceClient(srv.url) as dev:
            dev.deploy(bundle)
            assert dev.status()["caches_features"]
            dev.finetune(ds.X, ds.y, STEPS, BATCH, 0, lr=LR)
            state = dev.get_state()
            phases = dev.profile(samples=False)["phases"]
    state.pop("step")
    assert_same(state, uncached)
    seen = {name: phases[name]["count"] + phases[name]["warmup"] for name in ("head_step", "trunk_features")}
    assert seen == {"head_step": STEPS, "trunk_features": 6}
    # the device's cache went to a file in its bundle's state/ (--cache-mb 0), filled whole
    assert len(cache_files(tmp_path / "store" / "bundle")) == 1


def test_rows_that_do_not_match_the_cached_samples_are_refused(bundle, tmp_path):
    from edgefa.link.service import DeviceService, ServiceConfig
    from test_store_faults import call, deploy

    service = DeviceService(ServiceConfig(tmp_path / "store"))
    try:
        assert deploy(service, bundle)["ok"]
        ds = data()
        named = {"data": data_fingerprint(ds.X), "samples": N}
        idx = np.arange(BATCH)
        assert call(service, "train", {"x": ds.X[idx], "y": ds.y[idx], "ids": idx}, step=0, **named)["ok"]
        # the same ids with other samples: refused before anything is applied
        reply = call(service, "train", {"x": ds.X[idx + BATCH], "y": ds.y[idx], "ids": idx}, step=1, **named)
        assert (reply["ok"], reply["code"]) == (False, "bad_data") and "do not match" in reply["error"]
        assert service.step == 1
        reply = call(service, "train", {"x": ds.X[idx], "y": ds.y[idx], "ids": idx}, step=1, data="nothex")
        assert (reply["ok"], reply["code"]) == (False, "bad_request")
        with pytest.raises(DataError, match=f"integers in 0..{N - 1}"):
            service._cache.rows(np.array([N]), ds.X[:1])
    finally:
        service.close()


# --- the command line ---------------------------------------------------------------------------------

def test_device_finetune_turns_the_cache_off_or_into_a_file(bundle, tmp_path):
    from conftest import cli_in_process
    from edgefa.shared.datasets import save_npz

    save_npz(tmp_path / "data.npz", data())
    reports = {}
    for name, flags in (("file", ["--cache-mb", "0"]), ("off", ["--no-feature-cache"])):
        proc = cli_in_process("device", "finetune", bundle, "--data", tmp_path / "data.npz", "--steps", 6,
                              "--batch-size", BATCH, "--report", tmp_path / f"{name}.json", *flags)
        assert proc.returncode == 0, proc.stderr
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())["feature_cache"]
    assert reports["file"]["where"] == "file" and reports["file"]["filled"] == N
    assert reports["off"] is None
