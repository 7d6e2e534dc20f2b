"""`edgefa bundle from-onnx`: bring your own model. A user's ONNX model, cut at a named tensor, is
the frozen trunk of a bundle; a new MLP head on its features is what the device trains by DFA
(edgefa.exporters.own_model). torch and onnx are imported inside the command, never here.
"""

from __future__ import annotations

import math

import click
from rich.markup import escape

from ..bundle import NEW_HEAD_ACTIVATIONS
from ..cli_types import LEARNING_RATE, MEAN_STD, MOMENTUM, OUT_FOLDER, SEED, WIDTHS
from .common import check_out, console, force_option
from .export import check_bundle_options, print_bundle, tensorrt_options, trainable_option


@click.group("bundle")
def bundle_group() -> None:
    """Bundles from models edgefa did not train: your own network as a frozen trunk under a new head."""


@bundle_group.command("from-onnx")
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(exists=True, dir_okay=False))
@click.option("--features", required=True,
              help="where the frozen trunk ends: a tensor of the model, or a node (its first output); "
                   "flattened, it feeds the new head")
@click.option("--head", type=WIDTHS, required=True,
              help="the new head: hidden widths then the number of classes (256,10: features -> 256 -> 10)")
@click.option("--out", type=OUT_FOLDER, required=True, help="bundle directory to write")
@trainable_option("what the device trains of the head: all | head (the readout alone) | last:K (its last K layers)")
@click.option("--activation", type=click.Choice(NEW_HEAD_ACTIVATIONS), default="relu", show_default=True,
              help="the head's hidden activation")
@click.option("--momentum", type=MOMENTUM, default=0.9, show_default=True, help="device SGD momentum")
@click.option("--lr", type=LEARNING_RATE, default=0.01, show_default=True, help="device default learning rate")
@click.option("--seed", type=SEED, default=0, show_default=True, help="the head's initial weights")
@click.option("--feedback-seed", type=SEED, default=1, show_default=True, help="the head's DFA feedback matrices")
@click.option("--standardize", type=MEAN_STD, default="0,1", show_default=True,
              help="MEAN,STD: the device feeds the model (x - MEAN) / STD of the raw data it is given "
                   "(the normalization the model was trained with)")
@tensorrt_options
@force_option
def from_onnx_command(model_path, features, head, out, trainable, activation, momentum, lr, seed, feedback_seed,
                      standardize, trt_target, batch_profile, require_tensorrt, refit_graph, force):
    """A bundle from your ONNX model (one float input, a dynamic batch): the model up to --features,
    frozen, under a new --head the device trains by DFA."""
    target, profile = check_bundle_options("bundle from-onnx", trainable, trt_target, batch_profile)
    check_out(out, "bundle", force)
    from ..exporters.own_model import bundle_from_onnx

    path = bundle_from_onnx(model_path, features, out, head=list(head), trainable=trainable, activation=activation,
                            momentum=momentum, lr=lr, seed=seed, feedback_seed=feedback_seed,
                            standardize=standardize, trt_target=target.version, batch_profile=profile,
                            require_tensorrt=require_tensorrt, refit_graph=refit_graph)
    _print_summary(path)
    print_bundle(path)


def _print_summary(path) -> None:
    """Where the trunk was cut, how many features it gives, and what the device trains."""
    from ..bundle import param_shapes, read_bundle, trainable_params, trunk_of

    model = read_bundle(path).manifest["model"]
    trunk = trunk_of(model)
    count = lambda shapes: sum(math.prod(s) for s in shapes.values())     # noqa: E731
    trained, every = count(trainable_params(model)), count(param_shapes(model))
    widths = " -> ".join([str(trunk["features"])] + [str(layer["out"]) for layer in model["layers"]])
    console.print(escape(f"trunk: {trunk['source']} (cut at {trunk['cut']!r}, {trunk['features']} features, "
                         f"ops: {', '.join(trunk['ops'])})"), highlight=False, soft_wrap=True)
    console.print(escape(f"head: {widths} ({model['activation']}); the device trains {model['trainable']}: "
                         f"{trained:,} of {every:,} parameters"), highlight=False, soft_wrap=True)

