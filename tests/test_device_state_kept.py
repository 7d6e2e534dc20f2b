"""The device's fine-tuning is never lost by a profile, a deploy or a restore (issue 17, follow-up A).

- `edgefa profile BUNDLE --device URL` runs its steps in a scratch session: the device's step and
  weights are bit-equal afterwards, another BUNDLE is refused in one line unless `--deploy`, and a
  server killed mid-profile restarts from the state it had before the profile.
- A deploy keeps the replaced bundle's state (bundle.prev), and the bundle.prev it pushes out goes
  to retired/ (bounded by `--keep-retired`) when it holds checkpoints; `device pull --kept` brings
  one back.
- A pulled bundle, deployed, resumes at its step; a state that does not load for its bundle is
  refused in one line.
- `finetune --steps N` on a device already at step >= N says so and does nothing.

Real `edgefa device serve` processes (torch unimportable there), the real CLI, and the service's
own request handler in this process where only its store is under test. Seeded and offline.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_error_line, run_edgefa
from edgefa import storage
from edgefa.link.client import ClientConfig, DeviceClient, DeviceError
from edgefa.link.messages import encode
from edgefa.link.service import DeviceService, ServiceConfig
from edgefa.shared.datasets import load_dataset
from test_link_live import device_server, fast_timing, load_checkpoint
from test_store_faults import call, deploy, train, upload, variant

BATCH, SEED = 16, 0


@pytest.fixture(scope="module")
def digits(digits_npz):
    return load_dataset(str(digits_npz))


def client(url: str) -> DeviceClient:
    return DeviceClient(url, ClientConfig(timing=fast_timing()))


def same_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    """Weights, momentum and step equal bit for bit (`get_state` dicts or checkpoint dicts)."""
    names = sorted(k for k in a if not k.startswith("feedback/") and k != "refused_steps")
    return names == sorted(k for k in b if not k.startswith("feedback/") and k != "refused_steps") and all(
        a[k].tobytes() == b[k].tobytes() and a[k].dtype == b[k].dtype for k in names)


def ok(proc):
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    return proc.stdout


# --- 1. profile --device changes nothing on the device ---------------------------------------------

def test_profile_over_the_link_leaves_the_device_step_and_weights_bit_equal(tmp_path, tiny_bundle, digits):
    other = variant(tiny_bundle, tmp_path / "other", lr=0.5)
    with device_server(tmp_path / "store", listen="127.0.0.1:0") as srv:
        with client(srv.url) as dev:
            dev.deploy(tiny_bundle)
            dev.finetune(digits.X, digits.y, 25, BATCH, SEED)            # checkpointed at 25
            for step in (25, 26, 27):                                    # and 3 steps not yet checkpointed
                dev.train_step(step, digits.X[:BATCH], digits.y[:BATCH])
            before, status = dev.get_state(), dev.status()
        assert (status["step"], status["checkpointed_step"]) == (28, 25)

        # 15 profile steps: more than --checkpoint-every (10), so the old code wrote noise to disk too
        proc = run_edgefa("profile", tiny_bundle, "--device", srv.url, "--steps", 15, "--batch", BATCH,
                          "--out", tmp_path / "prof", without_torch=True)
        out = ok(proc)
        assert "scratch session and were undone: the device is at step 28" in out, out
        with client(srv.url) as dev:
            after, status = dev.get_state(), dev.status()
        assert same_state(after, before) and int(after["step"]) == 28
        assert status["scratch"] is False
        # the session began by checkpointing the state it leaves alone: a restart resumes there
        assert status["checkpointed_step"] == 28
        assert same_state(load_checkpoint(tmp_path / "store" / "bundle" / "state" / "checkpoint.npz"), before)

        # another bundle: one line, nothing sent, nothing changed
        proc = run_edgefa("profile", other, "--device", srv.url, "--steps", 5, "--out", tmp_path / "prof2",
                          without_torch=True)
        assert_one_error_line(proc, "serves another bundle", "at step 28", "--deploy")
        assert not (tmp_path / "prof2").exists()
        with client(srv.url) as dev:
            assert same_state(dev.get_state(), before) and dev.status()["bundle"] == status["bundle"]
        assert srv.proc.poll() is None, srv.stderr()


def test_a_server_killed_mid_profile_restarts_from_the_state_before_it(tmp_path, tiny_bundle, digits):
    store, x, y = tmp_path / "store", digits.X[:BATCH], digits.y[:BATCH]
    with device_server(store, listen="127.0.0.1:0") as srv:
        with client(srv.url) as dev:
            dev.deploy(tiny_bundle)
            dev.finetune(digits.X, digits.y, 12, BATCH, SEED)
            for step in (12, 13, 14):
                dev.train_step(step, x, y)
            before = dev.get_state()
            session = dev.call("scratch_begin", scratch="t" * 16).fields
            assert session["step"] == 15 and session["scratch"]
            for step in range(15, 30):              # past --checkpoint-every: nothing may be written
                dev.train_step(step, x, y, scratch="t" * 16)
            assert dev.status(scratch="t" * 16)["step"] == 30
        srv.kill()
    with device_server(store, listen="127.0.0.1:0") as srv, client(srv.url) as dev:
        assert dev.status()["step"] == 15 and same_state(dev.get_state(), before)
        # the host still thinks its session runs: its next step is refused, not applied to the real state
        with pytest.raises(DeviceError) as refused:
            dev.train_step(15, x, y, scratch="t" * 16)
        assert refused.value.code == "no_scratch" and dev.status()["step"] == 15


def test_any_other_request_ends_a_scratch_session_first(tmp_path, tiny_bundle, digits):
    """A host that died mid-profile costs nothing: the next host's request puts the state back."""
    service = DeviceService(ServiceConfig(tmp_path / "store", checkpoint_every=2, threads=1), log=[].append)
    assert deploy(service, tiny_bundle)["ok"]
    train(service, digits, 3)
    before = service.engine.state()
    assert call(service, "scratch_begin", scratch="abcdefgh")["step"] == 3
    x, y = digits.X[:BATCH].astype(np.float32), digits.y[:BATCH].astype(np.int64)
    for step in range(3, 8):
        assert call(service, "train", {"x": x, "y": y}, step=step, scratch="abcdefgh")["ok"]
        service.after_reply()                    # the periodic checkpoint is suspended
    assert call(service, "checkpoint", scratch="abcdefgh")["step"] == 8   # judged, not written
    assert load_checkpoint(service.bundle.state_dir / "checkpoint.npz")["step"] == 3
    reply = call(service, "evaluate", {"x": x, "y": y})                  # a request of no session
    assert reply["ok"] and reply["step"] == 3
    assert same_state(service.engine.state(), before) and service.step == 3
    assert call(service, "train", {"x": x, "y": y}, step=3, scratch="abcdefgh")["code"] == "no_scratch"
    assert service.step == 3
    service.close()


