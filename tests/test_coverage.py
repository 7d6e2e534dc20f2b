"""The README's table of which bundle kinds each command serves (edgefa/coverage.py).

The table is generated from the checks the commands run, on one small manifest per kind. Here: the
README holds exactly that table; every gap has its one-line reason; one command regenerates it;
real exported bundles of every kind get the same verdicts as the table's manifests; and the
commands' own entry points (the fpga cost model, the budget, device evaluate, the BP side of
profile compare) serve or refuse each real bundle as the table says."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from test_device_preference import DIM, scorer_run
from test_trainable import mlp_run, resmlp_run
from edgefa import coverage
from edgefa.bundle import TRUNK_GRAPH, read_bundle
from edgefa.device_profiles import load_profile
from edgefa.device_profiles.budget import budget
from edgefa.errors import EdgefaError
from edgefa.exporters.export import export_bundle
from edgefa.fpga_sim.cost import MacArray, cost_of_bundle
from edgefa.fpga_sim.scope import OutOfScope
from edgefa.models import NETS, NetConfig
from edgefa.profile_runs.compare import BP_KINDS
from edgefa.runtime.finetune import evaluate
from edgefa.shared.datasets import Dataset, Standardizer
from edgefa.shared.preference_pairs import synthetic_pairs
from edgefa.training.bp_profile import BP_TWINS, bp_twin
from edgefa.training.trainer import Run, TrainConfig, make_optimizer


def cnn_run() -> Run:
    torch.manual_seed(0)
    model = NETS["cnn"](NetConfig("cnn", [1, 8, 8], 10, "dfa", width=4, depth=1))
    return Run(model, make_optimizer(model, 0.05, 0.9), TrainConfig(model="cnn"), Standardizer(0.0, 1.0), {})


@pytest.fixture(scope="module")
def real_bundles(tmp_path_factory) -> dict:
    """A bundle of every kind in the table, exported from a host run."""
    out = tmp_path_factory.mktemp("coverage")
    return {"mlp": export_bundle(mlp_run(), out / "mlp"),
            "mlp last:K": export_bundle(mlp_run(), out / "mlp-last", trainable="last:2"),
            "resmlp": export_bundle(resmlp_run(), out / "resmlp"),
            "resmlp last:K": export_bundle(resmlp_run(), out / "resmlp-last", trainable="last:2"),
            "preference scorer": export_bundle(scorer_run(), out / "scorer"),
            "cnn": export_bundle(cnn_run(), out / "cnn"),
            "frozen trunk + head": export_bundle(cnn_run(), out / "trunk", trainable="head")}


def test_readme_holds_exactly_the_generated_table():
    text = (REPO / "README.md").read_text()
    assert text.count(coverage.BEGIN) == 1 and text.count(coverage.END) == 1
    between = text.split(coverage.BEGIN)[1].split(coverage.END)[0]
    assert between == "\n" + coverage.markdown_table(), "stale: run python -m edgefa.coverage --write-readme"


def test_every_gap_has_its_one_line_reason():
    table, text = coverage.coverage(), coverage.markdown_table()
    assert list(table) == [c.name for c in coverage.COMMANDS] and all(list(v) == list(coverage.KINDS)
                                                                     for v in table.values())
    reasons = [r for verdicts in table.values() for r in verdicts.values() if r is not None]
    assert reasons and all(r.strip() and "\n" not in r and not r.startswith(coverage.WHERE) for r in reasons)
    notes = dict(re.findall(r"^(\d+)\. (.+)$", text, re.M))
    assert sorted(notes.values()) == sorted(set(reasons))
    assert {n for n in re.findall(r"no \((\d+)\)", text)} == set(notes)
    # the rows a reader looks for
    assert table["fpga cost"]["mlp last:K"] is None and table["fpga cost"]["preference scorer"] is None
    assert "LayerNorm" in table["fpga cost"]["resmlp"] and "trunk" in table["fpga cost"]["frozen trunk + head"]
    assert "bradley-terry" in table["profile"]["preference scorer"]


def test_one_command_regenerates_and_checks_the_table(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{coverage.BEGIN}\nold\n{coverage.END}\n\nafter\n")
    assert coverage.main(["--readme", str(readme), "--check"]) == 1
    proc = subprocess.run([sys.executable, "-m", "edgefa.coverage", "--readme", str(readme), "--write-readme"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert readme.read_text() == f"# x\n\n{coverage.BEGIN}\n{coverage.markdown_table()}{coverage.END}\n\nafter\n"
    assert coverage.main(["--readme", str(readme), "--check"]) == 0
    readme.write_text("no markers\n")
    assert coverage.main(["--readme", str(readme), "--write-readme"]) == 2
    assert readme.read_text() == "no markers\n"


def test_real_bundles_get_the_verdicts_of_the_table(real_bundles):
    for kind, path in real_bundles.items():
        manifest = read_bundle(path).manifest
        assert coverage.kind_of(manifest) == kind
        for command in coverage.COMMANDS:
            assert coverage.refusal(command, manifest) == coverage.refusal(command, coverage.KINDS[kind]), \
                (command.name, kind)


def _data_for(bundle):
    model, rng = bundle.model, np.random.default_rng(0)
    if bundle.manifest.get("loss") == "bradley-terry":
        return synthetic_pairs(32, DIM, seed=1)
    return Dataset(rng.standard_normal((32, model["in_features"])).astype(np.float32),
                   rng.integers(0, model["n_classes"], 32), model["n_classes"], "random")


def test_the_commands_entry_points_serve_or_refuse_as_the_table_says(real_bundles):
    table, profile = coverage.coverage(), load_profile("jetson-nano-4gb")
    assert set(BP_TWINS) == set(BP_KINDS)       # the BP side's kinds, as profile compare's check names them
    for kind, path in real_bundles.items():
        bundle = read_bundle(path)
        try:
            cost_of_bundle(path, MacArray())
            fpga = None
        except OutOfScope as exc:
            fpga = str(exc).removeprefix(f"{path}: ")
        assert fpga == table["fpga cost"][kind], kind
        assert table["budget"][kind] is None and budget(bundle.manifest, profile, 8).peak_bytes > 0
        assert table["device evaluate"][kind] is None and 0 <= evaluate(bundle, _data_for(bundle))["accuracy"] <= 1
        refused_by_bp = "BP side" in (table["profile compare"][kind] or "")
        try:
            bp_twin(bundle.model, bundle.weights, bundle.path / TRUNK_GRAPH)
            built = True
        except EdgefaError:
            built = False
        assert built != refused_by_bp, kind
