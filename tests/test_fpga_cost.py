"""The MAC-array cost model (edgefa.fpga_sim.cost): hand-computed cycle and BRAM counts, the DSP rule at
its boundaries, monotonicity, DFA against BP, the LFSR saving, and the `edgefa fpga cost` CLI."""

from __future__ import annotations

import json
import math

import pytest

from conftest import assert_one_error_line, run_all, run_edgefa
from edgefa.bundle import read_bundle
from edgefa.errors import EdgefaError
from edgefa.fpga_sim.cost import (ENERGY_LABEL, MacArray, add_pj, bram36_blocks, compare, cost_report,
                                  dsp48e2_count, matmul_cycles, mul_pj, parse_array, parse_clock,
                                  sram_pj_per_bit)


def mlp(in_features: int, *widths: int) -> dict:
    """A bundle-style model dict: in_features -> widths..., the last width is the head (n_classes)."""
    dims = [in_features, *widths]
    names = [f"fc{i}" for i in range(len(widths) - 1)] + ["head"]
    return {"kind": "mlp", "in_features": in_features, "n_classes": widths[-1], "activation": "relu",
            "layers": [{"name": n, "in": a, "out": b} for n, a, b in zip(names, dims[:-1], dims[1:])]}


def cycles(report: dict) -> dict:
    return {name: ph["cycles"] for name, ph in report["phases"].items()}


# --- known answers, computed by hand --------------------------------------------------------

def test_one_layer_model_on_a_4x4_array_by_hand():
    # 8 -> 4 (head only), batch 4, 4x4 array, no momentum.
    # forward   [4,8]x[8,4]: 1 tile, K=8, fill/drain 4+4              -> 8 + 8          = 16
    # error     2 passes over 4*4 logits on 4 lanes                    -> 2 * ceil(16/4) = 8
    # e B       no hidden layer                                        -> 0
    # outer     delta^T h: [4,4]x[4,9] (9 = 8 inputs + the bias column): ceil(4/4)*ceil(9/4) = 3 tiles of
    #           K=4 -> 12, fill/drain ceil(9/4)*4 + ceil(4/4)*9 = 12 + 9 = 21 -> 33
    # update    4*9 parameters on 4 lanes                              -> 9
    # total 16 + 8 + 0 + 33 + 9 = 66; inference (batch 1): [1,8]x[8,4] -> 8 + 1 + 4 = 13
    r = cost_report(mlp(8, 4), MacArray(4, 4), "dfa", batch=4, momentum=0.0)
    assert cycles(r) == {"forward": 16, "output_error": 8, "projection": 0, "outer_products": 33, "update": 9}
    assert r["train_step"]["cycles"] == 66
    assert r["inference"]["cycles"] == 13
    assert r["train_step"]["latency_s"] == pytest.approx(66 / 200e6)
    assert r["memory"]["tensors"]["momentum"]["elements"] == 0          # mu = 0 keeps no velocity
    assert r["memory"]["tensors"]["feedback"]["elements"] == 0          # no hidden layer, no B
    # with one layer DFA and BP are the same computation
    assert cycles(cost_report(mlp(8, 4), MacArray(4, 4), "bp", batch=4, momentum=0.0)) == cycles(r)


def test_three_layer_model_dfa_and_bp_by_hand():
    # 8 -> 6 -> 5 -> 3, batch 5, 4x4 array; cycles = ceil(M/R)ceil(N/C)K + ceil(N/C)M + ceil(M/R)N
    # forward  fc0 [5,8]x[8,6]: 4*8 + 2*5 + 2*6 = 54; fc1 [5,6]x[6,5]: 4*6 + 10 + 10 = 44;
    #          head [5,5]x[5,3]: 2*5 + 1*5 + 2*3 = 21                                  -> 119
    # error    2 * ceil(15/4)                                                          -> 8
    # DFA e B  one matmul [5,3]x[3,6+5]: 2*3 tiles * 3 + 3*5 + 2*11 = 18 + 15 + 22      -> 55
    # BP       delta_fc1 = [5,3]x[3,5]: 4*3 + 10 + 10 = 32, then delta_fc0 = [5,5]x[5,6]: 4*5 + 10 + 12 = 42
    #                                                                                  -> 74
    # outer    fc0 [6,5]x[5,9]: 6*5 + 3*6 + 2*9 = 66; fc1 [5,5]x[5,7]: 4*5 + 10 + 14 = 44;
    #          head [3,5]x[5,6]: 2*5 + 2*3 + 1*6 = 22                                  -> 132
    # update   ceil(54/4) + ceil(35/4) + ceil(18/4) = 14 + 9 + 5                        -> 28
    model, array = mlp(8, 6, 5, 3), MacArray(4, 4)
    dfa = cost_report(model, array, "dfa", batch=5)
    bp = cost_report(model, array, "bp", batch=5)
    assert cycles(dfa) == {"forward": 119, "output_error": 8, "projection": 55, "outer_products": 132, "update": 28}
    assert cycles(bp) == {"forward": 119, "output_error": 8, "projection": 74, "outer_products": 132, "update": 28}
    assert (dfa["train_step"]["cycles"], bp["train_step"]["cycles"]) == (342, 361)
    # MACs: DFA's projection is B*n*sum(widths) = 5*3*11; BP's 5*(3*5 + 5*6)
    assert (dfa["phases"]["projection"]["macs"], bp["phases"]["projection"]["macs"]) == (165, 225)
    assert bp["phases"]["projection"]["matmuls"] == 2 and dfa["phases"]["projection"]["matmuls"] == 1


