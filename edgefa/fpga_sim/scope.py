"""What the FPGA simulator and the cost model cover: one check, used by all of them. Pure stdlib.

The fixed-point datapath (datapath.FixedPointDFA, and so `simulate` and `sweep`) and the MAC-array
cost model (cost.py) both model one DFA step of an MLP, built from matmuls, a table or mask for the
activation, the softmax unit for the output error, and the update. Covered:

  * every layer trained, or the last K (`trainable: last:K`, the units of an MLP being its layers):
    the frozen layers below are plain forward matmuls with no error, gradient or update;
  * the mean cross-entropy, or a one-output scorer's Bradley-Terry loss on pairs. Its error
    e_w = -sigmoid(-(s_w - s_l)) / batch, e_l = -e_w is the two-class softmax error of the scores
    (s_w, s_l) with the chosen item as the label, so the same softmax unit computes it.

Refused in one line, before any work, rather than simulated wrongly: a residual MLP (its
LayerNorms need a per-row mean, variance and reciprocal square root, none of which the datapath
has), a CNN (conv stages and max-pool routing are not in the datapath yet), a bundle with a frozen
trunk (an arbitrary ONNX graph), and any other loss.

The manifest strings mirror edgefa/bundle.py (`model_kind`'s default, `LOSS_CROSS_ENTROPY`,
`LOSS_BRADLEY_TERRY`, `check_trainable_syntax`); they are spelled out here so that cost.py stays
free of numpy (tests/test_bundle_kinds.py checks them).
"""

from __future__ import annotations

from ..errors import EdgefaError

KIND = "mlp"                                        # bundle.model_kind of a manifest without one
TRAINABLE = "all"
LOSS = "cross_entropy (mean over the batch)"        # bundle.LOSS_CROSS_ENTROPY, the default loss
LOSS_BRADLEY_TERRY = "bradley-terry"                # bundle.LOSS_BRADLEY_TERRY
COVERED = ("the fixed-point datapath models an MLP's DFA step (every layer or the last K; "
           "cross-entropy, or Bradley-Terry pairs for a one-output scorer)")
WHY_NOT_KIND = {
    "resmlp": "its LayerNorms need a per-row mean, variance and reciprocal square root, which the datapath lacks",
    "cnn": "conv stages (im2col matmuls) and max-pool routing are not in the datapath yet",
}


class OutOfScope(EdgefaError):
    """A bundle the fixed-point datapath and the cost model do not model."""


def trained_count(model: dict) -> int | None:
    """K of `trainable: last:K` (None: every layer); ValueError when it is not that form."""
    spec = model.get("trainable", TRAINABLE)
    if spec == TRAINABLE:
        return None
    kind, sep, count = str(spec).partition(":")
    if kind != "last" or not sep or not count.isdigit() or int(count) < 1:
        raise ValueError(f"trainable {spec!r}")
    return int(count)


def out_of_scope(manifest: dict) -> list[str]:
    """What about this manifest (or {"model": model}) is outside the modelled step, each with why;
    [] if nothing."""
    model = manifest.get("model") or {}
    kind, loss = model.get("kind", KIND), manifest.get("loss", LOSS)
    found = []
    if kind != KIND:
        found.append(f"model kind {kind!r} ({WHY_NOT_KIND.get(kind, 'not an MLP')})")
    if "trunk" in model:
        found.append("a frozen trunk (an arbitrary ONNX graph, not the datapath's matmuls)")
    try:
        trained_count(model)
    except ValueError:
        found.append(f"trainable {model.get('trainable')!r} (not 'all' or 'last:K')")
    if loss not in (LOSS, LOSS_BRADLEY_TERRY):
        found.append(f"loss {loss!r} (not cross-entropy or bradley-terry)")
    return found


def require_in_scope(manifest: dict, where: str | None = None) -> None:
    """Raise OutOfScope (one line, naming `where` when given) unless the manifest describes an MLP
    step the datapath and the cost model cover (see the module doc)."""
    found = out_of_scope(manifest)
    if found:
        raise OutOfScope(("" if where is None else f"{where}: ")
                         + f"fpga: {COVERED}; this bundle is {', '.join(found)}")


def is_pairs(manifest: dict) -> bool:
    """A Bradley-Terry bundle: its step takes pairs (x_chosen, x_rejected), 2 x batch rows."""
    return manifest.get("loss", LOSS) == LOSS_BRADLEY_TERRY
