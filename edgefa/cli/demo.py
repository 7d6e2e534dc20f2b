"""`edgefa demo`: the whole story on one machine (torch on the host side, imported inside)."""

from __future__ import annotations

from pathlib import Path

import click

from ..cli_types import OUT_FOLDER, POSITIVE, SEED
from .common import check_out, console, err_console, force_option, progress_bar


# edgefa.demo.DEMO_MODELS (not imported here: edgefa.demo imports torch)
DEMO_MODELS = click.Choice(["mlp", "cnn"])


@click.command("demo")
@click.option("--out", type=OUT_FOLDER, default="demo-out", show_default=True)
@click.option("--model", type=DEMO_MODELS, default="mlp", show_default=True,
              help="mlp: a 64-256-256-10 MLP; cnn: a 2-D CNN over the 8x8 images, every conv stage trained on the device")
@click.option("--epochs", type=POSITIVE, default=30, show_default=True, help="host pre-training epochs")
@click.option("--steps", type=POSITIVE, default=200, show_default=True, help="device fine-tuning steps")
@click.option("--seed", type=SEED, default=0, show_default=True)
@force_option
def demo_command(out, model, epochs, steps, seed, force):
    """Pretrain with DFA on digits, export, fine-tune on a shifted sensor through a torch-free device
    server behind a pseudo-terminal, and compare with BP fine-tuning on the host."""
    check_out(out, "demo", force)         # the folder and the ones the demo makes in it: before torch
    from ..demo import DemoConfig, run_demo
    from ..report.terminal import demo_table

    result = run_demo(DemoConfig(out=Path(out), model=model, epochs=epochs, steps=steps, seed=seed),
                      progress=progress_bar, say=err_console.print)
    console.print(demo_table(result))
    console.print(f"report: {result['report_path']}")


COMMANDS = (demo_command,)