def test_a_non_square_array_maps_the_output_the_cheaper_way_round():
    # [1,10]x[10,8] on 8 rows x 2 cols: batch on rows -> 4 tiles: 4*10 + 4*1 + 1*8 = 52;
    # the 8 outputs on rows -> 1 tile: 10 + 1*8 + 1*1 = 19
    r = matmul_cycles(1, 10, 8, 8, 2)
    assert (r["cycles"], r["tiles"], r["macs"]) == (19, 1, 80)
    assert matmul_cycles(4, 8, 4, 4, 4)["cycles"] == 16                  # one full tile: K + R + C


def test_bigger_arrays_never_take_more_cycles():
    model = mlp(64, 32, 16, 10)
    sizes = (1, 2, 3, 4, 7, 8, 16, 32)
    table = {(r, c): {rule: cost_report(model, MacArray(r, c), rule, batch=7) for rule in ("dfa", "bp")}
             for r in sizes for c in sizes}
    for (r, c), reports in table.items():
        for (r2, c2), bigger in table.items():
            if r2 >= r and c2 >= c:
                for rule in ("dfa", "bp"):
                    small, big = reports[rule], bigger[rule]
                    assert big["train_step"]["cycles"] <= small["train_step"]["cycles"], (rule, r, c, r2, c2)
                    assert big["inference"]["cycles"] <= small["inference"]["cycles"]
                    for name in small["phases"]:
                        assert big["phases"][name]["cycles"] <= small["phases"][name]["cycles"], (name, r, c, r2, c2)
    assert table[(32, 32)]["dfa"]["train_step"]["cycles"] < table[(1, 1)]["dfa"]["train_step"]["cycles"] / 50


# --- DSP and LUT rule --------------------------------------------------------------------------

def test_dsp_rule_at_its_boundaries():
    assert dsp48e2_count(9, 9) == 0 and dsp48e2_count(8, 8) == 0 and dsp48e2_count(2, 9) == 0   # LUTs
    assert dsp48e2_count(10, 9) == 1 and dsp48e2_count(9, 10) == 1
    assert dsp48e2_count(27, 18) == 1 and dsp48e2_count(18, 27) == 1 and dsp48e2_count(16, 16) == 1
    assert dsp48e2_count(27, 19) == 2 and dsp48e2_count(28, 18) == 2
    assert dsp48e2_count(32, 32) == 4          # ceil(32/27) * ceil(32/18) = 2 * 2
    assert dsp48e2_count(54, 36) == 4 and dsp48e2_count(55, 36) == 6

    r9 = cost_report(mlp(8, 4), MacArray(4, 4, data_bits=9, acc_bits=24), "dfa", batch=2)["resources"]
    assert (r9["dsp"], r9["multiplier_in"]) == (0, "luts")
    assert r9["lut_per_pe"] == 9 * 9 + 24                   # a*b LUT6 multiplier + a fabric accumulator
    assert r9["lut"] == 16 * r9["lut_per_pe"] + 4 * 81      # 16 PEs + 4 vector lanes
    r32 = cost_report(mlp(8, 4), MacArray(4, 4, data_bits=32, acc_bits=64), "dfa", batch=2)["resources"]
    assert r32["dsp"] == 4 * 16 + 4 * 4                     # 4 per PE, 4 per vector lane
    assert r32["lut_per_pe"] == 64                          # accumulator wider than the DSP's 48 bits


def test_more_bits_never_fewer_dsps():
    previous = -1
    for bits in range(1, 33):
        array = MacArray(8, 8, data_bits=bits, acc_bits=64)
        dsp = cost_report(mlp(16, 8, 4), array, "dfa", batch=4)["resources"]["dsp"]
        assert dsp >= previous, bits
        previous = dsp
    assert previous == 4 * (64 + 8)


