"""Cost model of a MAC-array accelerator running one DFA (or BP) training step. Pure stdlib.

Every figure here is a *model*, never a measurement or a synthesis result:

    array      R x C output-stationary processing elements (PE = one data x data multiplier and
               one acc-bit accumulator). A [M,K] x [K,N] matmul is cut into output tiles of at
               most R x C; a tile of m x n outputs takes K cycles of streaming plus m + n cycles
               of fill/drain (the systolic skew spans only the rows and columns the tile uses;
               m + n = R + C for a full tile). Tiles do not overlap. The output may be mapped
               either way round onto the array; the cheaper mapping is taken.
    cycles     = ceil(M/R) ceil(N/C) K + ceil(N/C) M + ceil(M/R) N   (never more for a bigger array)
    vector     C lanes beside the array do elementwise work, one element per lane per cycle:
               the output error (two passes over the logits) and the update (one pass over
               the parameters: momentum and weight write pipelined). The array waits for them.
    DSP        a DSP48E2 multiplies 27 x 18 signed; a wider product takes
               min(ceil(a/27) ceil(b/18), ceil(b/27) ceil(a/18)) DSPs; a product with both
               operands <= 9 bits goes to LUTs (a*b LUT6: one per partial-product bit).
    BRAM36     36 Kbit; 32Kx1 .. 4Kx9, 2Kx18, 1Kx36, 512x72. A tensor read `lanes` elements per
               cycle is one memory of width lanes*bits and depth ceil(elements/lanes); it takes
               the cheapest configuration, ceil(width/w) ceil(depth/d) blocks.
    energy     Horowitz, ISSCC 2014, 45 nm (see ENERGY_SOURCE); multipliers and adders between
               the cited 8- and 32-bit points by a power law through them.

The step (edgefa.exporters.onnx_graphs): forward a = h W^T + b, h = f(a); e = (softmax - onehot)/B;
DFA delta_l = (e B_l) * f'(a_l); BP delta_l = (delta_{l+1} W_{l+1}) * f'(a_l), layer by layer;
v <- mu v + delta^T h; W <- W - lr v. With `trainable: last:K` the error, the outer products and
the update cover the last K layers only (the frozen ones below run their forward alone); a
Bradley-Terry scorer's step runs the B pairs as 2B rows, its error from the same softmax unit
(scope.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from ..errors import EdgefaError
from .scope import is_pairs, require_in_scope, trained_count

# --- cited per-operation energies -----------------------------------------------------------

ENERGY_SOURCE = ("M. Horowitz, \"Computing's energy problem (and what we can do about it)\", "
                 "ISSCC 2014, 45 nm")
ENERGY_LABEL = "model (Horowitz ISSCC 2014, 45 nm)"
INT_MUL_PJ = ((8, 0.2), (32, 3.1))            # int multiply, pJ, at 8 and 32 bits
INT_ADD_PJ = ((8, 0.03), (32, 0.1))           # int add, pJ
SRAM_READ_64B_PJ = ((8 * 1024, 10.0), (32 * 1024, 20.0), (1024 * 1024, 100.0))   # capacity bytes, pJ
DRAM_64B_PJ = (1300.0, 2600.0)                # per 64-bit access, pJ: the cited range
DRAM_64B_PJ_USED = sum(DRAM_64B_PJ) / 2       # its midpoint, used for the totals

# --- FPGA primitives ----------------------------------------------------------------------------

DSP_A_BITS, DSP_B_BITS = 27, 18               # DSP48E2 signed multiplier (UG579)
DSP_ACC_BITS = 48                             # DSP48E2 P register / ALU width
LUT_MULT_MAX_BITS = 9                         # both operands <= 9 bits: LUTs, not a DSP
BRAM36_BITS = 36 * 1024
BRAM36_BYTES = BRAM36_BITS // 8               # 4608 B = 4.5 KiB
BRAM36_CONFIGS = ((32768, 1), (16384, 2), (8192, 4), (4096, 9), (2048, 18), (1024, 36), (512, 72))
LFSR_STATE_BITS = 32                          # one 32-bit leap-forward LFSR per array column
LFSR_FF, LFSR_LUT = 32, 32                    # per generator: its state, one LUT6 per next-state bit
LFSR_PJ_PER_ELEMENT = 0.1                     # charged as one 32-bit int add (Horowitz): assumption
OUTPUT_ERROR_PASSES = 2                       # exp (table) + row sums; then normalize - onehot, / batch
MAX_DATA_BITS, MAX_ACC_BITS = 32, 64
DEFAULT_ONCHIP_KIB = 972                      # 216 BRAM36, a Zynq UltraScale+ ZU3EG

ASSUMPTIONS = [
    "array: output-stationary R x C PEs (one data x data multiplier + one acc-bit accumulator each); "
    "a [M,K]x[K,N] matmul takes ceil(M/R)ceil(N/C)K + ceil(N/C)M + ceil(M/R)N cycles "
    "(K per output tile plus a fill/drain of m+n <= R+C for the m x n outputs it holds); tiles do not "
    "overlap; the output is mapped onto the array the cheaper way round",
    "bias add, activation and the f'(a) factor are applied as a tile drains (no extra cycles); f'(a) is "
    "recomputed from the stored h (relu: h > 0; tanh: 1 - h^2)",
    "a vector unit of C lanes (one element per lane per cycle) computes the output error in 2 passes over "
    "the logits and the update in one pass over the parameters; the array waits for it",
    "all stored tensors (weights, biases, momentum, feedback, activations, errors) are data-bits wide; "
    "accumulators are acc-bits wide and live in the PEs",
    "DSP48E2 multiplies 27x18 signed: an a x b product takes min(ceil(a/27)ceil(b/18), ceil(b/27)ceil(a/18)) "
    "DSPs (pieces combined on the cascade; sign bits of split pieces ignored); a product with both operands "
    "<= 9 bits goes to LUTs at a*b LUT6 (one per partial-product bit on the carry chain: an assumption, "
    "not a synthesis result); an accumulator wider than the DSP's 48 bits adds acc-bits LUTs per PE, and "
    "a LUT multiplier's accumulator acc-bits LUTs",
    "BRAM36 (36 Kbit; 32Kx1, 16Kx2, 8Kx4, 4Kx9, 2Kx18, 1Kx36, 512x72): a tensor read `lanes` elements per "
    "cycle (C for weights, momentum, feedback; R for activations and errors) is one memory lanes*bits wide, "
    "ceil(elements/lanes) deep, in the cheapest configuration; --onchip-kib is counted in BRAM36 blocks",
    "working set: weights+biases, momentum (when mu != 0), feedback (DFA stored), every layer's input h "
    "and the logits (both rules keep them: the error exists only after the whole forward), error buffers "
    "(DFA: [B, sum of hidden widths]; BP: two [B, max hidden width] ping-pong buffers); what does not fit "
    "spills to DRAM whole, in the order momentum, W^T copy, weights, feedback, errors, activations",
    "DRAM traffic of a spilled tensor per step: weights 3 passes (forward read, update read+write), "
    "momentum 2, feedback 1, W^T copy 2, activations 3 (write, two reads), errors 2; transfers overlap "
    "compute, so latency = max(compute, DRAM time at --dram-gbps)",
    "energy: int multiply 0.2 pJ (8 b) / 3.1 pJ (32 b), int add 0.03 / 0.1 pJ, between and beyond by a power "
    "law through the two points (multiply exponent ~1.98, about quadratic; add ~0.87); SRAM 64-bit read "
    "10 / 20 / 100 pJ at 8 KB / 32 KB / 1 MB, log-log interpolated in the tensor memory's capacity, 10 pJ "
    "below 8 KB, writes charged as reads; DRAM 1.3-2.6 nJ per 64-bit access, midpoint 1.95 nJ used; "
    "each operand element is read from SRAM once per tile pass and passed PE to PE in registers (not "
    "charged); static power, control and clocking not modelled",
    "BP: the backward needs W^T. The model keeps a transposed copy of every weight matrix but the first "
    "(stored on chip, read by the backward, written at every update); a transposable memory would save the "
    "copy but not the access energy. The backward runs layer by layer: delta_l waits for delta_{l+1}",
    "trainable last:K: the forward runs every layer; the error projection, the outer products, the momentum "
    "and the update cover the last K layers only (BP's backward stops at the lowest of them, and keeps W^T "
    "copies only of the layers it goes through); the activations are still every layer's input",
    "a Bradley-Terry scorer (one output) trains on B pairs per step: both items of every pair run through "
    "one forward of 2B rows, and the output error is the softmax unit's on the pairs' two scores",
    "DFA: the projections e B_l of all hidden layers are one matmul over [B_1 | B_2 | ...] (no layer waits "
    "for another). --feedback lfsr regenerates B on chip from one 32-bit leap-forward LFSR per array column "
    "(assumed 32 FF + 32 LUT6 each, after Xilinx XAPP052; each generated element charged as one 32-bit add); "
    "this saves the feedback storage and its reads, but the feedback must then be the LFSR's own sequence "
    "(the DF-LNPU chip, Han, Lee and Yoo, IEEE JSSC 2021, does this with its built-in PRNG); a bundle's feedback.npz is not",
]


def _power_law(points, x: float) -> float:
    (x0, y0), (x1, y1) = points
    p = math.log(y1 / y0) / math.log(x1 / x0)
    return y0 * (x / x0) ** p


def mul_pj(bits: int) -> float:
    """Integer multiply energy (pJ) of a bits x bits product: power law through 0.2 pJ (8) and 3.1 pJ (32)."""
    return _power_law(INT_MUL_PJ, bits)


def add_pj(bits: int) -> float:
    """Integer add energy (pJ): power law through 0.03 pJ (8 bits) and 0.1 pJ (32 bits)."""
    return _power_law(INT_ADD_PJ, bits)


def sram_pj_per_bit(capacity_bytes: float) -> float:
    """SRAM access energy per bit for a memory of this capacity: log-log between the cited points."""
    pts = SRAM_READ_64B_PJ
    if capacity_bytes <= pts[0][0]:
        return pts[0][1] / 64
    pair = (pts[0], pts[1]) if capacity_bytes <= pts[1][0] else (pts[1], pts[2])
    return _power_law(pair, capacity_bytes) / 64


def dram_pj_per_bit() -> float:
    return DRAM_64B_PJ_USED / 64


# --- FPGA resources -----------------------------------------------------------------------------

def in_luts(a_bits: int, b_bits: int) -> bool:
    return a_bits <= LUT_MULT_MAX_BITS and b_bits <= LUT_MULT_MAX_BITS


def dsp48e2_count(a_bits: int, b_bits: int) -> int:
    """DSP48E2 blocks for one a x b signed multiplier; 0 when it goes to LUTs."""
    if in_luts(a_bits, b_bits):
        return 0
    return min(math.ceil(a_bits / DSP_A_BITS) * math.ceil(b_bits / DSP_B_BITS),
               math.ceil(b_bits / DSP_A_BITS) * math.ceil(a_bits / DSP_B_BITS))


def lut_multiplier(a_bits: int, b_bits: int) -> int:
    """LUT6 estimate of one a x b multiplier built in fabric: one per partial-product bit (assumption)."""
    return a_bits * b_bits


def bram36_blocks(elements: int, bits: int, lanes: int = 1) -> int:
    """BRAM36 blocks for `elements` words of `bits`, read `lanes` words per cycle."""
    if elements <= 0:
        return 0
    lanes = max(1, min(lanes, elements))
    width, depth = lanes * bits, math.ceil(elements / lanes)
    return min(math.ceil(width / w) * math.ceil(depth / d) for d, w in BRAM36_CONFIGS)


# --- the array --------------------------------------------------------------------------------

@dataclass(frozen=True)
class MacArray:
    rows: int = 16
    cols: int = 16
    clock_hz: float = 200e6
    data_bits: int = 16
    acc_bits: int = 32
    onchip_kib: float = DEFAULT_ONCHIP_KIB
    dram_gbps: float = 10.0

    def __post_init__(self):
        for name in ("rows", "cols"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 4096:
                raise EdgefaError(f"array {name} must be an integer from 1 to 4096, got {v!r}")
        if not (isinstance(self.clock_hz, (int, float)) and math.isfinite(self.clock_hz) and self.clock_hz > 0):
            raise EdgefaError(f"clock must be a positive frequency, got {self.clock_hz!r}")
        if not isinstance(self.data_bits, int) or not 1 <= self.data_bits <= MAX_DATA_BITS:
            raise EdgefaError(f"--data-bits must be from 1 to {MAX_DATA_BITS}, got {self.data_bits!r}")
        if not isinstance(self.acc_bits, int) or not 1 <= self.acc_bits <= MAX_ACC_BITS:
            raise EdgefaError(f"--acc-bits (accumulator) must be from 1 to {MAX_ACC_BITS}, got {self.acc_bits!r}")
        if self.acc_bits < self.data_bits:
            raise EdgefaError(f"--acc-bits ({self.acc_bits}) must be at least --data-bits ({self.data_bits})")
        if not (math.isfinite(self.onchip_kib) and self.onchip_kib >= 0):
            raise EdgefaError(f"--onchip-kib must be 0 or more, got {self.onchip_kib!r}")
        if not (math.isfinite(self.dram_gbps) and self.dram_gbps > 0):
            raise EdgefaError(f"--dram-gbps must be positive, got {self.dram_gbps!r}")

    @property
    def pes(self) -> int:
        return self.rows * self.cols

    @property
    def bram36_available(self) -> int:
        return int(self.onchip_kib * 1024 // BRAM36_BYTES)


def parse_array(text: str) -> tuple[int, int]:
    """'16x16' -> (16, 16)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX×*]\s*(\d+)\s*", str(text))
    if not m:
        raise EdgefaError(f"--array must be ROWSxCOLS such as 16x16, got {text!r}")
    rows, cols = int(m[1]), int(m[2])
    if not (1 <= rows <= 4096 and 1 <= cols <= 4096):
        raise EdgefaError(f"--array rows and columns must be from 1 to 4096, got {text!r}")
    return rows, cols


