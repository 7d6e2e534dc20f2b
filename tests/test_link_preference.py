"""Preference (Bradley-Terry) bundles over the link and the fleet: a real `edgefa device serve`
process (torch made unimportable there) trains a scorer on pairs sent by the host.

Over the link the device must end with the weights, bit for bit, of one local `edgefa device
finetune` run of the same bundle, pairs, steps, batch size, seed and lr; held-out preference
accuracy must rise; the divergence rule stops a runaway pairs run as it stops a labelled one; and
bad pairs are one line before a byte of them is sent.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_one_error_line, run_edgefa
from edgefa.errors import DataError
from edgefa.exporters.export import export_bundle
from edgefa.link.client import ClientConfig, DeviceClient, DeviceError
from edgefa.models import MLP, MLPConfig
from edgefa.runtime.divergence import DIVERGED, Diverged
from edgefa.shared.datasets import Standardizer
from edgefa.shared.preference_pairs import synthetic_pairs
from edgefa.training.trainer import Run, TrainConfig, make_optimizer
from test_fleet import write_inventory
from test_link_live import assert_same_state, device_servers, fast_timing, load_checkpoint

DIM, STEPS, BATCH, SEED, LR = 16, 150, 32, 3, "0.02"


def dfa_run(outputs: int, loss: str) -> Run:
    """An untrained DFA MLP on DIM features (the device trains it); one output for a scorer."""
    torch.manual_seed(0)
    model = MLP(MLPConfig(DIM, [32, 16], outputs, "relu", "dfa", feedback_seed=7))
    return Run(model, make_optimizer(model, 0.05, 0.9),
               TrainConfig(method="dfa", hidden=[32, 16], lr=0.05, momentum=0.9, loss=loss),
               Standardizer(0.1, 1.5), {"final_test_accuracy": None})


def save_pairs(path: Path, pairs) -> Path:
    with open(path, "wb") as f:
        np.savez(f, chosen=pairs.chosen, rejected=pairs.rejected)
    return path


@pytest.fixture(scope="module")
def scorer(tmp_path_factory) -> dict:
    """A DFA MLP scorer exported as a bradley-terry bundle, train and held-out pair files, and the
    reference: a local `edgefa device finetune` of a copy of the bundle."""
    root = tmp_path_factory.mktemp("preference-link")
    bundle = export_bundle(dfa_run(1, "bradley-terry"), root / "bundle")
    train = save_pairs(root / "train.npz", synthetic_pairs(400, DIM, sigma=0.0, seed=1))
    test = save_pairs(root / "test.npz", synthetic_pairs(200, DIM, sigma=0.0, seed=9))
    local = root / "local"
    shutil.copytree(bundle, local)
    proc = run_edgefa("device", "finetune", local, "--data", train, "--steps", STEPS, "--batch-size", BATCH,
                      "--seed", SEED, "--lr", LR, without_torch=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"bundle": bundle, "train": train, "test": test,
            "reference": load_checkpoint(local / "state" / "checkpoint.npz")}


def test_pairs_over_the_link_train_as_a_local_run_and_a_fleet_of_two_does_the_same(scorer, tmp_path):
    stores = [{"store": tmp_path / f"device{i}", "listen": "127.0.0.1:0"} for i in range(3)]
    with device_servers(*stores) as (single, fleet0, fleet1):
        for srv in (single, fleet0, fleet1):
            with DeviceClient(srv.url, ClientConfig(timing=fast_timing())) as dev:
                assert dev.deploy(scorer["bundle"])["loss"] == "bradley-terry"
        # `edgefa finetune --device` on one device and `edgefa fleet finetune` on two, at once
        report, inventory = tmp_path / "report.json", write_inventory(tmp_path / "devices.toml",
                                                                      [fleet0.url, fleet1.url])
        same = ("--data", scorer["train"], "--eval", scorer["test"], "--steps", STEPS, "--batch-size", BATCH,
                "--seed", SEED, "--lr", LR)
        with ThreadPoolExecutor(max_workers=2) as pool:
            tune, fleet = pool.map(lambda args: run_edgefa(*args, without_torch=True), [
                ("finetune", "--device", single.url, *same, "--report", report),
                ("fleet", "finetune", "--inventory", inventory, *same)])
        assert tune.returncode == 0, tune.stdout + tune.stderr
        assert "preference accuracy" in tune.stdout, tune.stdout
        r = json.loads(report.read_text())
        assert r["metric"] == "preference accuracy" and r["final_step"] == STEPS and r["refused_steps"] == []
        assert r["accuracy_after"] > r["accuracy_before"] + 0.1, r
        print(f"link: preference accuracy {r['accuracy_before']:.3f} -> {r['accuracy_after']:.3f}, "
              f"device step median {r['step_ms_median']:.3f} ms, round trip {r['round_trip_ms_median']:.3f} ms")

        assert fleet.returncode == 0, fleet.stdout + fleet.stderr
        # (the column's title, "preference accuracy", wraps in a narrow table)
        assert "fleet fine-tuning (DFA, preference pairs)" in fleet.stdout, fleet.stdout
        assert fleet.stdout.count(f"0 -> {STEPS}") == 2, fleet.stdout
        before, after = f"{100 * r['accuracy_before']:.1f}%", f"{100 * r['accuracy_after']:.1f}%"
        assert fleet.stdout.count(f"{before} -> {after}") == 2, (before, after, fleet.stdout)

        # the same pairs, batches and lr: every device holds the local run's weights, bit for bit
        for srv in (single, fleet0, fleet1):
            with DeviceClient(srv.url, ClientConfig(timing=fast_timing())) as dev:
                assert_same_state(dev.get_state(), scorer["reference"])


def test_a_runaway_pairs_run_stops_and_the_device_rolls_back(scorer, tmp_path):
    pairs = synthetic_pairs(400, DIM, sigma=0.0, seed=1)
    with device_servers({"store": tmp_path / "store", "listen": "127.0.0.1:0"}) as (srv,):
        with DeviceClient(srv.url, ClientConfig(timing=fast_timing())) as dev:
            dev.deploy(scorer["bundle"])
            assert dev.finetune_pairs(pairs.chosen, pairs.rejected, 20, 16)["final_step"] == 20
            good = dev.get_state()
            with pytest.raises(Diverged, match="diverged at step") as stop:
                dev.finetune_pairs(pairs.chosen, pairs.rejected, 200, 16, lr=1e6)
            result = stop.value.result
            # step 20's update ran away; step 21's loss says so: back to the checkpoint at step 20
            assert (result["stopped"]["reason"], result["stopped"]["at_step"], result["final_step"],
                    result["rolled_back_steps"]) == (DIVERGED, 21, 20, 1), result["stopped"]
            status = dev.status()
            assert (status["step"], status["checkpointed_step"]) == (20, 20)
            state = dev.get_state()
            for name, value in good.items():
                np.testing.assert_array_equal(state[name], value)


def test_bad_pairs_are_one_line_before_anything_is_sent(scorer, tmp_path):
    classifier = export_bundle(dfa_run(3, "cross_entropy"), tmp_path / "classifier")
    samples = tmp_path / "samples.npz"
    np.savez(samples, X=np.random.default_rng(0).standard_normal((64, DIM)).astype(np.float32),
             y=np.arange(64) % 3)
    pairs = synthetic_pairs(64, DIM, seed=2)
    wide = save_pairs(tmp_path / "wide.npz", synthetic_pairs(64, DIM + 1, seed=2))
    nan_chosen = pairs.chosen.copy()
    nan_chosen[5, 3] = np.nan
    with open(tmp_path / "nan.npz", "wb") as f:
        np.savez(f, chosen=nan_chosen, rejected=pairs.rejected)
    with device_servers({"store": tmp_path / "pref", "listen": "127.0.0.1:0"},
                        {"store": tmp_path / "labels", "listen": "127.0.0.1:0"}) as (pref, labels):
        with DeviceClient(pref.url, ClientConfig(timing=fast_timing())) as dev:
            dev.deploy(scorer["bundle"])
            dev.profile(clear=True)
        with DeviceClient(labels.url, ClientConfig(timing=fast_timing())) as dev:
            dev.deploy(classifier)
        inventory = write_inventory(tmp_path / "devices.toml", [pref.url])
        cases = [(("finetune", "--device", pref.url, "--data", wide, "--steps", 5), ("wide.npz", "the bundle expects 16")),
                 (("finetune", "--device", pref.url, "--data", tmp_path / "nan.npz", "--steps", 5),
                  ("nan.npz", "'chosen' holds non-finite values")),
                 (("finetune", "--device", pref.url, "--data", scorer["train"], "--eval", wide, "--steps", 5),
                  ("the bundle expects 16",)),
                 (("finetune", "--device", pref.url, "--data", samples, "--steps", 5),
                  ("trains on preference pairs", "not on labelled samples")),
                 (("finetune", "--device", labels.url, "--data", scorer["train"], "--steps", 5),
                  ("trains on labelled samples", "not on preference pairs")),
                 (("fleet", "finetune", "--inventory", inventory, "--data", wide, "--steps", 5),
                  ("1 of 1 devices failed", "the bundle expects 16"))]
        with ThreadPoolExecutor(max_workers=3) as pool:
            procs = list(pool.map(lambda case: run_edgefa(*case[0], without_torch=True), cases))
        for (args, fragments), proc in zip(cases, procs):
            if args[0] == "fleet":        # the fleet's table and bars come first, then its one line
                assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
                (line,) = [l for l in proc.stderr.splitlines() if l.startswith("edgefa: error:")]
                assert all(f in line for f in fragments), line
            else:
                assert_one_error_line(proc, *fragments)

        with DeviceClient(pref.url, ClientConfig(timing=fast_timing())) as dev:
            with pytest.raises(DataError, match="'rejected' holds non-finite"):
                dev.finetune_pairs(pairs.chosen, np.where(pairs.rejected > 2, np.inf, pairs.rejected), 5)
            with pytest.raises(DataError, match="items have 15 features"):
                dev.evaluate_pairs(pairs.chosen[:, :15], pairs.rejected[:, :15])
            status, phases = dev.status(), dev.profile()["phases"]
            assert (status["step"], status["refused_steps"]) == (0, 0)
            assert not {"batch", "train_step", "forward"} & set(phases), sorted(phases)   # no pair was sent
            # the device checks for itself what a host sends (a host that skipped the checks)
            bad = pairs.chosen[:8].copy()
            bad[0, 0] = np.nan
            for chosen, rejected in ((bad, pairs.rejected[:8]), (pairs.chosen[:8, :15], pairs.rejected[:8, :15])):
                with pytest.raises(DeviceError) as refused:
                    dev.call("train", {"chosen": chosen, "rejected": rejected}, step=0)
                assert refused.value.code == "bad_data", refused.value
            with pytest.raises(DeviceError, match="send 'chosen' and 'rejected'"):
                dev.call("train", {"x": pairs.chosen[:8], "y": np.zeros(8, np.int64)}, step=0)
            assert dev.status()["step"] == 0
