"""`edgefa fpga ...`: fixed-point DFA in bit-exact simulation (simulate, sweep) and the MAC-array
cost model (cost). Device side: no torch."""

from __future__ import annotations

import click
from rich.markup import escape

from ..cli_types import LEARNING_RATE, OUT_FILE, OUT_FOLDER, POSITIVE, POSITIVE_FLOAT, SEED, WIDTHS
from ..report.format import fmt_pct
from .common import check_out, console, force_option, progress_bar, write_json


@click.group("fpga")
def fpga_group() -> None:
    """Fixed-point DFA in bit-exact simulation, and a cost model of a MAC-array accelerator."""


def fpga_run_options(steps: int, config_help: str):
    """BUNDLE and the fine-tuning options shared by `fpga simulate` and `fpga sweep`."""
    def decorate(f):
        for option in reversed([
            click.argument("bundle", type=click.Path()),
            click.option("--data", "data_spec", required=True, help="training data: FILE.npz (X, y) or mnist:DIR"),
            click.option("--eval", "eval_spec", default=None, help="evaluation data (default: the training data)"),
            click.option("--steps", type=POSITIVE, default=steps, show_default=True),
            click.option("--batch-size", type=POSITIVE, default=32, show_default=True),
            click.option("--lr", type=LEARNING_RATE, default=None, help="learning rate (default: the bundle's)"),
            click.option("--seed", type=SEED, default=0, show_default=True, help="batch order seed"),
            click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help=config_help),
        ]):
            f = option(f)
        return f
    return decorate


@fpga_group.command("simulate")
@fpga_run_options(200, "fixed-point formats per tensor class (TOML; default: 16-bit data, 48-bit accumulators)")
@click.option("--json", "json_path", type=OUT_FILE, default=None, help="write the result as JSON")
def simulate_command(bundle, data_spec, eval_spec, steps, batch_size, lr, seed, config_path, json_path):
    """Fine-tune BUNDLE with DFA in bit-exact fixed point and, beside it, in float32 (onnxruntime)."""
    from ..fpga_sim.simulate import SimulateConfig, load_inputs, simulate
    from ..report.terminal import print_fpga_simulation

    given = load_inputs(bundle, data_spec, eval_spec, config_path, lr)
    with progress_bar() as bar:
        task = bar.add_task("fixed-point dfa", total=steps, status="")
        result = simulate(given.bundle, given.train, SimulateConfig(steps, batch_size, lr, seed), given.fxp, given.eval,
                          engine=given.engine,
                          on_step=lambda s, lf, l32: bar.update(
                              task, completed=s, status=f"loss {lf:.3f} (float32 {l32:.3f})"))
    if json_path:
        write_json(json_path, result)
    print_fpga_simulation(console, result, steps, batch_size)


@fpga_group.command("sweep")
@fpga_run_options(100, "formats of the classes not swept (TOML)")
@click.option("--widths", type=WIDTHS, default="6,8,10,12,14,16", show_default=True, help="word lengths W, comma-separated")
@click.option("--int-bits", type=click.IntRange(-256, 256), default=2, show_default=True, help="integer bits I of the swept formats")
@click.option("--rounding", "roundings", default="AP_RND_CONV,STOCHASTIC", show_default=True,
              help="rounding modes, comma-separated")
@click.option("--classes", default="weights,optimizer_state", show_default=True,
              help="tensor classes that get ap_fixed<W,I,mode,AP_SAT>")
@click.option("--out", type=OUT_FOLDER, required=True,
              help="folder for sweep.json, sweep.md, sweep.svg and sweep.html")
@force_option
def sweep_command(bundle, data_spec, eval_spec, steps, batch_size, lr, seed, config_path, widths, int_bits, roundings,
                  classes, out, force):
    """Accuracy against word length, one line per rounding mode (a table and a plot)."""
    from ..fpga_sim.simulate import SimulateConfig, load_inputs
    from ..fpga_sim.sweep import FormatGrid, sweep
    from ..report.outputs import write_fpga_sweep
    from ..report.terminal import fpga_sweep_table

    grid = FormatGrid(widths, tuple(r.strip() for r in roundings.split(",") if r.strip()),
                      int_bits, tuple(c.strip() for c in classes.split(",") if c.strip()))
    given = load_inputs(bundle, data_spec, eval_spec, config_path, lr)
    check_out(out, "fpga-sweep", force)
    total = len(grid.widths) * len(grid.roundings)
    with progress_bar() as bar:
        task = bar.add_task("sweep", total=total, status="")
        result = sweep(given.bundle, given.train, SimulateConfig(steps, batch_size, lr, seed), grid, given.fxp,
                       given.eval, engine=given.engine, on_run=lambda row: bar.update(task, advance=1, status=(
                           f"W={row['width']} {row['rounding']}: {fmt_pct(row['accuracy'])}")))
    result = {"schema": "edgefa.fpga-sweep/1", **result}
    paths = write_fpga_sweep(result, out)
    console.print(fpga_sweep_table(result, grid, steps))
    console.print(f"float32 runtime: {fmt_pct(result['float32_accuracy_before'])} -> "
                  f"{fmt_pct(result['float32_accuracy_after'])} after the same steps")
    console.print(f"wrote {paths[0]}, sweep.md, sweep.svg, sweep.html")


@fpga_group.command("cost")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--array", "array_spec", default="16x16", show_default=True, help="ROWSxCOLS processing elements")
@click.option("--clock", "clock_spec", default="200MHz", show_default=True, help="200MHz | 1.5GHz | 200e6")
@click.option("--data-bits", type=click.IntRange(1, 64), default=16, show_default=True, help="width of every stored tensor")
@click.option("--acc-bits", type=click.IntRange(1, 64), default=32, show_default=True, help="accumulator width in the PEs")
@click.option("--onchip-kib", type=POSITIVE_FLOAT, default=972, show_default=True,
              help="on-chip memory, counted in BRAM36 blocks of 4.5 KiB (972 = 216 BRAM36)")
@click.option("--dram-gbps", type=POSITIVE_FLOAT, default=10.0, show_default=True, help="DRAM bandwidth when tensors spill")
@click.option("--batch", type=POSITIVE, default=32, show_default=True, help="training batch")
@click.option("--feedback", default="stored", show_default=True, help="DFA feedback: stored | lfsr (regenerated)")
@click.option("--json", "json_out", type=OUT_FILE, default=None, help="write everything here")
def cost_command(bundle, array_spec, clock_spec, data_bits, acc_bits, onchip_kib, dram_gbps, batch, feedback, json_out):
    """Cycles, latency, DSP/LUT, BRAM36, DRAM traffic and energy of one training step on an
    output-stationary MAC array: DFA against BP side by side. An analytic model, not a measurement."""
    from ..fpga_sim.cost import MacArray, cost_of_bundle, parse_array, parse_clock
    from ..report.terminal import print_fpga_cost

    rows, cols = parse_array(array_spec)
    array = MacArray(rows, cols, parse_clock(clock_spec), data_bits, acc_bits, onchip_kib, dram_gbps)
    result = cost_of_bundle(bundle, array, batch, feedback)
    print_fpga_cost(console, result, bundle, array, batch)
    if json_out:
        write_json(json_out, result, indent=1)
        console.print(f"wrote {escape(str(json_out))}")