# --- BRAM36 -------------------------------------------------------------------------------

def test_bram36_counts_by_hand():
    assert bram36_blocks(0, 16, 16) == 0
    assert bram36_blocks(1000, 16, 4) == 1          # 64 bits wide, 250 deep: one 512x72
    assert bram36_blocks(4096, 16, 16) == 4         # 256 bits wide, 256 deep: ceil(256/72) = 4 of 512x72
    assert bram36_blocks(40000, 8, 1) == 10         # 8 wide, 40000 deep: 4Kx9 -> ceil(40000/4096) = 10
    assert bram36_blocks(1024, 36, 1) == 1 and bram36_blocks(1025, 36, 1) == 2
    assert bram36_blocks(32768, 1, 1) == 1 and bram36_blocks(32769, 1, 1) == 2
    # the demo's 64-256-256-10 weights + biases: 256*65 + 256*257 + 10*257 = 85002 16-bit words, 16 lanes:
    # 256 bits x 5313 deep -> 512x72: 4 * ceil(5313/512) = 44 (1Kx36: 8*6 = 48; 2Kx18: 15*3 = 45)
    r = cost_report(mlp(64, 256, 256, 10), MacArray(16, 16), "dfa", batch=32)
    w = r["memory"]["tensors"]["weights"]
    assert (w["elements"], w["bytes"], w["bram36"]) == (85002, 170004, 44)


def test_what_does_not_fit_spills_to_dram():
    model = mlp(64, 256, 256, 10)
    big = cost_report(model, MacArray(16, 16, onchip_kib=4096), "dfa", batch=32)
    assert big["memory"]["fits"] and big["memory"]["dram_bytes_per_step"] == 0
    none = cost_report(model, MacArray(16, 16, onchip_kib=0), "dfa", batch=32)
    t = none["memory"]["tensors"]
    assert not none["memory"]["fits"] and none["memory"]["on_chip_bytes"] == 0
    expected = (3 * t["weights"]["bytes"] + 2 * t["momentum"]["bytes"] + t["feedback"]["bytes"]
                + 3 * t["activations"]["bytes"] + 2 * t["errors"]["bytes"])
    assert none["memory"]["dram_bytes_per_step"] == expected
    assert none["train_step"]["energy_breakdown_j"]["dram"] == pytest.approx(expected / 8 * 1.95e-9)
    assert none["train_step"]["energy_j"] > big["train_step"]["energy_j"]
    # partial: momentum goes first
    some = cost_report(model, MacArray(16, 16, onchip_kib=big["memory"]["bram36_needed"] * 4.5 - 1), "dfa", batch=32)
    assert not some["memory"]["tensors"]["momentum"]["on_chip"] and some["memory"]["tensors"]["weights"]["on_chip"]


# --- energy ---------------------------------------------------------------------------------------

def test_energy_rules_pass_through_the_cited_points():
    assert mul_pj(8) == pytest.approx(0.2) and mul_pj(32) == pytest.approx(3.1)
    assert add_pj(8) == pytest.approx(0.03) and add_pj(32) == pytest.approx(0.1)
    assert 0.2 < mul_pj(16) < 3.1 and mul_pj(16) == pytest.approx(0.2 * 2 ** (math.log(15.5) / math.log(4)))
    assert sram_pj_per_bit(1024) == sram_pj_per_bit(8192) == pytest.approx(10 / 64)
    assert sram_pj_per_bit(32 * 1024) == pytest.approx(20 / 64)
    assert sram_pj_per_bit(1 << 20) == pytest.approx(100 / 64)
    r = cost_report(mlp(8, 6, 3), MacArray(4, 4), "dfa", batch=4)
    assert r["energy_basis"] == ENERGY_LABEL == "model (Horowitz ISSCC 2014, 45 nm)"
    assert "Horowitz" in r["energy_source"] and r["kind"] == "model"
    assert r["train_step"]["energy_j"] == pytest.approx(sum(r["train_step"]["energy_breakdown_j"].values()))
    # MAC energy: every MAC costs one 16x16 multiply and one 32-bit add
    assert r["train_step"]["energy_breakdown_j"]["mac"] == pytest.approx(
        r["train_step"]["macs"] * (mul_pj(16) + add_pj(32)) * 1e-12)


# --- DFA against BP; the LFSR ---------------------------------------------------------------------

