"""Every bundle kind through the device-side commands that describe or run one: the link service's
status and info, `edgefa profile`, `edgefa budget` and `edgefa fpga simulate|sweep|cost`.

Kinds: an mlp, a resmlp (no `model["layers"]`), an mlp with `trainable: last:2`, and a
bradley-terry preference scorer. Each command on each kind either works or refuses in exactly one
line with exit status 2: `profile` refuses a preference bundle (its step takes pairs), and the fpga
commands refuse anything but an MLP's DFA step (all layers or last:K; cross-entropy or Bradley-Terry:
tests/test_fpga_kinds.py runs those)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from conftest import assert_one_error_line, run_all
from test_device_preference import scorer_run
from test_trainable import _cli_in_process, mlp_run, resmlp_run
from edgefa import bundle as bundle_mod
from edgefa.bundle import describe_model, read_bundle
from edgefa.shared.datasets import Dataset
from edgefa.exporters.export import export_bundle
from edgefa.fpga_sim import scope
from edgefa.fpga_sim.config import FxpConfig
from edgefa.fpga_sim.cost import MacArray, cost_of_bundle, cost_report
from edgefa.fpga_sim.datapath import FixedPointDFA
from edgefa.fpga_sim.simulate import SimulateConfig, simulate
from edgefa.fpga_sim.sweep import FormatGrid, sweep
from edgefa.link.service import DeviceService, ServiceConfig

PROFILE = "jetson-nano-4gb"      # a named device profile: no detection probe in these tests
FPGA_REASON = "fpga: " + scope.COVERED + "; this bundle is "
OUT_OF_FPGA = {"resmlp": f"model kind 'resmlp' ({scope.WHY_NOT_KIND['resmlp']})"}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("kinds")
    return {"mlp": export_bundle(mlp_run(), out / "mlp"),
            "resmlp": export_bundle(resmlp_run(), out / "resmlp"),
            "last2": export_bundle(mlp_run(), out / "last2", trainable="last:2"),
            "preference": export_bundle(scorer_run(), out / "preference")}


@pytest.fixture(scope="module")
def data(bundles, tmp_path_factory) -> dict:
    """A labelled .npz shaped like each bundle's input (what `fpga simulate --data` reads)."""
    out, rng, files = tmp_path_factory.mktemp("kinds-data"), np.random.default_rng(0), {}
    for name, path in bundles.items():
        m = read_bundle(path).model
        files[name] = out / f"{name}.npz"
        np.savez(files[name], X=rng.standard_normal((64, m["in_features"])).astype(np.float32),
                 y=rng.integers(0, max(2, m["n_classes"]), 64))
    return files


@pytest.fixture(scope="module")
def cli(bundles, tmp_path_factory) -> dict:
    """The commands that run steps, each in a real process of its own, all at once."""
    out = tmp_path_factory.mktemp("kinds-cli")
    calls = {"profile resmlp": ("profile", bundles["resmlp"], "--out", out / "resmlp", "--steps", "5",
                                "--profile", PROFILE),
             "profile last2": ("profile", bundles["last2"], "--out", out / "last2", "--steps", "5",
                               "--profile", PROFILE),
             "profile preference": ("profile", bundles["preference"], "--out", out / "preference", "--steps", "5",
                                    "--profile", PROFILE),
             "fpga cost resmlp": ("fpga", "cost", bundles["resmlp"])}
    return {"out": out, **dict(zip(calls, run_all(*calls.values())))}


# --- the link service ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mlp", "resmlp", "last2", "preference"])
def test_status_and_info_describe_every_kind(bundles, tmp_path, kind):
    shutil.copytree(bundles[kind], tmp_path / "store" / "bundle")
    service = DeviceService(ServiceConfig(tmp_path / "store", threads=1))
    model = read_bundle(bundles[kind]).model
    status = service._status()
    assert status["step"] == 0 and status["kind"] == model.get("kind", "mlp")
    assert status["description"] == describe_model(model)
    assert status["model"][0] == model["in_features"] and status["model"][-1] == model["n_classes"]
    if kind == "resmlp":      # the matmul path: embed, then fc1 and fc2 of each block, then the head
        assert status["model"] == [12, 16] + [32, 16] * 3 + [4]
    else:                     # an mlp's layer widths, as before model kinds
        assert status["model"] == [model["in_features"]] + [layer["out"] for layer in model["layers"]]
    assert status["trainable"] == ("last:2" if kind == "last2" else "all")
    assert status["loss"] == ("bradley-terry" if kind == "preference" else bundle_mod.LOSS_CROSS_ENTROPY)
    info, _ = service._op_info(None)
    assert info["description"] == status["description"] and info["model"] == status["model"]
    json.dumps(info)          # the reply travels as JSON


