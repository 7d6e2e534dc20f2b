"""What the FPGA simulator and the cost model cover: one check, used by all of them. Pure stdlib.

The fixed-point datapath (datapath.FixedPointDFA, and so `simulate` and `sweep`) and the MAC-array
cost model (cost.py) both model one step: an MLP's full DFA step on the mean cross-entropy, every
layer trained. A bundle outside that (another model kind, `trainable: last:K`, a Bradley-Terry
preference bundle) is refused in one line before any work, rather than simulated wrongly.

The manifest strings mirror edgefa/bundle.py (`model_kind`'s default, `LOSS_CROSS_ENTROPY`); they
are spelled out here so that cost.py stays free of numpy (tests/test_bundle_kinds.py checks them).
"""

from __future__ import annotations

from ..errors import EdgefaError

KIND = "mlp"                                        # bundle.model_kind of a manifest without one
TRAINABLE = "all"
LOSS = "cross_entropy (mean over the batch)"        # bundle.LOSS_CROSS_ENTROPY, the default loss


class OutOfScope(EdgefaError):
    """A bundle the fixed-point datapath and the cost model do not model."""


def out_of_scope(manifest: dict) -> list[str]:
    """What about this manifest (or {"model": model}) is outside the modelled step; [] if nothing."""
    model = manifest.get("model") or {}
    kind, trainable = model.get("kind", KIND), model.get("trainable", TRAINABLE)
    loss = manifest.get("loss", LOSS)
    found = []
    if kind != KIND:
        found.append(f"model kind {kind!r}")
    if trainable != TRAINABLE:
        found.append(f"trainable {trainable!r}")
    if loss != LOSS:
        found.append(f"loss {loss!r}")
    return found


def require_full_mlp_dfa(manifest: dict, where: str | None = None) -> None:
    """Raise OutOfScope (one line, naming `where` when given) unless the manifest describes an MLP
    trained whole by the cross-entropy DFA step."""
    found = out_of_scope(manifest)
    if found:
        raise OutOfScope(("" if where is None else f"{where}: ")
                         + "fpga: the fixed-point datapath models the MLP's full cross-entropy DFA step; "
                         + f"this bundle is {', '.join(found)}")
