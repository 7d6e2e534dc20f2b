"""`edgefa export`: a trained run as a bundle (torch, imported inside the command)."""

from __future__ import annotations

import click
from rich.markup import escape

from ..cli_types import LEARNING_RATE, MOMENTUM, OUT_FOLDER
from ..errors import EdgefaError
from .common import check_out, console, force_option, warn


@click.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", type=OUT_FOLDER, required=True, help="bundle directory to write")
@click.option("--momentum", type=MOMENTUM, default=None, help="device SGD momentum (default: the run's)")
@click.option("--lr", type=LEARNING_RATE, default=None, help="device default learning rate (default: the run's)")
@click.option("--trainable", default="all", show_default=True,
              help="what the device trains: all, or last:K (the last K units from the head; mlp: layers, "
                   "resmlp: head+terminal LN, then one block at a time, then the embedding)")
@click.option("--trt-target", default="10.3", show_default=True,
              help="TensorRT release the graphs are checked against: 8.5 (JetPack 5.1) or 10.3 (JetPack 6.1/6.2)")
@click.option("--batch-profile", default="1,32,256", show_default=True,
              help="MIN,OPT,MAX batch of the TensorRT optimization profile "
                   "(tensorrt/trtexec.sh, the device's TensorRT provider)")
@click.option("--require-tensorrt", is_flag=True,
              help="fail, writing nothing, when a graph would not build into a TensorRT engine for --trt-target")
@click.option("--tensorrt", "build_engines", is_flag=True,
              help="also build the TensorRT engines here (a host with TensorRT and the device's GPU)")
@force_option
def export_command(run_dir, out, momentum, lr, trainable, trt_target, batch_profile, require_tensorrt, build_engines,
                   force):
    """Export a trained run as a bundle: infer.onnx, train_step.onnx, weights, feedback, manifest,
    and tensorrt/ (readiness.json, trtexec.sh: the engine builds to run on the device)."""
    from ..bundle import check_trainable_syntax, read_bundle
    from ..report.terminal import bundle_table

    try:
        check_trainable_syntax(trainable)  # a malformed spec is one line before torch is imported
    except EdgefaError as exc:
        raise EdgefaError(f"export: --{exc}") from None
    from ..exporters.tensorrt_ready import load_target, parse_batch_profile  # onnx, not torch

    try:
        target, profile = load_target(trt_target), parse_batch_profile(batch_profile)
    except EdgefaError as exc:
        raise EdgefaError(f"export: {exc}") from None
    if build_engines:
        from ..runtime.tensorrt_build import tensorrt_missing

        if tensorrt_missing():                       # before anything is written
            raise EdgefaError(f"export --tensorrt: {tensorrt_missing()}; export without it and build on the device")
    check_out(out, "bundle", force)                  # a folder that is not a bundle: before torch
    from ..exporters.export import export_bundle
    from ..training.trainer import load_run

    path = export_bundle(load_run(run_dir), out, momentum=momentum, lr=lr, trainable=trainable,
                         trt_target=target.version, batch_profile=profile, require_tensorrt=require_tensorrt)
    if build_engines:
        from ..runtime.tensorrt_build import build_bundle_engines

        build_bundle_engines(path)
    b = read_bundle(path)
    console.print(bundle_table(b))
    manifest, trt = b.manifest, b.manifest["tensorrt"]
    if trt["ready"]:
        graphs = f"{manifest['graphs']['infer']}, {manifest['graphs']['train_step']}"
        console.print(f"tensorrt {trt['target']}: ready ({graphs}); build on the device: "
                      f"sh {escape(str(path / trt['trtexec']))}", highlight=False, soft_wrap=True)
    else:
        problems = trt["problems"]
        more = f" (+{len(problems) - 1} more, see {trt['readiness']})" if len(problems) > 1 else ""
        warn(f"tensorrt {trt['target']}: not ready: {problems[0]}{more}")


COMMANDS = (export_command,)