# --- 2. deploys keep what they replace; 3. a pulled bundle resumes; 4. nothing to do ---------------

def test_deploys_keep_replaced_state_and_a_pulled_bundle_resumes_at_its_step(tmp_path, tiny_bundle, digits_npz,
                                                                              digits):
    b, c = variant(tiny_bundle, tmp_path / "b", lr=0.02), variant(tiny_bundle, tmp_path / "c", lr=0.03)
    store = tmp_path / "store"
    with device_server(store, listen="127.0.0.1:0", extra=["--keep-retired", 2]) as srv:
        with client(srv.url) as dev:
            dev.deploy(tiny_bundle)
            dev.finetune(digits.X, digits.y, 20, BATCH, SEED)
            state_a = dev.get_state()

        out = ok(run_edgefa("deploy", b, "--device", srv.url, without_torch=True))
        assert re.search(r"the replaced bundle \(\w{16}…, step 20\) is kept on the device as bundle\.prev; "
                         rf"pull it with: edgefa device pull {srv.url} --kept bundle\.prev --out DIR", out), out
        out = ok(run_edgefa("deploy", c, "--device", srv.url, without_torch=True))
        m = re.search(r"the bundle before it \(step 20\) moved to (retired/\S+); pull it with", out)
        assert m, out
        assert (store / m[1] / "state" / "checkpoint.npz").is_file()

        pulled = tmp_path / "pulled"
        out = ok(run_edgefa("device", "pull", srv.url, "--kept", m[1], "--out", pulled, without_torch=True))
        assert f"({m[1]}, its state at step 20)" in out, out
        assert same_state(load_checkpoint(pulled / "state" / "checkpoint.npz"), state_a)

        # the pulled bundle, deployed, resumes at its step with its weights: pull -> deploy restores
        out = ok(run_edgefa("deploy", pulled, "--device", srv.url, without_torch=True))
        assert "resumed at step 20 from the bundle's state" in out, out
        with client(srv.url) as dev:
            assert same_state(dev.get_state(), state_a)
            assert dev.info()["kept"][0]["name"] == "bundle.prev"

        # a state that does not load for its bundle (another bundle's feedback): refused, one line
        foreign = tmp_path / "foreign"
        shutil.copytree(pulled, foreign)
        for path in (foreign / "state").glob("checkpoint*.npz"):         # both: no fallback to the previous
            ckpt = load_checkpoint(path)
            name = next(k for k in ckpt if k.startswith("feedback/"))
            ckpt[name] = ckpt[name] + 1
            np.savez(path, **ckpt)
        proc = run_edgefa("deploy", foreign, "--device", srv.url, without_torch=True)
        assert_one_error_line(proc, "state/ does not load", "feedback matrix", "keeps serving bundle", "step 20")

        # 4. --steps below the device's step: nothing to do, exit 0
        out = ok(run_edgefa("finetune", "--device", srv.url, "--data", digits_npz, "--steps", 10,
                            without_torch=True))
        assert "the device is already at step 20 (>= --steps 10): nothing to do" in out, out
        with client(srv.url) as dev:
            assert dev.status()["step"] == 20


