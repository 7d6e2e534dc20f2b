"""The device side never needs torch (nor sklearn): run it where torch cannot be imported, import
every device module with torch blocked, and check the sources statically."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO, run_edgefa
from source_imports import PACKAGE, imported, module_of, part_of, top_level_import_nodes

# Every top-level module and subpackage of edgefa is on one side. The device side, and `shared`
# (what both sides import), must import where torch cannot; the host side needs torch. The modules
# themselves are found in the package (pkgutil), so a new one is checked without being listed.
DEVICE_PARTS = ("bundle", "storage", "errors", "out_folders", "cli", "cli_types", "without_torch", "shared", "coverage",
                "runtime", "link", "profiling", "profile_runs", "device_profiles", "fpga_sim", "report")
HOST_PARTS = ("models", "training", "diagnostics", "experiments", "exporters", "demo")
# The one entry point of both sides: it imports host modules inside the host commands only
# (test_cli_imports_no_host_module_at_top_level), so the "never, anywhere" check skips it.
ENTRY_POINTS = ("cli", "without_torch")
HOST_MODULES = tuple(f"edgefa.{part}" for part in HOST_PARTS) + ("torch",)


def _is_under(name: str, roots) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _device_files() -> list[Path]:
    """Every source file of the device parts, as they lie on disk."""
    files = []
    for part in DEVICE_PARTS:
        folder = PACKAGE / part
        files += sorted(folder.rglob("*.py")) if folder.is_dir() else [PACKAGE / f"{part}.py"]
    return files


def test_every_part_of_edgefa_is_on_one_side():
    parts = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    parts |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert not set(DEVICE_PARTS) & set(HOST_PARTS)
    assert parts == set(DEVICE_PARTS) | set(HOST_PARTS), (
        f"on no side: {sorted(parts - set(DEVICE_PARTS) - set(HOST_PARTS))}; "
        f"listed but gone: {sorted(set(DEVICE_PARTS) | set(HOST_PARTS) - parts)}")


# --- the device CLI in a process where `import torch` fails -----------------------------------

def test_device_finetune_and_evaluate_run_without_torch(tiny_bundle, digits_npz, tmp_path):
    report = tmp_path / "report.json"
    tuned = run_edgefa("device", "finetune", tiny_bundle, "--data", digits_npz, "--steps", "20",
                       "--eval", digits_npz, "--report", report, without_torch=True)
    assert tuned.returncode == 0, tuned.stdout + tuned.stderr
    assert "Traceback" not in tuned.stdout + tuned.stderr
    r = json.loads(report.read_text())
    assert (r["final_step"], r["steps_run"], r["refused_steps"]) == (20, 20, [])
    assert isinstance(r["accuracy_after"], float) and 0.0 <= r["accuracy_after"] <= 1.0

    evaluated = run_edgefa("device", "evaluate", tiny_bundle, "--data", digits_npz, without_torch=True)
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    assert "Traceback" not in evaluated.stdout + evaluated.stderr
    m = re.search(r"accuracy (\d+(?:\.\d+)?)% on (\d+) samples \(device state at step (\d+)\)", evaluated.stdout)
    assert m, evaluated.stdout
    accuracy, samples, step = float(m[1]), int(m[2]), int(m[3])
    assert 0.0 <= accuracy <= 100.0
    assert (samples, step) == (1797, 20)
    # the same weights on the same data: evaluate agrees with the fine-tuning report
    assert accuracy == round(100 * r["accuracy_after"], 1)


# --- importing every device module with torch blocked -----------------------------------------

_IMPORT_PROBE = """
import importlib, json, pkgutil, sys, types
from edgefa.without_torch import block_torch
block_torch()                                     # `import torch` raises ImportError from here on
import edgefa

def fail(name):
    raise SystemExit(f"cannot import {name}: {sys.exc_info()[1]!r}")

found = []
for part in pkgutil.iter_modules(edgefa.__path__, "edgefa."):
    if part.name.split(".")[1] not in DEVICE_PARTS:
        continue
    module = importlib.import_module(part.name)
    found.append(part.name)
    if part.ispkg:                                # walk_packages imports subpackages, not modules
        for sub in pkgutil.walk_packages(module.__path__, part.name + ".", onerror=fail):
            importlib.import_module(sub.name)
            found.append(sub.name)
