"""`edgefa export`: a trained run as a bundle (torch, imported inside the command)."""

from __future__ import annotations

import click
from rich.markup import escape

from ..cli_types import LEARNING_RATE, MOMENTUM, OUT_FOLDER
from ..errors import EdgefaError
from .common import check_out, console, force_option, warn


# --- the options of every command that writes a bundle (`export`, `bundle from-onnx`) -------------

def trainable_option(help: str):
    return click.option("--trainable", default="all", show_default=True, help=help)


def tensorrt_options(f):
    """--trt-target, --batch-profile, --require-tensorrt, --tensorrt."""
    for option in reversed([
        click.option("--trt-target", default="10.3", show_default=True,
                     help="TensorRT release the graphs are checked against: 8.5 (JetPack 5.1) or 10.3 (JetPack 6.1/6.2)"),
        click.option("--batch-profile", default="1,32,256", show_default=True,
                     help="MIN,OPT,MAX batch of the TensorRT optimization profile "
                          "(tensorrt/trtexec.sh, the device's TensorRT provider)"),
        click.option("--require-tensorrt", is_flag=True,
                     help="fail, writing nothing, when a graph would not build into a TensorRT engine for --trt-target"),
        click.option("--tensorrt", "refit_graph", is_flag=True,
                     help="carry tensorrt/infer_refit.onnx (infer.onnx with the weights as initializers, what "
                          "TensorRT's refittable inference engine is built from): a second copy of every weight, "
                          "so left out by default; the device derives it when it builds its engines"),
    ]):
        f = option(f)
    return f


def check_bundle_options(command: str, trainable: str, trt_target: str, batch_profile: str):
    """--trainable's syntax, the TensorRT target and the batch profile, checked before torch is
    imported (a malformed one is one line naming `command`); returns (target, profile)."""
    from ..bundle import check_trainable_syntax
    from ..exporters.tensorrt_ready import load_target, parse_batch_profile  # onnx, not torch

    try:
        check_trainable_syntax(trainable)
    except EdgefaError as exc:
        raise EdgefaError(f"{command}: --{exc}") from None
    try:
        return load_target(trt_target), parse_batch_profile(batch_profile)
    except EdgefaError as exc:
        raise EdgefaError(f"{command}: {exc}") from None


@click.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", type=OUT_FOLDER, required=True, help="bundle directory to write")
@click.option("--momentum", type=MOMENTUM, default=None, help="device SGD momentum (default: the run's)")
@click.option("--lr", type=LEARNING_RATE, default=None, help="device default learning rate (default: the run's)")
@trainable_option("what the device trains: all | head | last:K (the last K units from the head). "
                  "mlp: all, last:K (layers), head; resmlp: all, last:K (head+terminal LN, then one block at a "
                  "time, then the embedding), head; cnn: all (every conv stage by DFA), last:K (head, fc, then one "
                  "conv stage at a time; the stages below: a frozen torch trunk), head; vit, transformer: head "
                  "only (the rest a frozen torch trunk)")
@tensorrt_options
@click.option("--build-engines", is_flag=True,
              help="also build the TensorRT engines here (a host with TensorRT and the device's GPU)")
@force_option
def export_command(run_dir, out, momentum, lr, trainable, trt_target, batch_profile, require_tensorrt, refit_graph,
                   build_engines, force):
    """Export a trained run as a bundle: infer.onnx, train_step.onnx, weights, feedback, manifest,
    and tensorrt/ (readiness.json, trtexec.sh: the engine builds to run on the device)."""
    target, profile = check_bundle_options("export", trainable, trt_target, batch_profile)
    if build_engines:
        from ..runtime.tensorrt_build import tensorrt_missing

        if tensorrt_missing():                       # before anything is written
            raise EdgefaError(f"export --build-engines: {tensorrt_missing()}; export without it and build on the device")
    check_out(out, "bundle", force)                  # a folder that is not a bundle: before torch
    from ..exporters.export import export_bundle
    from ..training.trainer import load_run

    path = export_bundle(load_run(run_dir), out, momentum=momentum, lr=lr, trainable=trainable,
                         trt_target=target.version, batch_profile=profile, require_tensorrt=require_tensorrt,
                         refit_graph=refit_graph)
    if build_engines:
        from ..runtime.tensorrt_build import build_bundle_engines

        build_bundle_engines(path)
    print_bundle(path)


def print_bundle(path) -> None:
    """The written bundle's table, then its TensorRT verdict: ready (and how to build the engines on
    the device), or a warning naming the first problem."""
    from ..bundle import HEAD_FACTORS_GRAPH, STEP_FACTORS_GRAPH, read_bundle
    from ..report.terminal import bundle_table

    b = read_bundle(path)
    console.print(bundle_table(b))
    manifest, trt = b.manifest, b.manifest["tensorrt"]
    if trt["ready"]:
        # every graph TensorRT builds, the trunk's too (the in-place step's factor graphs run on the CPU only)
        cpu_only = (STEP_FACTORS_GRAPH, HEAD_FACTORS_GRAPH)
        graphs = ", ".join(name for key, name in manifest["graphs"].items() if key != "opset" and name not in cpu_only)
        console.print(f"tensorrt {trt['target']}: ready ({graphs}); build on the device: "
                      f"sh {escape(str(path / trt['trtexec']))}", highlight=False, soft_wrap=True)
    else:
        problems = trt["problems"]
        more = f" (+{len(problems) - 1} more, see {trt['readiness']})" if len(problems) > 1 else ""
        warn(f"tensorrt {trt['target']}: not ready: {problems[0]}{more}")


COMMANDS = (export_command,)
