"""The diagnostic protocol (edgefa/diagnostics/diagnosis.py, `edgefa diagnose`) against known answers.

Tiny pre-LN ResMLPs (width 32, depth 2) on digits, trained once per module; most checks call the
library in-process. Three real CLI subprocesses run together (`run_all`): a diagnosis that reuses
the cached frozen baseline, the missing-feedback refusal and the float16 refusal; the other CLI
checks call `edgefa.cli.main` in this process (the same code, without another torch import).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from edgefa.shared.datasets import load_dataset
from edgefa.diagnostics import diagnosis
from edgefa.training.alignment import bp_twin, frobenius, row_norms
from edgefa.diagnostics.diagnosis import (BASELINE_DIR, DIAGNOSIS, SCHEMA, Settings, Thresholds, baseline_config,
                                         bp_stage_gradients, check_baseline, diagnose, fresh_feedback,
                                         measure_dtype, perturbation_correlation, run_stages, stage_view,
                                         stream_growth)
from edgefa.errors import CheckpointError, DiagnosisError
from edgefa.training.trainer import CHECKPOINT, TrainConfig, load_run, save_run, train

from conftest import assert_one_error_line, cli_in_process, run_all, run_edgefa

REPO = Path(__file__).resolve().parents[1]
STAGES = ["embed", "block0", "block1"]
FAST = Settings(null_draws=2, probes=16, eval_batch=128, batches=4, batch_size=16)


def eval_tensors(run, data, n: int):
    """The first n samples of the run's test split, standardized: the protocol's evaluation batch."""
    X, y = diagnosis.test_tensors(run, diagnosis.test_split(run.config, data), torch.device("cpu"))
    return X[:n], y[:n]


def tiny_config(method: str, **extra) -> TrainConfig:
    base = dict(method=method, model="resmlp", width=32, depth=2, epochs=2, alignment=False, device="cpu")
    base.update(extra)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def runs(digits):
    """runs(method, **config) -> a trained Run, each config trained once per module."""
    cache = {}

    def get(method: str = "dfa", **extra):
        key = (method, repr(sorted(extra.items())))
        if key not in cache:
            cache[key] = train(tiny_config(method, **extra), data=digits)
        return cache[key]

    return get


def private(run):
    """A copy of a run whose model may be changed in place."""
    return dataclasses.replace(run, model=copy.deepcopy(run.model))


def consistent(result: dict) -> None:
    """The verdict follows from the diagnostics, and the diagnosis is strict JSON."""
    fired = [k for k, d in result["diagnostics"].items() if d["fired"]]
    assert result["fired"] == fired
    assert set(result["diagnostics"]) == {"growth", "gradient_floor", "stability", "baseline"}
    assert result["verdict"] == ("walk back" if fired else "trustworthy")
    json.dumps(result, allow_nan=False)


# --------------------------------------------------------------------------------------------
# Run directories and the CLI subprocesses (all three at once)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dfa_dir(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dfa_run")
    save_run(runs("dfa"), out)
    return out


@pytest.fixture(scope="module")
def no_feedback_dir(runs, tmp_path_factory) -> Path:
    """A saved DFA run whose checkpoint lost its feedback_* matrices."""
    out = tmp_path_factory.mktemp("no_feedback")
    save_run(runs("dfa"), out)
    payload = torch.load(out / CHECKPOINT, weights_only=True)
    dropped = [k for k in payload["state_dict"] if k.startswith("feedback_")]
    assert dropped == ["feedback_embed", "feedback_block0", "feedback_block1"]
    for k in dropped:
        del payload["state_dict"][k]
    torch.save(payload, out / CHECKPOINT)
    return out


@pytest.fixture(scope="module")
def frozen_dir(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("frozen_run")
    save_run(runs("dfa", freeze_blocks=True), out)
    return out


@pytest.fixture(scope="module")
def narrow_frozen_dir(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("narrow_frozen")
    save_run(runs("dfa", freeze_blocks=True, width=16, epochs=1), out)
    return out


END_TO_END = ("--null-draws", "3", "--probes", "16")


@pytest.fixture(scope="module")
def first_diagnosis(dfa_dir):
    """`edgefa diagnose RUN` the first time (in this process: it trains the frozen baseline, and
    training is warm here), with what it left behind."""
    proc = cli_in_process("diagnose", dfa_dir, *END_TO_END)
    cached = dfa_dir / BASELINE_DIR / CHECKPOINT
    return {"proc": proc, "cached_mtime": cached.stat().st_mtime_ns if cached.is_file() else None,
            "saved": json.loads((dfa_dir / DIAGNOSIS).read_text()) if (dfa_dir / DIAGNOSIS).is_file() else None}


@pytest.fixture(scope="module")
def cli_wave(first_diagnosis, dfa_dir, no_feedback_dir):
    """The three CLI subprocesses, run at once: the same diagnosis again (the real entry point, the
    cached baseline), missing feedback, float16."""
    again, missing = run_all(
        ("diagnose", dfa_dir, *END_TO_END),
        ("diagnose", no_feedback_dir, "--no-baseline"),
    )
    # float16 is refused before torch is imported: it holds where torch is absent
    half = run_edgefa("diagnose", no_feedback_dir, "--no-baseline", "--dtype", "float16", without_torch=True)
    return {"again": again, "missing": missing, "half": half}


# --------------------------------------------------------------------------------------------
# 1. An inflated residual stream trips (a) growth and (b) the gradient floor
# --------------------------------------------------------------------------------------------

def test_inflated_residual_stream_trips_growth_and_gradient_floor(runs, digits):
    settings = Settings(null_draws=2, probes=16)
    healthy = diagnose(runs("dfa"), settings, baseline=None, data=digits)
    consistent(healthy)
    assert "growth" not in healthy["fired"] and "gradient_floor" not in healthy["fired"]
    assert healthy["growth"]["max"] < 5
    assert healthy["diagnostics"]["gradient_floor"]["value"] > 1e-3
    assert all(not s["degenerate"] and isinstance(s["gamma"], float) for s in healthy["stages"].values())

    run = private(runs("dfa"))
    with torch.no_grad():
        run.model.blocks[0].fc2.weight.mul_(1e9)
        run.model.blocks[0].fc2.bias.mul_(1e9)
    result = diagnose(run, settings, baseline=None, data=digits)
    consistent(result)
    assert "growth" in result["fired"] and "gradient_floor" in result["fired"]
    assert result["verdict"] == "walk back"
    # ||h|| jumps by ~1e8-1e9 after block0 (h_1 = h_0 + 1e9 * f(LN h_0)), then stays
    assert result["growth"]["ratios"][0] > 1e7
    assert result["growth"]["ratios"][1] == pytest.approx(1.0, rel=1e-3)
    assert result["diagnostics"]["growth"]["value"] == result["growth"]["max"]
    assert result["diagnostics"]["gradient_floor"]["value"] < 1e-7
    # degenerate, not a number: the stages past the inflation carry a gradient below the floor
    for name in ("block0", "block1"):
        stage = result["stages"][name]
        assert stage["degenerate"] is True and stage["gamma"] is None and stage["null"] is None
        assert stage["grad_norm"] < 1e-7 and "below the floor" in stage["degenerate_reason"]
    # the embedding's gradient is amplified back by fc2's 1e9: measured, not degenerate
    assert result["stages"]["embed"]["degenerate"] is False
    assert isinstance(result["stages"]["embed"]["gamma"], float)
    for name, layer in result["layers"].items():
        deep = name.startswith("blocks.")
        assert layer["degenerate"] is deep, name
        assert (layer["gamma"] is None) is deep, name
    # the model handed in is measured on copies; the healthy run is untouched by the inflation
    assert diagnose(runs("dfa"), settings, baseline=None, data=digits)["stages"] == healthy["stages"]


# --------------------------------------------------------------------------------------------
# 2. Positive and negative controls: BP gives Gamma = 1 and rho ~ 1, a random vector rho ~ 0
# --------------------------------------------------------------------------------------------

def test_bp_run_gamma_is_one_and_rho_bp_near_one(runs, digits):
    result = diagnose(runs("bp"), FAST, baseline=None, data=digits)
    consistent(result)
    assert list(result["stages"]) == STAGES
    for name, stage in result["stages"].items():
        assert stage["degenerate"] is False
        assert stage["gamma"] == pytest.approx(1.0, abs=1e-6), name
        assert stage["rho_bp"] > 0.99, name
        assert stage["rho_rule"] == pytest.approx(stage["rho_bp"], abs=1e-9), name   # bp's signal is the gradient
    for name, layer in result["layers"].items():
        assert layer["gamma"] == pytest.approx(1.0, abs=1e-6), name
    assert result["warnings"] == []                   # the positive control holds at every stage


def test_a_weak_positive_control_is_a_warning_of_the_diagnosis(first_diagnosis):
    """rho(bp) under 0.9 (or unmeasured) at a stage that is not degenerate: the diagnosis itself
    carries the warning (diagnosis.json), and `edgefa diagnose` prints it from there."""
    from rich.console import Console

    from edgefa.report.terminal import print_diagnosis

    saved = first_diagnosis["saved"]
    assert saved["warnings"] == diagnosis.positive_control_warnings(saved["stages"])
    weak = copy.deepcopy(saved)
    first, second, *_ = weak["stages"]
    weak["stages"][first].update(rho_bp=0.5, degenerate=False)
    weak["stages"][second].update(rho_bp=None, degenerate=True)      # degenerate: rho means nothing there
    weak["warnings"] = diagnosis.positive_control_warnings(weak["stages"])
    assert len(weak["warnings"]) == 1
    assert f"rho(bp) is under 0.9 at {first}:" in weak["warnings"][0] and second not in weak["warnings"][0]
    console = Console(record=True, width=400)
    print_diagnosis(console, weak, "RUN")
    assert f"warning: {weak['warnings'][0]}" in console.export_text()


def test_perturbation_correlation_controls(runs, digits):
    run = runs("dfa")
    twin = bp_twin(run.model, torch.float64)
    X, y = eval_tensors(run, digits, 128)
    X = X.to(torch.float64)
    hs, grads = bp_stage_gradients(twin, X, y)
    gen = torch.Generator().manual_seed(123)
    random_signal = torch.randn(hs[1].shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    rho = perturbation_correlation(twin, X, y, 1, hs[1],
                                   {"bp": grads[1], "negated": -grads[1], "random": random_signal, "none": None},
                                   probes=400, eps_rel=1e-3, gen=gen)
    assert rho["bp"] > 0.99
    assert rho["negated"] < -0.99
    assert abs(rho["random"]) < 0.2
    assert rho["none"] is None
    # a constant prediction has no correlation: None, not a number
    flat = perturbation_correlation(twin, X, y, 1, hs[1], {"zero": torch.zeros_like(hs[1])}, probes=8,
                                    eps_rel=1e-3, gen=torch.Generator().manual_seed(0))
    assert flat == {"zero": None}


def test_dfa_gamma_below_one_and_null_near_zero(runs, digits):
    settings = dataclasses.replace(FAST, null_draws=6)
    result = diagnose(runs("dfa"), settings, baseline=None, data=digits)
    consistent(result)
    assert result["null"]["draws"] == 6
    for name, stage in result["stages"].items():
        assert stage["gamma"] < 0.9, name            # the measurement is not trivially 1
        assert stage["rho_bp"] > 0.99, name          # while the positive control still holds
        null = stage["null"]
        assert null["draws"] == 6 and abs(null["mean"]) < 0.2, name
        assert null["std"] > 0 and null["max"] >= null["mean"], name


def test_fresh_feedback_redraws_at_the_stored_scale_and_leaves_the_model(runs):
    model = runs("dfa").model
    before = {n: model.get_buffer(n).clone() for n in model.feedback_names()}
    twin = fresh_feedback(model, torch.Generator().manual_seed(0))
    assert sorted(twin.feedback_names()) == sorted(before)
    for name, b in before.items():
        assert torch.equal(model.get_buffer(name), b), name
        new = twin.get_buffer(name)
        assert new.shape == b.shape and not torch.equal(new, b), name
        assert float(new.std()) == pytest.approx(float(b.std()), rel=0.3), name
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(p, q), name


# --------------------------------------------------------------------------------------------
# 3. (d): a frozen-blocks model that equals the trained one; baselines that do not fit
# --------------------------------------------------------------------------------------------

def test_frozen_run_against_itself_trips_baseline(runs, digits):
    frozen = runs("dfa", freeze_blocks=True)
    result = diagnose(frozen, FAST, baseline=frozen, data=digits)
    consistent(result)
    d = result["diagnostics"]["baseline"]
    assert "baseline" in result["fired"] and result["verdict"] == "walk back"
    assert d["value"] == 0.0 and d["threshold"] == 0.02 and d["status"] == "fired"
    assert d["baseline_accuracy"] == result["run"]["test_accuracy"]
    # the margin is honoured: a gap of 0 passes a margin of -1 point
    lenient = dataclasses.replace(FAST, thresholds=Thresholds(margin=-0.01))
    passed = diagnose(frozen, lenient, baseline=frozen, data=digits)["diagnostics"]["baseline"]
    assert passed["fired"] is False and passed["status"] == "passed"


def test_baseline_config_freezes_and_drops_the_dfa_penalty(runs):
    cfg = baseline_config(runs("dfa").config)
    assert cfg.freeze_blocks is True and cfg.alignment is False
    assert (cfg.method, cfg.width, cfg.depth, cfg.seed) == ("dfa", 32, 2, 0)
    assert baseline_config(dataclasses.replace(runs("dfa").config, penalty=0.1)).penalty == 0.0
    assert baseline_config(dataclasses.replace(runs("bp").config, penalty=0.1)).penalty == 0.1


def test_check_baseline_refuses_unfrozen_and_mismatched(runs):
    run, frozen = runs("dfa"), runs("dfa", freeze_blocks=True)
    check_baseline(run, frozen, "B")                     # the right baseline passes
    with pytest.raises(DiagnosisError, match="not a frozen-random-blocks run"):
        check_baseline(run, runs("dfa"), "B")
    with pytest.raises(DiagnosisError, match=r"architecture differs .*\(width\)"):
        check_baseline(run, runs("dfa", freeze_blocks=True, width=16, epochs=1), "B")
    reseeded = dataclasses.replace(frozen, config=dataclasses.replace(frozen.config, seed=5))
    with pytest.raises(DiagnosisError, match="seed 5 is not the run's 0"):
        check_baseline(run, reseeded, "B")


def test_cli_baseline_is_self_walks_back(frozen_dir):
    proc = cli_in_process("diagnose", frozen_dir, "--baseline", frozen_dir, "--null-draws", "2",
                          "--probes", "8", "--fail-on-walk-back")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "verdict: walk back" in proc.stdout and "(d) vs frozen blocks" in proc.stdout
    saved = json.loads((frozen_dir / DIAGNOSIS).read_text())
    assert "baseline" in saved["fired"] and saved["diagnostics"]["baseline"]["value"] == 0.0
    assert not (frozen_dir / BASELINE_DIR).exists()       # a given baseline is not trained again


def test_cli_refuses_unfit_baselines(frozen_dir, dfa_dir, narrow_frozen_dir):
    proc = cli_in_process("diagnose", frozen_dir, "--baseline", dfa_dir)
    assert_one_error_line(proc, str(dfa_dir), "not a frozen-random-blocks run", "--freeze-blocks")
    proc = cli_in_process("diagnose", frozen_dir, "--baseline", narrow_frozen_dir)
    assert_one_error_line(proc, "architecture differs", "(width)")


# --------------------------------------------------------------------------------------------
# 4. A checkpoint without its feedback matrices is refused
# --------------------------------------------------------------------------------------------

def test_cli_refuses_missing_feedback(cli_wave, no_feedback_dir):
    line = assert_one_error_line(cli_wave["missing"], "feedback matrices missing", "feedback_embed")
    assert "feedback_block1" in line
    assert not (no_feedback_dir / DIAGNOSIS).exists()
    assert not (no_feedback_dir / BASELINE_DIR).exists()


def test_library_refuses_model_without_feedback(runs, digits):
    run = private(runs("dfa"))
    del run.model._buffers["feedback_block0"]
    with pytest.raises(CheckpointError, match="feedback matrices missing"):
        diagnose(run, FAST, baseline=None, data=digits)


# --------------------------------------------------------------------------------------------
# 5. Measurement precision: float16 refused, bfloat16 and float32 accepted
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["float16", "fp16", "half", "FLOAT16", "torch.float16"])
def test_float16_refused(name):
    with pytest.raises(DiagnosisError, match="refused.*float32 or bfloat16"):
        measure_dtype(name)
    with pytest.raises(DiagnosisError, match="refused"):
        Settings(dtype=name)


def test_measure_dtypes_and_settings_validation():
    assert measure_dtype("float32") is torch.float32 and measure_dtype("fp32") is torch.float32
    assert measure_dtype("bfloat16") is torch.bfloat16 and measure_dtype("bf16") is torch.bfloat16
    assert measure_dtype("float64") is torch.float64
    with pytest.raises(DiagnosisError, match="unknown measurement dtype 'int8'"):
        measure_dtype("int8")
    with pytest.raises(DiagnosisError, match="at least 2 batches"):
        Settings(batches=1)
    with pytest.raises(DiagnosisError, match="eps must be > 0"):
        Settings(eps=0.0)
    with pytest.raises(DiagnosisError, match="null_draws"):
        Settings(null_draws=-1)


def test_cli_refuses_float16(cli_wave, no_feedback_dir):
    # refused before the checkpoint is read: the line names float16, not the missing feedback
    line = assert_one_error_line(cli_wave["half"], "float16", "refused")
    assert "feedback" not in line
    assert not (no_feedback_dir / DIAGNOSIS).exists()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_bfloat16_and_float32_measure(runs, digits, dtype):
    result = diagnose(runs("dfa"), dataclasses.replace(FAST, dtype=dtype), baseline=None, data=digits)
    consistent(result)
    assert result["settings"]["dtype"] == dtype
    for name, stage in result["stages"].items():
        assert stage["degenerate"] is False, name
        assert math.isfinite(stage["gamma"]) and -1 <= stage["gamma"] <= 1, name
        assert math.isfinite(stage["h_norm"]) and stage["h_norm"] > 0, name
    for name, layer in result["layers"].items():
        assert layer["gamma"] is None or math.isfinite(layer["gamma"]), name


# --------------------------------------------------------------------------------------------
# 6. Every norm names its dim
# --------------------------------------------------------------------------------------------

TORCH_OWNERS = {"torch", "torch.linalg", "linalg"}


def norms_without_dim(source: str, filename: str = "<src>") -> list[str]:
    """Calls to torch.linalg.vector_norm / torch.norm / torch.linalg.norm / x.norm that leave dim
    implicit. dim is keyword `dim`, or positional: third for the functions (input, ord|p, dim),
    second for the method (p, dim)."""
    bad = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in ("vector_norm", "norm"):
            function = func.attr == "vector_norm" or ast.unparse(func.value) in TORCH_OWNERS
        elif isinstance(func, ast.Name) and func.id == "vector_norm":
            function = True
        else:
            continue
        positional = [a for a in node.args if not isinstance(a, ast.Starred)]
        named = any(k.arg == "dim" for k in node.keywords)
        if not named and len(positional) <= (2 if function else 1):
            bad.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return bad


def test_norm_checker_flags_implicit_dims():
    flagged = ["torch.linalg.vector_norm(x)", "torch.linalg.vector_norm(x, 2)", "torch.norm(x)",
               "torch.norm(x, 'fro')", "torch.linalg.norm(x)", "x.norm()", "x.flatten().norm(2)",
               "vector_norm(x, ord=2)", "torch.linalg.vector_norm(x, **kw)"]
    fine = ["torch.linalg.vector_norm(x, dim=1)", "torch.linalg.vector_norm(x, 2, 0)", "torch.norm(x, dim=0)",
            "torch.linalg.norm(x, 2, (0, 1))", "x.norm(dim=1)", "x.norm(2, 1)", "vector_norm(x, dim=0)",
            "F.layer_norm(x, (4,))", "row_norms(x)"]
    for src in flagged:
        assert norms_without_dim(src), src
    for src in fine:
        assert not norms_without_dim(src), src


def test_diagnostics_norms_name_their_dim():
    files = sorted((REPO / "edgefa" / "diagnostics").rglob("*.py")) + [REPO / "edgefa" / "training" / "alignment.py"]
    assert {f.name for f in files} >= {"alignment.py", "diagnosis.py"}
    bad = [line for f in files for line in norms_without_dim(f.read_text(encoding="utf-8"), str(f))]
    assert bad == []


def test_row_norms_is_the_mean_of_per_sample_norms():
    t = torch.zeros(5, 4)
    t[0, 0] = 100.0
    t[1:, 1] = 1.0                                          # rows of norm 100, 1, 1, 1, 1
    norms = row_norms(t)
    assert norms.dtype == torch.float64 and norms.shape == (5,)
    assert norms.tolist() == [100.0, 1.0, 1.0, 1.0, 1.0]
    assert float(norms.mean()) == pytest.approx(104 / 5, abs=1e-12)                  # 20.8
    assert float(norms.mean()) != pytest.approx(frobenius(t) / math.sqrt(5), rel=1e-3)  # 44.7
    assert float(norms.mean()) != pytest.approx(frobenius(t), rel=1e-3)                  # 100.02
    # a sample with more than one dim is flattened: the norm over all of its entries
    cube = torch.full((3, 2, 2), 0.5)
    cube[2] *= 6
    assert row_norms(cube).tolist() == pytest.approx([1.0, 1.0, 6.0], abs=1e-12)


def test_h_norm_is_mean_of_row_norms_on_the_eval_batch(runs, digits):
    run = runs("dfa")
    settings = dataclasses.replace(FAST, eval_batch=64)
    result = diagnose(run, settings, baseline=None, data=digits)
    assert result["settings"]["eval_samples"] == 64
    X, _ = eval_tensors(run, digits, 128)
    hs, _ = run_stages(bp_twin(run.model, torch.float32), X[:64])
    other, _ = run_stages(bp_twin(run.model, torch.float32), X[64:128])
    assert [name for name, _ in stage_view(run.model)[1]] == list(result["stages"]) == STAGES
    for name, h in zip(STAGES, hs):
        expected = float(row_norms(h).mean())
        assert result["stages"][name]["h_norm"] == pytest.approx(expected, rel=1e-6), name
        assert expected != pytest.approx(frobenius(h) / 8.0, rel=1e-4), name      # not ||H||_F / sqrt(N)
    assert result["stages"]["block1"]["h_norm"] != pytest.approx(float(row_norms(other[-1]).mean()), rel=1e-4)
    norms = [result["stages"][n]["h_norm"] for n in STAGES]
    assert result["growth"]["ratios"] == pytest.approx([norms[1] / norms[0], norms[2] / norms[1]], rel=1e-9)


# --------------------------------------------------------------------------------------------
# 7. Every rule gets a verdict; the null calibration where there is feedback to redraw
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["bp", "fa", "dfa", "usf", "hybrid"])
def test_every_rule_gets_a_verdict(runs, digits, method):
    run = runs(method)
    result = diagnose(run, FAST, baseline=None, data=digits)
    consistent(result)
    assert result["verdict"] in {"trustworthy", "walk back"}
    assert result["run"]["method"] == method and result["run"]["model"] == "resmlp"
    assert result["run"]["epochs_trained"] == 2 and result["run"]["n_test"] == 450
    assert result["diagnostics"]["baseline"]["status"] == "skipped"
    assert list(result["stages"]) == STAGES
    if method in ("fa", "dfa", "hybrid"):
        assert result["null"]["draws"] == FAST.null_draws and "not_applicable" not in result["null"]
        for name, stage in result["stages"].items():
            if not stage["degenerate"]:
                assert stage["null"]["draws"] == FAST.null_draws, name
                assert -1 <= stage["null"]["mean"] <= 1, name
    else:
        assert result["null"]["draws"] == 0
        assert method in result["null"]["not_applicable"]
        assert all("null" not in s for s in result["stages"].values())
        assert all("null" not in layer for layer in result["layers"].values())


def test_mlp_baseline_not_applicable(runs, digits):
    run = runs("dfa", model="mlp", hidden=[32, 16])
    result = diagnose(run, FAST, baseline=None, data=digits)
    consistent(result)
    d = result["diagnostics"]["baseline"]
    assert d["status"] == "not applicable" and d["fired"] is False and d["value"] is None
    assert "no residual blocks" in d["detail"]
    assert result["run"]["model"] == "mlp"
    assert list(result["stages"]) == ["hidden_layers.0", "hidden_layers.1"]


# --------------------------------------------------------------------------------------------
# 8. The CLI end to end: diagnosis.json, the cached baseline, reused
# --------------------------------------------------------------------------------------------

def test_cli_end_to_end_trains_and_caches_the_baseline(first_diagnosis, dfa_dir):
    proc = first_diagnosis["proc"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verdict:" in proc.stdout and "diagnosis:" in proc.stdout
    first = first_diagnosis["saved"]
    assert first["schema"] == SCHEMA == "edgefa.diagnosis/1"
    consistent(first)
    assert f"verdict: {first['verdict']}" in proc.stdout
    assert first["settings"]["null_draws"] == 3 and first["settings"]["probes"] == 16
    assert first["null"]["draws"] == 3
    assert first["diagnostics"]["baseline"]["status"] in ("fired", "passed")   # a baseline was trained
    assert first["diagnostics"]["baseline"]["threshold"] == 0.02               # --margin is in points
    assert first_diagnosis["cached_mtime"] is not None                          # RUN/frozen_baseline/checkpoint.pt
    cached = load_run(dfa_dir / BASELINE_DIR)
    assert cached.config.freeze_blocks is True and cached.config.method == "dfa"
    assert first["diagnostics"]["baseline"]["baseline_accuracy"] == cached.metrics["final_test_accuracy"]


def test_cli_subprocess_reuses_the_cached_baseline(first_diagnosis, cli_wave, dfa_dir):
    proc = cli_wave["again"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "verdict:" in proc.stdout
    assert (dfa_dir / BASELINE_DIR / CHECKPOINT).stat().st_mtime_ns == first_diagnosis["cached_mtime"]
    again, first = json.loads((dfa_dir / DIAGNOSIS).read_text()), first_diagnosis["saved"]
    assert again["schema"] == SCHEMA
    assert f"verdict: {again['verdict']}" in proc.stdout
    assert again["diagnostics"]["baseline"]["baseline_accuracy"] == \
        first["diagnostics"]["baseline"]["baseline_accuracy"]
    assert again["verdict"] == first["verdict"] and again["fired"] == first["fired"]
    for name, stage in again["stages"].items():
        assert stage["gamma"] == pytest.approx(first["stages"][name]["gamma"], abs=1e-6), name


# --------------------------------------------------------------------------------------------
# 9. stream_growth on hand-made norms
# --------------------------------------------------------------------------------------------

def test_stream_growth_known_answers():
    g = stream_growth([1.0, 2.0, 200.0])
    assert g == {"ratios": [2.0, 100.0], "max": 100.0, "total": 200.0}
    assert stream_growth([4.0]) == {"ratios": [], "max": None, "total": None}
    for norms in ([0.0, 1.0], [1.0, 0.0, 3.0], [1.0, math.inf], [1.0, math.nan, 2.0], [2.0, 1.0, math.inf]):
        assert stream_growth(norms)["max"] == math.inf, norms
    assert stream_growth([0.0, 1.0])["total"] == math.inf
    assert stream_growth([1.0, math.inf])["total"] == math.inf


def test_stream_growth_infinite_first_norm():
    assert stream_growth([math.inf, 1.0])["max"] == math.inf
