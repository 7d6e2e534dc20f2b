"""The accuracy-table and step-ratio benchmarks run end to end in --quick mode and write JSON and
markdown of the documented shape (both scripts at once, each in its own process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _start(script: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


def test_accuracy_table_and_step_ratio_quick(tmp_path):
    # the accuracy table through the worker pool (2 spawned workers), 2 runs; the step ratio on
    # small models, bp against dfa and usf. Most of the time is process start-up (torch), hence so
    # few runs.
    acc = _start("accuracy_table.py", "--quick", "--jobs", "2", "--models", "mlp", "--rules", "bp,hybrid",
                 "--device-finetune", "10", "--out", str(tmp_path / "acc"))
    step = _start("step_ratio.py", "--quick", "--threads", "1", "--rules", "bp,dfa,usf", "--models",
                  "resmlp,transformer", "--out", str(tmp_path / "step"))
    acc_out, step_out = _finish(acc), _finish(step)

    table = json.loads((tmp_path / "acc" / "accuracy_table_quick.json").read_text())
    assert table["benchmark"] == "accuracy_table"
    assert table["config"]["datasets"] == ["digits"] and table["config"]["seeds"] == [0]
    assert table["config"]["settings"]["digits/mlp"]["epochs"] == 2
    assert table["machine"]["cpu_model"] and table["torch"]
    assert table["config"]["jobs"] == 2 and table["config"]["threads_per_worker"] == 1
    assert len(table["runs"]) == 2, acc_out
    for row in table["runs"]:
        assert "error" not in row, row
        assert 0.0 <= row["final_test_accuracy"] <= 1.0 and row["wall_s"] > 0
        assert len(row["test_accuracy_per_epoch"]) == 2 and row["feedback_seed"] == row["seed"] + 1
        # exported, fine-tuned 10 steps in the device runtime on the shifted held-out digits
        tuned = row["device_finetune"]
        assert "error" not in tuned, tuned
        assert tuned["steps"] == 10 and tuned["shift"].startswith("shift (1, 0) px") and tuned["refused_steps"] == 0
        assert tuned["n_device_train"] + tuned["n_device_test"] == row["n_test"]
        for key in ("before", "after_device_dfa", "after_host_bp"):
            assert 0.0 <= tuned[key] <= 1.0
    assert all(row["worker_pid"] != acc.pid for row in table["runs"])  # ran in the workers
    aggs = {(a["model"], a["rule"]): a for a in table["aggregates"]}
    assert set(aggs) == {("mlp", "bp"), ("mlp", "hybrid")}
    for a in aggs.values():
        assert a["n"] == 1 and a["std_ddof1"] is None and a["mean"] == a["accuracies"][0]
    md = (tmp_path / "acc" / "accuracy_table_quick.md").read_text()
    assert "| data set | model | epochs | lr | bp | hybrid-10 | published BP |" in md
    assert md.count("\n| digits |") == 3                # the accuracy row, then one device row per rule
    assert "| data set | model | pretrained by | sensor shift |" in md

    ratio = json.loads((tmp_path / "step" / "step_ratio_quick.json").read_text())
    assert ratio["benchmark"] == "step_ratio" and ratio["config"]["threads"] == 1
    assert ratio["machine"]["threads"]["torch_intra_op"] == 1
    for model in ("resmlp", "transformer"):
        res = ratio["results"]["cpu"][model]
        assert set(res["ratios"]) == {"dfa", "usf"}
        for r in ("dfa", "usf"):
            s = res["ratios"][r]
            assert s["ratio"] == f"{r}/bp per pair" and s["ratio_stats"]["n"] >= 1
            assert s["ratio_stats"]["median"] > 0 and s["backward_flops_ratio"] > 0
            assert set(s["bootstrap_ci_of_median"]) >= {"lo", "hi"}
        assert all(v["all_losses_finite"] for v in res["numerics"].values())
        assert res["flops_per_step"]["bp"]["backward"] > 0
    assert "dfa" in ratio["notes"] and "LayerNorm" in ratio["notes"]["dfa"]
    md = (tmp_path / "step" / "step_ratio_quick.md").read_text()
    assert "| cpu | resmlp" in md and "| cpu | transformer" in md, step_out


def test_feature_cache_quick(tmp_path):
    # a smaller CNN, 4 pairs: the JSON says what each side includes and how many FLOPs the trunk holds
    out = _finish(_start("feature_cache.py", "--quick", "--out", str(tmp_path)))
    result = json.loads((tmp_path / "feature_cache_quick.json").read_text())
    assert result["benchmark"] == "feature_cache" and result["machine"]["cpu_model"], out
    assert 0.5 < result["flops"]["trunk_share_of_forward"] < 1
    assert result["epoch"]["ratio_stats"]["n"] >= 4 and result["epoch"]["feature_cache"]["filled"] == 128
    assert set(result["epoch"]["includes"]) == {"cached", "uncached"}
    assert set(result["step"]["includes"]) == {"device_head", "torch_part", "device_whole", "torch_frozen_trunk"}
    assert result["step"]["all_device_steps_accepted"] and result["step"]["all_losses_finite"]
    assert set(result["verdict"]) >= {"epoch_ratio_median", "epoch_met", "step_ratio_median", "step_met"}


def test_run_all_reads_every_figure_from_the_committed_results_and_rewrites_only_its_table(tmp_path):
    # --table-only runs no benchmark: the table from benchmarks/results/*.json (the full runs). A
    # script whose JSON no longer has a key run_all's ROWS map reads shows "missing: KEY" and fails
    # here, so the mapping and the scripts' schemas cannot drift apart unnoticed.
    readme = tmp_path / "README.md"
    readme.write_text("# before\n\n<!-- bench:begin -->\nold table\n<!-- bench:end -->\n\n# after\n")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--full", "--table-only",
                           "--readme", str(readme)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = readme.read_text()
    assert text.startswith("# before\n\n<!-- bench:begin -->\nWritten by `benchmarks/run_all.py --full`")
    assert text.endswith("<!-- bench:end -->\n\n# after\n") and "old table" not in text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    # (anchor rows are new in issue 20: a results file from before it has none)
    assert len(rows) >= 15 and not [r for r in rows if ("missing:" in r or "not run" in r) and "anchor" not in r], rows
    assert all(r.split(" | ")[-1].rstrip(" |") in ("yes", "no", "-") for r in rows)
