"""tegrastats lines as Jetsons print them, in both formats: the rails, and the total never summed."""

from __future__ import annotations

from edgefa.profiling.tegrastats import parse_tegrastats

NANO_JP4 = ("RAM 1215/3964MB (lfb 482x4MB) SWAP 0/1982MB (cached 0MB) CPU [9%@102,2%@102,1%@102,0%@102] "
            "EMC_FREQ 0% GR3D_FREQ 0% PLL@22C CPU@24.5C PMIC@100C GPU@23.5C AO@31C thermal@24C "
            "POM_5V_IN 4096/3500 POM_5V_GPU 0/0 POM_5V_CPU 1096/1048")
XAVIER_NX_JP4 = ("RAM 2348/7765MB (lfb 1014x4MB) SWAP 0/3883MB (cached 0MB) CPU [2%@1190,1%@1190,off,off,off,off] "
                 "EMC_FREQ 0% GR3D_FREQ 0% AUX@31C CPU@33C thermal@32.2C AO@31.5C GPU@31C PMIC@100C "
                 "VDD_IN 4091/4091 VDD_CPU_GPU_CV 656/656 VDD_SOC 1269/1269")
ORIN_NANO_JP6 = ("11-25-2026 15:30:21 RAM 2016/7620MB (lfb 1232x4MB) SWAP 0/3810MB (cached 0MB) "
                 "CPU [1%@729,0%@729,0%@729,1%@729,off,off] GR3D_FREQ 0% cpu@47.937C soc2@46.968C "
                 "VDD_IN 5704mW/5704mW VDD_CPU_GPU_CV 1154mW/1154mW VDD_SOC 1473mW/1473mW")
AGX_ORIN_JP5 = ("RAM 3153/30536MB (lfb 6710x4MB) SWAP 0/15268MB (cached 0MB) CPU [0%@729,0%@729] "
                "GR3D_FREQ 0% CV0@-256C CPU@45.5C VDD_GPU_SOC 2390mW/2390mW VDD_CPU_CV 398mW/398mW "
                "VIN_SYS_5V0 2991mW/2991mW NC 0mW/0mW VDDQ_VDD2_1V8AO 302mW/302mW")


def test_jetpack4_unitless_rails_and_the_input_rail_is_the_total():
    s = parse_tegrastats(NANO_JP4)
    assert set(s.rails) == {"POM_5V_IN", "POM_5V_GPU", "POM_5V_CPU"}      # RAM and SWAP are not rails
    assert (s.rails["POM_5V_IN"].now_mw, s.rails["POM_5V_IN"].average_mw) == (4096, 3500)
    assert s.units == "unitless (mW)"
    assert s.total_rail == "POM_5V_IN" and s.total_mw == 4096             # not 4096 + 0 + 1096


def test_xavier_nx_vdd_in_is_the_total():
    s = parse_tegrastats(XAVIER_NX_JP4)
    assert s.total_rail == "VDD_IN" and s.total_mw == 4091
    assert s.rails["VDD_SOC"].average_mw == 1269


def test_jetpack6_milliwatt_format():
    s = parse_tegrastats(ORIN_NANO_JP6)
    assert s.units == "mW"
    assert s.total_mw == 5704
    assert s.rails["VDD_CPU_GPU_CV"].now_mw == 1154


def test_a_line_without_an_input_rail_has_no_total_rather_than_a_sum():
    s = parse_tegrastats(AGX_ORIN_JP5)
    assert s.total_rail is None and s.total_mw is None
    assert s.rails["VIN_SYS_5V0"].now_mw == 2991 and len(s.rails) == 5


def test_a_line_without_rails_is_none():
    assert parse_tegrastats("RAM 1215/3964MB (lfb 482x4MB) SWAP 0/1982MB (cached 0MB)") is None
    assert parse_tegrastats("") is None