# --- profile and budget -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["resmlp", "last2"])
def test_profile_runs_on_a_resmlp_and_a_last_k_bundle(bundles, cli, kind):
    proc = cli[f"profile {kind}"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    p = json.loads((cli["out"] / kind / "profile.json").read_text())
    model = read_bundle(bundles[kind]).model
    assert p["model"]["description"] == describe_model(model)
    assert p["model"]["kind"] == model.get("kind", "mlp")
    assert p["finetune"]["steps_run"] == 5 and p["phases"]["train_step"]["count"] == 5
    assert p["budget"]["peak_bytes"] > 0


def test_profile_refuses_a_preference_bundle_in_one_line(bundles, cli):
    assert_one_error_line(cli["profile preference"], str(bundles["preference"]), "bradley-terry preference bundle")
    assert not (cli["out"] / "preference").exists()


@pytest.mark.parametrize("kind", ["resmlp", "last2", "preference"])
def test_budget_works_on_every_kind(bundles, capsys, kind):
    proc = _cli_in_process_ok(capsys, "budget", bundles[kind], "--profile", PROFILE, "--batch", "8", "--json")
    b = json.loads(proc)
    assert b["peak_bytes"] > 0 and b["step_lower_bound_s"] > 0


def _cli_in_process_ok(capsys, *args) -> str:
    from edgefa.cli import main

    main([str(a) for a in args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    return captured.out


# --- the fpga commands --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(OUT_OF_FPGA))
@pytest.mark.parametrize("command", ["simulate", "sweep", "cost"])
def test_fpga_commands_refuse_what_they_do_not_model_in_one_line(bundles, data, tmp_path, capsys, kind, command):
    args = {"simulate": ("fpga", "simulate", bundles[kind], "--data", data[kind], "--steps", "2"),
            "sweep": ("fpga", "sweep", bundles[kind], "--data", data[kind], "--steps", "2", "--widths", "8",
                      "--out", tmp_path / "sweep"),
            "cost": ("fpga", "cost", bundles[kind])}[command]
    line = assert_one_error_line(_cli_in_process(capsys, *args), str(bundles[kind]), FPGA_REASON + OUT_OF_FPGA[kind])
    assert line.endswith(OUT_OF_FPGA[kind]), line
    assert not (tmp_path / "sweep").exists()


def test_fpga_cost_refuses_in_a_process_of_its_own(bundles, cli):
    assert_one_error_line(cli["fpga cost resmlp"], FPGA_REASON + OUT_OF_FPGA["resmlp"])


def test_one_check_guards_the_datapath_the_simulator_the_sweep_and_the_cost_model(bundles):
    train = Dataset(np.zeros((4, 12), np.float32), np.zeros(4, np.int64), 4, "zeros")
    for kind, reason in OUT_OF_FPGA.items():
        b = read_bundle(bundles[kind])
        assert scope.out_of_scope(b.manifest) == [reason]
        for call in (lambda: FixedPointDFA(b, FxpConfig()),
                     lambda: simulate(b, train, SimulateConfig(steps=1), FxpConfig()),
                     lambda: sweep(b, train, SimulateConfig(steps=1), FormatGrid(widths=(8,)), FxpConfig()),
                     lambda: cost_of_bundle(b.path, MacArray())):
            with pytest.raises(scope.OutOfScope, match=f"^{re.escape(str(b.path))}: fpga: .*this bundle is "
                                                       f"{re.escape(reason)}$"):
                call()
    with pytest.raises(scope.OutOfScope, match="this bundle is model kind 'resmlp' "):
        cost_report(read_bundle(bundles["resmlp"]).model, MacArray())
    # the plain mlp passes, through the same check
    mlp = read_bundle(bundles["mlp"])
    assert scope.out_of_scope(mlp.manifest) == []
    assert cost_of_bundle(mlp.path, MacArray())["dfa"]["train_step"]["cycles"] > 0
    FixedPointDFA(mlp, FxpConfig())


def test_the_scope_strings_mirror_the_bundle_format():
    assert scope.LOSS == bundle_mod.LOSS_CROSS_ENTROPY
    assert scope.LOSS_BRADLEY_TERRY == bundle_mod.LOSS_BRADLEY_TERRY
    for model in ({"kind": "mlp", "layers": [{}] * 3}, {"kind": "mlp", "layers": [{}] * 3, "trainable": "last:2"}):
        assert scope.trained_count(model) == bundle_mod.check_trainable_syntax(model.get("trainable", "all"))
    assert scope.KIND == bundle_mod.model_kind({}) == "mlp"
    assert bundle_mod.check_trainable_syntax(scope.TRAINABLE) is None
