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

PACKAGE = REPO / "edgefa"
DEVICE_MODULES = ["edgefa.bundle", "edgefa.storage", "edgefa.runtime.engine", "edgefa.runtime.state", "edgefa.runtime.tensorrt_build",
                  "edgefa.runtime.tensorrt_engine", "edgefa.runtime.backends", "edgefa.runtime.cuda_memory",
                  "edgefa.runtime.step_bounds", "edgefa.runtime.divergence",
                  "edgefa.runtime.finetune", "edgefa.runtime.batches", "edgefa.data.preference", "edgefa.profiling.memory",
                  "edgefa.data", "edgefa.link.frames", "edgefa.link.protocol", "edgefa.link.messages",
                  "edgefa.link.transport", "edgefa.link.service", "edgefa.link.server", "edgefa.link.client",
                  "edgefa.link.fleet", "edgefa.profiling.profiler", "edgefa.profiling.sensors",
                  "edgefa.profiling.tegrastats", "edgefa.profiling.machine", "edgefa.profiling.session",
                  "edgefa.profiling.compare", "edgefa.device_profiles", "edgefa.device_profiles.budget",
                  "edgefa.report.html", "edgefa.fpga_sim.cost", "edgefa.fpga_sim.fixed",
                  "edgefa.fpga_sim.ops", "edgefa.fpga_sim.config", "edgefa.fpga_sim.datapath",
                  "edgefa.fpga_sim.simulate", "edgefa.fpga_sim.sweep", "edgefa.cli", "edgefa.cli_types",
                  "edgefa.out_folders"]
HOST_MODULES = ("edgefa.training", "edgefa.models", "edgefa.exporters", "edgefa.demo", "torch")


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
import sys, types
sys.modules["torch"] = None
import {modules}
torch = sys.modules.get("torch")
assert torch is None or not isinstance(torch, types.ModuleType), "a real torch module was imported"
assert not any(n.startswith("torch.") for n in sys.modules), sorted(n for n in sys.modules if n.startswith("torch."))
sk = sorted(n for n in sys.modules if n == "sklearn" or n.startswith("sklearn."))
assert not sk, sk
print("imported", len({modules_list!r}), "device modules without torch or sklearn")
"""


def test_device_modules_import_with_torch_blocked_and_pull_in_neither_torch_nor_sklearn():
    code = _IMPORT_PROBE.format(modules=", ".join(DEVICE_MODULES), modules_list=DEVICE_MODULES)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == f"imported {len(DEVICE_MODULES)} device modules without torch or sklearn"


# --- static checks of the sources -------------------------------------------------------------

def _device_sources() -> list[Path]:
    files = [PACKAGE / "bundle.py"]
    for folder in ("runtime", "profiling", "data", "link", "device_profiles", "fpga_sim", "report"):
        if (PACKAGE / folder).is_dir():
            files += sorted((PACKAGE / folder).rglob("*.py"))
        elif (PACKAGE / f"{folder}.py").is_file():
            files.append(PACKAGE / f"{folder}.py")
    return files


def _module_of(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, path: Path) -> list[str]:
    """Absolute names an Import/ImportFrom node imports (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            package = _module_of(path).split(".")
            if path.name != "__init__.py":
                package = package[:-1]
            base = package[:len(package) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        return [module] + [f"{module}.{alias.name}" for alias in node.names]
    return []


def _is_under(name: str, roots) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _top_level_import_nodes(tree: ast.Module):
    """Imports executed when the module is imported: module body, including top-level if/try."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                stack.extend(getattr(node, field, []) or [])
        elif isinstance(node, ast.ExceptHandler):
            stack.extend(node.body)


def test_device_sources_never_import_torch_or_host_modules():
    files = _device_sources()
    assert {"bundle.py", "engine.py", "state.py", "finetune.py", "batches.py", "memory.py",
            "datasets.py", "protocol.py", "server.py", "client.py", "fleet.py"} <= {f.name for f in files}
    offenders, seen = [], set()
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):                           # anywhere, function bodies included
            for name in _imported(node, path):
                seen.add(name)
                if _is_under(name, HOST_MODULES):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} imports {name}")
    assert not offenders, "\n".join(offenders)
    # the walker resolves what these files really import
    assert {"onnxruntime", "edgefa.bundle", "edgefa.errors", "edgefa.runtime.engine"} <= seen


def test_cli_imports_no_host_module_at_top_level():
    path = PACKAGE / "cli.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {name for node in _top_level_import_nodes(tree) for name in _imported(node, path)}
    everywhere = {name for node in ast.walk(tree) for name in _imported(node, path)}

    assert not [n for n in top if _is_under(n, HOST_MODULES)], sorted(top)
    assert {"click", "edgefa.errors"} <= top
    # the host commands do import host modules, inside their bodies, which is what makes the
    # top-level check above meaningful
    assert "edgefa.training.trainer" in everywhere and "edgefa.exporters.export" in everywhere


def test_the_import_walker_catches_torch_and_host_imports():
    """The static checks above would notice a violation."""
    fake = REPO / "edgefa" / "runtime" / "fake.py"
    tree = ast.parse("import numpy\nfrom ..training import trainer\n"
                     "def f():\n    import torch.nn as nn\n    from torch import Tensor\n")
    names = {name for node in ast.walk(tree) for name in _imported(node, fake)}
    assert {"edgefa.training", "torch.nn", "torch"} <= names
    assert [n for n in names if _is_under(n, HOST_MODULES)]
    top = {name for node in _top_level_import_nodes(tree) for name in _imported(node, fake)}
    assert "torch" not in top and "torch.nn" not in top and "edgefa.training" in top


# --- the guard itself -------------------------------------------------------------------------

def test_the_torch_guard_really_blocks_torch(tmp_path):
    out = tmp_path / "X"
    proc = run_edgefa("train", "--out", out, "--epochs", "1", without_torch=True)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "torch" in proc.stderr
    assert re.search(r"(ModuleNotFoundError|ImportError).*torch", proc.stderr), proc.stderr
    assert not (out / "checkpoint.pt").exists()