def test_lfsr_saves_exactly_the_feedback_bytes_and_bp_needs_more_storage(tiny_bundle_master):
    b = read_bundle(tiny_bundle_master)
    widths = [layer["out"] for layer in b.model["layers"][:-1]]
    for bits in (8, 16):
        array = MacArray(16, 16, data_bits=bits)
        result = compare(b.model, array, batch=32, feedback="stored", momentum=0.9)
        feedback_bytes = b.model["n_classes"] * sum(widths) * bits // 8
        assert result["dfa"]["memory"]["tensors"]["feedback"]["bytes"] == feedback_bytes
        assert result["lfsr_saving"]["feedback_bytes"] == feedback_bytes
        assert result["lfsr_saving"]["working_set_bytes_saved"] == feedback_bytes
        assert result["lfsr_saving"]["generators"] == 16 and result["lfsr_saving"]["ff"] == 16 * 32
        lfsr = cost_report(b.model, array, "dfa", 32, "lfsr", 0.9)
        assert lfsr["memory"]["tensors"]["feedback"]["bytes"] == 0
        assert lfsr["train_step"]["energy_breakdown_j"]["lfsr"] > 0
        assert lfsr["train_step"]["cycles"] == result["dfa"]["train_step"]["cycles"]

        dfa, bp = result["dfa"], result["bp"]
        sizes = [r["memory"]["working_set_bytes"] for r in (bp, dfa, lfsr)]
        assert sizes[0] > sizes[1] > sizes[2], sizes
        # BP's extra: the transposed copy of every weight matrix but the first (32*16 + 16*10 words)
        assert bp["memory"]["tensors"]["weights_t"]["elements"] == 32 * 16 + 16 * 10
        assert bp["train_step"]["cycles"] >= dfa["train_step"]["cycles"]
        assert bp["train_step"]["energy_j"] > dfa["train_step"]["energy_j"]


def test_bad_arguments_raise_one_library_error():
    for bad in ("0x4", "4x0", "16", "axb", "-1x4", "16x16x2"):
        with pytest.raises(EdgefaError):
            parse_array(bad)
    assert parse_array("16x16") == (16, 16) and parse_array(" 8X32 ") == (8, 32)
    assert parse_clock("200MHz") == 200e6 and parse_clock("1.5GHz") == 1.5e9 and parse_clock("200e6") == 200e6
    assert parse_clock("100 kHz") == 1e5
    for bad in ("fast", "0MHz", "-5MHz", "200THz", ""):
        with pytest.raises(EdgefaError):
            parse_clock(bad)
    for kwargs in ({"data_bits": -1}, {"data_bits": 0}, {"data_bits": 33}, {"acc_bits": 65}, {"acc_bits": 8},
                   {"rows": 0}, {"clock_hz": 0.0}, {"onchip_kib": -1.0}):
        with pytest.raises(EdgefaError):
            MacArray(**kwargs)
    with pytest.raises(EdgefaError):
        cost_report(mlp(8, 4), MacArray(), "dfa", batch=0)
    with pytest.raises(EdgefaError):
        cost_report(mlp(8, 4), MacArray(), "sgd", batch=4)


# --- the CLI ------------------------------------------------------------------------------------------

def test_fpga_cost_cli_prints_dfa_against_bp_and_writes_json(tiny_bundle_master, tmp_path):
    out = tmp_path / "cost.json"
    proc = run_edgefa("fpga", "cost", tiny_bundle_master, "--array", "16x16", "--clock", "200MHz",
                      "--data-bits", "16", "--acc-bits", "32", "--batch", "32", "--json", out, without_torch=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    for fragment in ("fpga cost (model)", "DFA (stored B)", "BP", "DFA / BP", "cycles per training step",
                     "e B (all layers at once)", "delta W^T (layer by layer)", "BRAM36", "DSP48E2",
                     "model (Horowitz ISSCC 2014, 45 nm)", "--feedback lfsr", "weights_t"):
        assert fragment in text, (fragment, text)
    r = json.loads(out.read_text())
    assert r["energy_basis"] == "model (Horowitz ISSCC 2014, 45 nm)"
    assert r["dfa"]["array"]["rows"] == 16 and r["dfa"]["array"]["clock_hz"] == 200e6
    assert r["dfa"]["momentum"] == read_bundle(tiny_bundle_master).manifest["optimizer"]["momentum"]
    assert f"{r['dfa']['train_step']['cycles']:,}" in text and f"{r['bp']['train_step']['cycles']:,}" in text
    assert r["dfa"]["assumptions"] and set(r["dfa"]["phases"]) == {"forward", "output_error", "projection",
                                                                    "outer_products", "update"}


def test_fpga_cost_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    # the arguments are checked before the bundle is read, so any existing folder will do
    cases = [("--array", "0x4"), ("--clock", "fast"), ("--data-bits", "-3"), ("--acc-bits", "65")]
    procs = run_all(*[("fpga", "cost", str(tmp_path), *case) for case in cases])
    for (option, value), proc in zip(cases, procs):
        assert_one_error_line(proc, option, value)