torch = sys.modules.get("torch")
assert torch is None or not isinstance(torch, types.ModuleType), "a real torch module was imported"
assert not any(n.startswith("torch.") for n in sys.modules), sorted(n for n in sys.modules if n.startswith("torch."))
sk = sorted(n for n in sys.modules if n == "sklearn" or n.startswith("sklearn."))
assert not sk, sk
print(json.dumps(found))
"""


def test_device_modules_import_with_torch_blocked_and_pull_in_neither_torch_nor_sklearn():
    code = f"DEVICE_PARTS = {DEVICE_PARTS!r}\n" + _IMPORT_PROBE
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    imported_modules = json.loads(proc.stdout.strip().splitlines()[-1])
    # the walk found every device source file there is, fpga_sim/scope.py (once missed) included
    assert sorted(imported_modules) == sorted(module_of(f) for f in _device_files())
    assert {"edgefa.fpga_sim.scope", "edgefa.shared.batches", "edgefa.shared.datasets", "edgefa.runtime.finetune",
            "edgefa.link.service", "edgefa.profile_runs.session", "edgefa.device_profiles.host_probe",
            "edgefa.cli"} <= set(imported_modules)


# --- static checks of the sources -------------------------------------------------------------

def test_device_sources_never_import_torch_or_host_modules():
    files = [f for f in _device_files() if part_of(module_of(f)) not in ENTRY_POINTS]
    assert {"bundle.py", "engine.py", "state.py", "finetune.py", "batches.py", "memory.py", "scope.py",
            "datasets.py", "protocol.py", "server.py", "client.py", "fleet.py"} <= {f.name for f in files}
    offenders, seen = [], set()
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):                           # anywhere, function bodies included
            for name in imported(node, path):
                seen.add(name)
                if _is_under(name, HOST_MODULES):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} imports {name}")
    assert not offenders, "\n".join(offenders)
    # the walker resolves what these files really import
    assert {"onnxruntime", "edgefa.bundle", "edgefa.errors", "edgefa.runtime.engine"} <= seen


def test_cli_imports_no_host_module_at_top_level():
    """Every module of the edgefa/cli/ package: host modules only inside the host commands' bodies."""
    paths = sorted((PACKAGE / "cli").glob("*.py"))
    assert {"__init__.py", "__main__.py", "host.py", "device.py", "link.py"} <= {p.name for p in paths}
    assert not (PACKAGE / "cli.py").exists()            # the package replaced the one file
    top, everywhere = {}, set()
    for path in paths:
        tree = ast.parse(path.read_text(), filename=str(path))
        top[path.name] = {name for node in top_level_import_nodes(tree) for name in imported(node, path)}
        everywhere |= {name for node in ast.walk(tree) for name in imported(node, path)}

    offenders = {file: sorted(n for n in names if _is_under(n, HOST_MODULES)) for file, names in top.items()}
    assert not any(offenders.values()), offenders
    assert {"click", "edgefa.errors"} <= top["__init__.py"]
    # the host commands do import host modules, inside their bodies, which is what makes the
    # top-level check above meaningful
    assert "edgefa.training.launch" in everywhere and "edgefa.exporters.export" in everywhere


def test_the_import_walker_catches_torch_and_host_imports():
    """The static checks above would notice a violation."""
    fake = REPO / "edgefa" / "runtime" / "fake.py"
    tree = ast.parse("import numpy\nfrom ..training import trainer\n"
                     "def f():\n    import torch.nn as nn\n    from torch import Tensor\n")
    names = {name for node in ast.walk(tree) for name in imported(node, fake)}
    assert {"edgefa.training", "torch.nn", "torch"} <= names
    assert [n for n in names if _is_under(n, HOST_MODULES)]
    top = {name for node in top_level_import_nodes(tree) for name in imported(node, fake)}
    assert "torch" not in top and "torch.nn" not in top and "edgefa.training" in top


# --- the guard itself -------------------------------------------------------------------------

def test_the_torch_guard_really_blocks_torch(tmp_path):
    out = tmp_path / "X"
    proc = run_edgefa("train", "--out", out, "--epochs", "1", without_torch=True)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "torch" in proc.stderr
    assert re.search(r"(ModuleNotFoundError|ImportError).*torch", proc.stderr), proc.stderr
    assert not (out / "checkpoint.pt").exists()
