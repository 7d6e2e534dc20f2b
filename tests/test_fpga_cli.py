"""`edgefa fpga simulate` and `edgefa fpga sweep` as a user runs them: a real second process where
`import torch` fails, on a real exported bundle; bad configs are one line and exit code 2."""

from __future__ import annotations

import json

from conftest import assert_one_error_line, run_all, run_edgefa


def test_simulate_reports_both_runs_sqnr_overflow_and_zeroed_updates(tiny_bundle, digits_npz, tmp_path):
    out = tmp_path / "sim.json"
    proc = run_edgefa("fpga", "simulate", tiny_bundle, "--data", digits_npz, "--steps", "15",
                      "--json", out, without_torch=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for heading in ("fixed point vs float32", "per-layer SQNR", "overflow per tensor class",
                    "weight updates rounded to zero", "ap_fixed<48,16,AP_TRN,AP_SAT>"):
        assert heading in proc.stdout, (heading, proc.stdout)
    r = json.loads(out.read_text())
    assert r["steps"] == 15 and set(r["accuracy_after"]) == {"fixed", "float32"}
    assert set(r["datapath_sqnr_db"]) == {"fc0", "fc1", "head"} == set(r["weight_sqnr_db"])
    # 16-bit datapath: ~80 dB where nothing saturates (the first layer); later layers of this
    # small net saturate a few activations of ap_fixed<16,6> (|a| > 32), which costs SQNR
    assert r["datapath_sqnr_db"]["fc0"] > 60 and all(db > 15 for db in r["datapath_sqnr_db"].values())
    # the default 16-bit formats follow float32 closely on this small run
    assert abs(r["accuracy_after"]["fixed"] - r["accuracy_after"]["float32"]) < 0.03
    assert set(r["overflow"]) == {"weights", "activations", "errors", "feedback", "gradients",
                                  "accumulators", "optimizer_state"}
    assert all(c["values"] > 0 for c in r["overflow"].values())
    assert 0 < r["updates_rounded_to_zero"] < r["updates"]


def test_overflow_counts_show_up_when_a_format_is_too_narrow(tiny_bundle, digits_npz, tmp_path):
    config = tmp_path / "narrow.toml"
    config.write_text('[formats]\nactivations = "ap_fixed<8,2,AP_RND_CONV,AP_SAT>"\n'
                      'accumulators = { width = 24, int_bits = 2, overflow = "AP_WRAP" }\n')
    out = tmp_path / "sim.json"
    proc = run_edgefa("fpga", "simulate", tiny_bundle, "--data", digits_npz, "--steps", "3",
                      "--config", config, "--json", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert r["overflow"]["activations"]["overflowed"] > 0
    assert r["overflow"]["accumulators"]["overflowed"] > 0
    assert r["config"]["formats"]["accumulators"] == "ap_fixed<24,2,AP_TRN,AP_WRAP>"


def test_sweep_writes_table_plot_and_json(tiny_bundle, digits_npz, tmp_path):
    out = tmp_path / "sweep"
    proc = run_edgefa("fpga", "sweep", tiny_bundle, "--data", digits_npz, "--steps", "5", "--widths", "6,12",
                      "--rounding", "AP_RND_CONV,STOCHASTIC", "--out", out, without_torch=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "AP_RND_CONV" in proc.stdout and "STOCHASTIC" in proc.stdout and "float32 runtime" in proc.stdout
    r = json.loads((out / "sweep.json").read_text())
    assert r["schema"] == "edgefa.fpga-sweep/1"
    assert [(row["rounding"], row["width"]) for row in r["rows"]] == [
        ("AP_RND_CONV", 6), ("AP_RND_CONV", 12), ("STOCHASTIC", 6), ("STOCHASTIC", 12)]
    assert all(row["format"].startswith(f"ap_fixed<{row['width']},2,{row['rounding']},AP_SAT>") for row in r["rows"])
    md = (out / "sweep.md").read_text()
    assert md.startswith("| W (I = 2) | AP_RND_CONV | STOCHASTIC |") and "| 12 |" in md
    svg = (out / "sweep.svg").read_text()
    assert svg.startswith('<svg xmlns="http://www.w3.org/2000/svg"') and svg.count("<polyline") == 2
    assert "float32 runtime" in svg
    html = (out / "sweep.html").read_text()
    assert "<svg" in html and "Accuracy against word length" in html


BAD_CONFIGS = [
    ('[formats]\nweights = "ap_fixed<40,8>"\n', "weights", "wider than the 32 bits"),
    ('[formats]\naccumulators = "ap_fixed<65,8>"\n', "accumulators", "out of range: 1 to 64"),
    ('[formats]\nweights = { width = -4, int_bits = 2 }\n', "formats.weights", "out of range"),
    ('[formats]\nweights = "ap_fixed<16,4,AP_ROUND>"\n', "formats.weights", "unknown rounding mode 'AP_ROUND'"),
    ('[formats]\nweights = "ap_fixed<16,4,AP_RND,AP_CLAMP>"\n', "formats.weights", "unknown overflow mode"),
    ('[formats]\nweigths = "ap_fixed<16,4>"\n', "unknown tensor class formats.weigths", ""),
    ('[tables]\nmethod = "cubic"\n', "tables.method", "lut or pwl"),
    ('[learning_rate]\nmode = "adam"\n', "learning_rate.mode", ""),
    ('[formats\nweights = 1\n', "not valid TOML", ""),
]


def test_a_bad_config_is_one_line_and_exit_code_2(tiny_bundle, digits_npz, tmp_path):
    configs = []
    for i, (text, _, _) in enumerate(BAD_CONFIGS):
        configs.append(tmp_path / f"fxp{i}.toml")
        configs[-1].write_text(text)
    procs = run_all(*[("fpga", "simulate", tiny_bundle, "--data", digits_npz, "--steps", "1", "--config", c)
                      for c in configs])
    for proc, config, (text, where, what) in zip(procs, configs, BAD_CONFIGS):
        assert_one_error_line(proc, where, what, str(config))


def test_a_missing_config_file_and_a_bad_sweep_width_are_one_line(tiny_bundle, digits_npz, tmp_path):
    missing = run_edgefa("fpga", "simulate", tiny_bundle, "--data", digits_npz, "--config", tmp_path / "nope.toml")
    assert_one_error_line(missing, "no such file")
    wide = run_edgefa("fpga", "sweep", tiny_bundle, "--data", digits_npz, "--widths", "8,70", "--out", tmp_path / "s")
    assert_one_error_line(wide, "word length 70")
    assert not (tmp_path / "s").exists()                # refused before anything was written
    for bad in (("--steps", "0"), ("--widths", "8,x")):
        assert_one_error_line(run_edgefa("fpga", "sweep", tiny_bundle, "--data", digits_npz, *bad,
                                         "--out", tmp_path / "s"), bad[0])