def test_retired_bundles_are_bounded_and_the_oldest_go(tmp_path, tiny_bundle, digits):
    bundles = [variant(tiny_bundle, tmp_path / f"v{i}", lr=0.01 * (i + 1)) for i in range(5)]
    service = DeviceService(ServiceConfig(tmp_path / "store", checkpoint_every=0, threads=1, keep_retired=1),
                            log=[].append)
    replies = []
    for bundle in bundles:
        replies.append(deploy(service, bundle))
        assert replies[-1]["ok"], replies[-1]
        train(service, digits, 2)
    # each deploy from the third on pushes a trained bundle out of bundle.prev into retired/;
    # with room for one, each from the fourth on removes the one retired before
    assert replies[1]["replaced"]["step"] == 2 and replies[1]["pushed_out"] is None
    assert replies[2]["pushed_out"]["kept_as"].startswith("retired/") and replies[2]["evicted"] == []
    assert replies[3]["evicted"] == [replies[2]["pushed_out"]["kept_as"]]
    assert replies[4]["evicted"] == [replies[3]["pushed_out"]["kept_as"]]
    assert [k["name"] for k in call(service, "info")["kept"]] == ["bundle.prev", replies[4]["pushed_out"]["kept_as"]]
    (tmp_path / "store" / "retired" / "mine").mkdir()           # not edgefa's: never touched
    service.close()

    service = DeviceService(ServiceConfig(tmp_path / "store", checkpoint_every=0, threads=1, keep_retired=0),
                            log=[].append)
    train(service, digits, 1)
    reply = deploy(service, bundles[0])
    assert reply["pushed_out"] == {"bundle": reply["pushed_out"]["bundle"], "step": 2, "kept_as": None}
    assert len(reply["evicted"]) == 1 and (tmp_path / "store" / "retired" / "mine").is_dir()
    service.close()


def test_a_crash_at_every_io_point_of_a_retiring_deploy_loses_no_trained_state(tmp_path, tiny_bundle, digits):
    """bundle.prev holds trained state P, bundle holds trained A; deploying B retires P. Crash at
    each I/O point: the next start serves A or B, and both A's and P's checkpoints are still in
    the store (bundle/, bundle.prev/ or retired/)."""
    template = tmp_path / "template"
    p, b = variant(tiny_bundle, tmp_path / "p", lr=0.04), variant(tiny_bundle, tmp_path / "b", lr=0.05)
    service = DeviceService(ServiceConfig(template, checkpoint_every=0, threads=1), log=[].append)
    for bundle, steps in ((p, 3), (tiny_bundle, 4)):
        assert deploy(service, bundle)["ok"]
        train(service, digits, steps)
    service.checkpoint()
    sha_b = upload(service, b)
    service.close()

    def steps_kept(store: Path) -> set[int]:
        return {int(load_checkpoint(ck)["step"]) for ck in store.rglob("state/checkpoint.npz")
                if "incoming" not in ck.parts}

    store = tmp_path / "count"
    shutil.copytree(template, store)
    counting = DeviceService(ServiceConfig(store, checkpoint_every=0, threads=1), log=[].append)
    with storage.faults() as plan:
        assert call(counting, "upload_end", sha256=sha_b)["pushed_out"]["kept_as"].startswith("retired/")
    counting.close()
    count = len(plan.ops)
    outcomes = set()
    for n in range(1, count + 1):
        store = tmp_path / f"s{n}"
        shutil.copytree(template, store)
        service = DeviceService(ServiceConfig(store, checkpoint_every=0, threads=1), log=[].append)
        with storage.faults(crash_at=n), pytest.raises(storage.InjectedCrash):
            service.handle(encode({"op": "upload_end", "sha256": sha_b}))
        service.close()
        restarted = DeviceService(ServiceConfig(store, checkpoint_every=0, threads=1), log=[].append)
        outcomes.add(restarted.step)
        assert restarted.step in (4, 0), n                        # A at its checkpoint, or B fresh
        assert {3, 4} <= steps_kept(store), (n, steps_kept(store))
        restarted.close()
        shutil.rmtree(store)
    assert outcomes == {0, 4}