_CLOCK_UNITS = {"": 1.0, "hz": 1.0, "khz": 1e3, "mhz": 1e6, "ghz": 1e9}


def parse_clock(text: str) -> float:
    """'200MHz', '1.5GHz', '200e6' -> Hz."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m[2].lower() if m else None
    if not m or unit not in _CLOCK_UNITS:
        raise EdgefaError(f"--clock must be a frequency such as 200MHz, 1.5GHz or 200e6, got {text!r}")
    hz = float(m[1]) * _CLOCK_UNITS[unit]
    if not (math.isfinite(hz) and hz > 0):
        raise EdgefaError(f"--clock must be a positive frequency, got {text!r}")
    return hz


def matmul_cycles(m: int, k: int, n: int, rows: int, cols: int) -> dict:
    """Cycles and SRAM operand reads of [m,k] x [k,n] on a rows x cols output-stationary array."""
    def mapped(mr, nc):                    # mr output rows onto array rows, nc onto columns
        tr, tc = math.ceil(mr / rows), math.ceil(nc / cols)
        return {"cycles": tr * tc * k + tc * mr + tr * nc, "tiles": tr * tc,
                "reads_rows_operand": k * mr * tc, "reads_cols_operand": k * nc * tr}
    if m == 0 or n == 0 or k == 0:
        return {"cycles": 0, "tiles": 0, "macs": 0, "reads_a": 0, "reads_b": 0, "writes": 0}
    straight, swapped = mapped(m, n), mapped(n, m)
    if swapped["cycles"] < straight["cycles"]:
        return {"cycles": swapped["cycles"], "tiles": swapped["tiles"], "macs": m * k * n,
                "reads_a": swapped["reads_cols_operand"], "reads_b": swapped["reads_rows_operand"],
                "writes": m * n}
    return {"cycles": straight["cycles"], "tiles": straight["tiles"], "macs": m * k * n,
            "reads_a": straight["reads_rows_operand"], "reads_b": straight["reads_cols_operand"],
            "writes": m * n}


# --- the network ------------------------------------------------------------------------------

def _check_model(model: dict) -> list[dict]:
    require_in_scope({"model": model})
    try:
        layers = [{"name": str(l["name"]), "in": int(l["in"]), "out": int(l["out"])} for l in model["layers"]]
        int(model["n_classes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise EdgefaError(f"the model description lacks a usable field: {exc}") from None
    if not layers or any(l["in"] < 1 or l["out"] < 1 for l in layers):
        raise EdgefaError("the model needs at least one layer with positive widths")
    return layers


PHASES = ("forward", "output_error", "projection", "outer_products", "update")
PHASE_LABELS = {
    "dfa": {"forward": "forward (h W^T)", "output_error": "output error e", "projection": "e B (all layers at once)",
            "outer_products": "outer products delta^T h", "update": "update (momentum + weight write)"},
    "bp": {"forward": "forward (h W^T)", "output_error": "output error e",
           "projection": "delta W^T (layer by layer)", "outer_products": "outer products delta^T h",
           "update": "update (momentum + weight write)"},
}
SPILL_ORDER = ("momentum", "weights_t", "weights", "feedback", "errors", "activations")
DRAM_PASSES = {"weights": 3, "momentum": 2, "feedback": 1, "weights_t": 2, "activations": 3, "errors": 2}


def cost_report(model: dict, array: MacArray, rule: str = "dfa", batch: int = 32, feedback: str = "stored",
                momentum: float = 0.9, pairs: bool = False) -> dict:
    """Cycles per phase, latency, DSP/LUT, BRAM36, DRAM traffic and modelled energy of one training step
    (and of one inference) of `model` (a bundle's manifest["model"]) under `rule` ("dfa" | "bp").
    `pairs`: a Bradley-Terry scorer's step on `batch` pairs (2 x batch rows)."""
    if rule not in ("dfa", "bp"):
        raise EdgefaError(f"rule must be dfa or bp, got {rule!r}")
    if feedback not in ("stored", "lfsr"):
        raise EdgefaError(f"--feedback must be stored or lfsr, got {feedback!r}")
    if not isinstance(batch, int) or batch < 1:
        raise EdgefaError(f"--batch must be a positive integer, got {batch!r}")
    layers = _check_model(model)
    R, C, B = array.rows, array.cols, 2 * batch if pairs else batch      # B: rows through the step
    d, acc = array.data_bits, array.acc_bits
    n_classes = int(model["n_classes"])
    k = trained_count(model)
    trained = layers if k is None else layers[-min(k, len(layers)):]      # the head and the K-1 below it
    hidden = trained[:-1]                                 # the trained hidden layers: they get an error
    widths = [l["out"] for l in hidden]
    lfsr = rule == "dfa" and feedback == "lfsr" and bool(hidden)
    relu = str(model.get("activation", "relu")) == "relu"
    with_momentum = momentum != 0

    # --- memories (elements, lanes) and their capacities -------------------------------------
    params = sum(l["out"] * (l["in"] + 1) for l in layers)
    trained_params = sum(l["out"] * (l["in"] + 1) for l in trained)
    elements = {
        "weights": (params, C),
        "momentum": (trained_params if with_momentum else 0, C),
        "feedback": (n_classes * sum(widths) if rule == "dfa" and not lfsr else 0, C),
        "weights_t": (sum(l["out"] * l["in"] for l in trained[1:]) if rule == "bp" else 0, C),   # BP reads W_{l+1}^T
        "activations": (B * (sum(l["in"] for l in layers) + n_classes), R),
        "errors": ((B * sum(widths) if rule == "dfa" else 2 * B * max(widths)) if hidden else 0, R),
    }
    memory = {}
    for name, (count, lanes) in elements.items():
        memory[name] = {"elements": count, "bits": d, "bytes": math.ceil(count * d / 8), "lanes": lanes,
                        "bram36": bram36_blocks(count, d, lanes)}
    free = array.bram36_available - sum(m["bram36"] for m in memory.values())
    for m in memory.values():
        m["on_chip"] = True
    for name in SPILL_ORDER:                                   # spill whole tensors until the rest fits
        if free >= 0:
            break
        if memory[name]["bram36"]:
            memory[name]["on_chip"] = False
            free += memory[name]["bram36"]
    for name, m in memory.items():
        m["dram_bytes_per_step"] = 0 if m["on_chip"] else m["bytes"] * DRAM_PASSES[name]
    pj_bit = {name: sram_pj_per_bit(max(m["bytes"], 1)) for name, m in memory.items()}

    e_mul = mul_pj(d)
    e_mac = e_mul + add_pj(acc)
    sram = lambda name, count: count * d * pj_bit[name]           # noqa: E731  pJ

    def mm(m_, k_, n_, a_mem, b_mem, out_mem):
        r = matmul_cycles(m_, k_, n_, R, C)
        b_pj = (r["reads_b"] * LFSR_PJ_PER_ELEMENT if b_mem == "lfsr" else sram(b_mem, r["reads_b"]))
        r["energy_pj"] = {"mac": r["macs"] * e_mac,
                          "sram": sram(a_mem, r["reads_a"]) + (0 if b_mem == "lfsr" else b_pj)
                          + (sram(out_mem, r["writes"]) if out_mem else 0),
                          "lfsr": b_pj if b_mem == "lfsr" else 0.0}
        return r

    def phase(parts, extra_cycles=0, extra_pj=None):
        out = {"cycles": sum(p["cycles"] for p in parts) + extra_cycles,
               "macs": sum(p["macs"] for p in parts), "matmuls": len(parts),
               "energy_pj": {"mac": 0.0, "sram": 0.0, "lfsr": 0.0, "elementwise": 0.0}}
        for p in parts:
            for key, v in p["energy_pj"].items():
                out["energy_pj"][key] += v
        for key, v in (extra_pj or {}).items():
            out["energy_pj"][key] += v
        return out

    # forward: a_l = h W^T per layer (bias preloaded into the accumulator, f applied on drain)
    def forward(batch_):
        return phase([mm(batch_, l["in"], l["out"], "activations", "weights", "activations") for l in layers],
                     extra_pj={"sram": sram("weights", sum(l["out"] for l in layers))})   # biases

    phases = {"forward": forward(B)}
    # output error: two vector passes over the logits [B, n]
    n_err = B * n_classes
    phases["output_error"] = phase([], OUTPUT_ERROR_PASSES * math.ceil(n_err / C), {
        "elementwise": n_err * (e_mul + 2 * add_pj(d)),
        "sram": sram("activations", 2 * n_err) + sram("activations", n_err)})
    # projection, with f'(a) applied on drain (relu: a select; tanh: 1 - h^2, two multiplies, one add)
    deriv_pj = (0.0 if relu else 2 * e_mul + add_pj(d)) * B * sum(widths)
    deriv_reads = sram("activations", B * sum(widths))
    if not hidden:
        phases["projection"] = phase([])
    elif rule == "dfa":
        phases["projection"] = phase([mm(B, n_classes, sum(widths), "activations", "lfsr" if lfsr else "feedback",
                                         "errors")], extra_pj={"elementwise": deriv_pj, "sram": deriv_reads})
    else:                                                     # delta_l = delta_{l+1} W_{l+1}, sequential
        parts = [mm(B, nxt["out"], cur["out"], "errors", "weights_t", "errors")
                 for cur, nxt in zip(trained[:-1], trained[1:])]
        phases["projection"] = phase(parts, extra_pj={"elementwise": deriv_pj, "sram": deriv_reads})
    # outer products: delta_l^T [out, B] x h_{l-1} [B, in + 1] (the ones column gives the bias gradient);
    # gradients stay in the PEs and drain into the update unit
    phases["outer_products"] = phase([
        mm(l["out"], B, l["in"] + 1, "errors" if i < len(hidden) else "activations", "activations", None)
        for i, l in enumerate(trained)])
    # update: C lanes, one parameter per lane per cycle: v <- mu v + g; W <- W - lr v
    per_param = (2 * e_mul + 2 * add_pj(d)) if with_momentum else (e_mul + add_pj(d))
    upd_sram = sram("weights", 2 * trained_params) + (sram("momentum", 2 * trained_params) if with_momentum else 0.0)
    if rule == "bp":
        upd_sram += sram("weights_t", memory["weights_t"]["elements"])     # the transposed copy's write
    phases["update"] = phase([], sum(math.ceil(l["out"] * (l["in"] + 1) / C) for l in trained),
                             {"elementwise": trained_params * per_param, "sram": upd_sram})

    clock = array.clock_hz
    dram_bytes = sum(m["dram_bytes_per_step"] for m in memory.values())
    dram_pj = dram_bytes * 8 * dram_pj_per_bit()
    for name, ph in phases.items():
        ph["label"] = PHASE_LABELS[rule][name]
        ph["latency_s"] = ph["cycles"] / clock
        ph["energy_j"] = sum(ph["energy_pj"].values()) * 1e-12
    cycles = sum(ph["cycles"] for ph in phases.values())
    compute_s = cycles / clock
    dram_s = dram_bytes / (array.dram_gbps * 1e9)
    breakdown = {key: sum(ph["energy_pj"][key] for ph in phases.values()) * 1e-12
                 for key in ("mac", "sram", "elementwise", "lfsr")}
    breakdown["dram"] = dram_pj * 1e-12

    # inference: the forward of one sample (weights spilled to DRAM are read once)
    inf = forward(1)
    inf_dram = 0 if memory["weights"]["on_chip"] else memory["weights"]["bytes"]
    inf_j = (sum(inf["energy_pj"].values()) + inf_dram * 8 * dram_pj_per_bit()) * 1e-12

    # resources
    pe_dsp = dsp48e2_count(d, d)
    pe_lut = (lut_multiplier(d, d) + acc) if pe_dsp == 0 else (acc if acc > DSP_ACC_BITS else 0)
    vec_dsp = dsp48e2_count(d, d)
    vec_lut = lut_multiplier(d, d) if vec_dsp == 0 else 0
    generators = C if lfsr else 0
    resources = {
        "multiplier": f"{d}x{d}", "multiplier_in": "luts" if pe_dsp == 0 else "dsp48e2",
        "dsp_per_pe": pe_dsp, "dsp_array": pe_dsp * R * C, "dsp_vector_unit": vec_dsp * C,
        "dsp": pe_dsp * R * C + vec_dsp * C,
        "lut_per_pe": pe_lut, "lut_array": pe_lut * R * C, "lut_vector_unit": vec_lut * C,
        "lut_lfsr": generators * LFSR_LUT, "ff_lfsr": generators * LFSR_FF,
        "lut": pe_lut * R * C + vec_lut * C + generators * LFSR_LUT,
    }
    on_chip_bytes = sum(m["bytes"] for m in memory.values() if m["on_chip"])
    bram = sum(m["bram36"] for m in memory.values() if m["on_chip"])
    feedback_bytes = math.ceil(n_classes * sum(widths) * d / 8) if rule == "dfa" else 0
    return {
        "kind": "model",
        "note": "analytic cost model of a MAC-array accelerator; not a synthesis result nor a measurement",
        "energy_basis": ENERGY_LABEL, "energy_source": ENERGY_SOURCE,
        "rule": rule, "feedback": (feedback if rule == "dfa" and hidden else None), "batch": batch,
        "pairs": pairs, "rows": B, "momentum": momentum,
        "array": {**asdict(array), "pes": array.pes, "dataflow": "output-stationary",
                  "bram36_available": array.bram36_available},
        "network": {"in_features": layers[0]["in"], "n_classes": n_classes, "activation": model.get("activation"),
                    "layers": layers, "parameters": params, "trainable": model.get("trainable", "all"),
                    "trained_layers": [l["name"] for l in trained], "trained_parameters": trained_params},
        "phases": phases,
        "train_step": {"cycles": cycles, "compute_s": compute_s, "dram_s": dram_s,
                       "latency_s": max(compute_s, dram_s), "bound": "dram" if dram_s > compute_s else "compute",
                       "macs": sum(ph["macs"] for ph in phases.values()),
                       "energy_j": sum(breakdown.values()), "energy_breakdown_j": breakdown},
        "inference": {"batch": 1, "cycles": inf["cycles"], "latency_s": inf["cycles"] / clock,
                      "macs": inf["macs"], "energy_j": inf_j},
        "resources": resources,
        "memory": {"tensors": memory, "on_chip_bytes": on_chip_bytes,
                   "working_set_bytes": sum(m["bytes"] for m in memory.values()),
                   "bram36": bram, "bram36_needed": sum(m["bram36"] for m in memory.values()),
                   "bram36_available": array.bram36_available,
                   "fits": all(m["on_chip"] for m in memory.values()),
                   "dram_bytes_per_step": dram_bytes},
        "lfsr": {"generators": generators, "state_bits": LFSR_STATE_BITS, "ff": generators * LFSR_FF,
                 "lut": generators * LFSR_LUT, "feedback_bytes_not_stored": feedback_bytes if lfsr else 0,
                 "feedback_bytes": feedback_bytes},
        "assumptions": ASSUMPTIONS,
    }


def compare(model: dict, array: MacArray, batch: int = 32, feedback: str = "stored", momentum: float = 0.9,
            pairs: bool = False) -> dict:
    """DFA (with the chosen feedback) and BP on the same array, plus what the LFSR would save."""
    dfa = cost_report(model, array, "dfa", batch, feedback, momentum, pairs)
    bp = cost_report(model, array, "bp", batch, feedback, momentum, pairs)
    stored = dfa if feedback == "stored" else cost_report(model, array, "dfa", batch, "stored", momentum, pairs)
    lfsr = dfa if feedback == "lfsr" else cost_report(model, array, "dfa", batch, "lfsr", momentum, pairs)
    return {"kind": "model", "energy_basis": ENERGY_LABEL, "energy_source": ENERGY_SOURCE,
            "dfa": dfa, "bp": bp,
            "lfsr_saving": {"feedback_bytes": stored["lfsr"]["feedback_bytes"],
                            "working_set_bytes_saved": stored["memory"]["working_set_bytes"]
                            - lfsr["memory"]["working_set_bytes"],
                            "bram36_saved": stored["memory"]["bram36_needed"] - lfsr["memory"]["bram36_needed"],
                            "energy_j_saved": stored["train_step"]["energy_j"] - lfsr["train_step"]["energy_j"],
                            "generators": lfsr["lfsr"]["generators"], "ff": lfsr["lfsr"]["ff"],
                            "lut": lfsr["lfsr"]["lut"]}}


def cost_of_bundle(path, array: MacArray, batch: int = 32, feedback: str = "stored") -> dict:
    """Read a bundle (verified) and compare DFA with BP for its model, loss and optimizer momentum
    (`batch`: pairs, for a Bradley-Terry bundle)."""
    from ..bundle import read_bundle

    b = read_bundle(path)
    require_in_scope(b.manifest, str(b.path))          # the loss too, which the model dict lacks
    momentum = float(b.manifest.get("optimizer", {}).get("momentum", 0.0) or 0.0)
    result = compare(b.model, array, batch, feedback, momentum, is_pairs(b.manifest))
    result["bundle"] = str(b.path)
    return result
