"""Which bundle kinds each command that takes a bundle serves: the README's coverage table,
generated from the checks the commands themselves run, never from a list written by hand.

Every command reads its bundle through bundle.read_bundle, whose manifest check
(bundle.check_manifest) is the first refusal; some run one more before any work: `profile`
(profile_runs.session.check_profilable), `profile compare` (profile_runs.compare.check_comparable)
and `fpga simulate|sweep|cost` (fpga_sim.scope.require_in_scope). A kind here is a small manifest
built in this module (topology only: the files it lists are never read), so the table needs no
export and no torch; tests/test_coverage.py checks that real exported bundles of every kind get
the same verdicts as these manifests, and that the commands' own entry points agree.

    python -m edgefa.coverage                  print the table
    python -m edgefa.coverage --write-readme   put it into README.md between the markers
    python -m edgefa.coverage --check          exit 1 when README.md's table is not the generated one
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .bundle import (FORMAT, FORMAT_VERSION, HEAD_STEP_GRAPH, LOSS_BRADLEY_TERRY, LOSS_CROSS_ENTROPY, PAYLOAD_FILES,
                     TRUNK_GRAPH, check_manifest, model_kind, trunk_of)
from .errors import EdgefaError
from .fpga_sim.scope import require_in_scope
from .profile_runs.compare import check_comparable
from .profile_runs.session import check_profilable

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- coverage:begin -->", "<!-- coverage:end -->"
WHERE = "BUNDLE"            # the path a check names in its line; cut from the reasons in the table


# --- the bundle kinds, as manifests -------------------------------------------------------------

def _manifest(model: dict, loss: str = LOSS_CROSS_ENTROPY, extra_files: tuple[str, ...] = ()) -> dict:
    """A manifest as the exporter writes it, with placeholder file entries (never read here)."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model, "loss": loss,
            "update_rule": "dfa", "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
            "input": {"standardize": {"mean": 0.0, "std": 1.0}}, "feedback": {},
            "files": {name: {"sha256": "0" * 64, "bytes": 1} for name in (*PAYLOAD_FILES, *extra_files)}}


_MLP = {"kind": "mlp", "in_features": 64, "n_classes": 10, "activation": "relu",
        "layers": [{"name": "fc0", "in": 64, "out": 32}, {"name": "fc1", "in": 32, "out": 16},
                   {"name": "head", "in": 16, "out": 10}]}
_RESMLP = {"kind": "resmlp", "in_features": 64, "n_classes": 10, "width": 32, "depth": 2, "expansion": 1,
           "activation": "relu", "ln_eps": 1e-5}
_CNN = {"kind": "cnn", "in_features": 64, "n_classes": 10, "activation": "relu", "in_shape": [1, 8, 8],
        "convs": [{"name": "conv0", "in_channels": 1, "out_channels": 4, "kernel": 3, "stride": 1, "padding": 1,
                   "pool": 2, "in_spatial": [8, 8], "out_spatial": [4, 4]}],
        "layers": [{"name": "fc", "in": 64, "out": 32}, {"name": "head", "in": 32, "out": 10}]}
_TRUNK = {"graph": TRUNK_GRAPH, "source": "torch.onnx export of a cnn below its head", "cut": "fc's output",
          "in_features": 64, "features": 32, "frozen_layers": ["conv0", "fc"],
          "params": {"trunk.conv0.weight": [4, 1, 3, 3], "trunk.conv0.bias": [4]}}

KINDS: dict[str, dict] = {
    "mlp": _manifest(_MLP),
    "mlp last:K": _manifest(dict(_MLP, trainable="last:2")),
    "resmlp": _manifest(_RESMLP),
    "resmlp last:K": _manifest(dict(_RESMLP, trainable="last:2")),
    "preference scorer": _manifest(dict(_MLP, n_classes=1, layers=[*_MLP["layers"][:2],
                                                                    {"name": "head", "in": 16, "out": 1}]),
                                   loss=LOSS_BRADLEY_TERRY),
    "cnn": _manifest(_CNN),
    "frozen trunk + head": _manifest({"kind": "mlp", "in_features": 64, "n_classes": 10, "activation": "relu",
                                      "layers": [{"name": "head", "in": 32, "out": 10}], "trunk": _TRUNK},
                                     extra_files=(TRUNK_GRAPH, HEAD_STEP_GRAPH)),
}


def kind_of(manifest: dict) -> str:
    """Which of KINDS a (real) manifest is."""
    model = manifest["model"]
    if trunk_of(model) is not None:
        return "frozen trunk + head"
    if manifest.get("loss") == LOSS_BRADLEY_TERRY:
        return "preference scorer"
    kind = model_kind(model)
    return kind + ("" if model.get("trainable", "all") == "all" or kind == "cnn" else " last:K")


# --- the commands and their checks --------------------------------------------------------------

Check = Callable[[dict, str], None]       # (manifest, where) -> None; an EdgefaError line refuses


@dataclass(frozen=True)
class Command:
    name: str                  # as typed after `edgefa`
    checks: tuple[Check, ...]  # what the command runs, in order, before any work on the bundle


COMMANDS = (
    Command("device verify", (check_manifest,)),
    Command("device finetune", (check_manifest,)),
    Command("device evaluate", (check_manifest,)),
    Command("deploy, fleet deploy", (check_manifest,)),               # read here, and again on the device
    Command("finetune --device, fleet finetune", (check_manifest,)),  # the device's read; samples or pairs by loss
    Command("device info", (check_manifest,)),                        # the bundle a device server loaded
    Command("profile", (check_manifest, check_profilable)),
    Command("profile compare", (check_manifest, check_comparable)),
    Command("budget", (check_manifest,)),
    Command("fpga simulate, fpga sweep", (check_manifest, require_in_scope)),
    Command("fpga cost", (check_manifest, require_in_scope)),
)


def refusal(command: Command, manifest: dict) -> str | None:
    """None when `command` serves this manifest, else the one line its checks refuse it with."""
    for check in command.checks:
        try:
            check(manifest, WHERE)
        except EdgefaError as exc:
            return str(exc).removeprefix(f"{WHERE}: ")
    return None


def coverage() -> dict[str, dict[str, str | None]]:
    """command -> kind -> None (served) or the reason it is not."""
    return {c.name: {kind: refusal(c, manifest) for kind, manifest in KINDS.items()} for c in COMMANDS}


def markdown_table() -> str:
    """The table: one row per command, one column per kind; every gap numbered, its reason below."""
    table, reasons = coverage(), []
    lines = ["| command | " + " | ".join(KINDS) + " |", "|---|" + "---|" * len(KINDS)]
    for command, verdicts in table.items():
        cells = []
        for reason in verdicts.values():
            if reason is None:
                cells.append("yes")
                continue
            if reason not in reasons:
                reasons.append(reason)
            cells.append(f"no ({reasons.index(reason) + 1})")
        lines.append(f"| `{command}` | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"{i}. {reason}" for i, reason in enumerate(reasons, 1)] or ["Every command serves every kind."]
    return "\n".join(lines) + "\n"


# --- the README ---------------------------------------------------------------------------------

def with_table(text: str, table: str) -> str:
    """`text` with everything between the markers replaced by `table`; EdgefaError without them."""
    head, begin, rest = text.partition(BEGIN)
    between, end, tail = rest.partition(END)
    if not begin or not end:
        raise EdgefaError(f"README: the markers {BEGIN} and {END} are missing")
    return f"{head}{BEGIN}\n{table}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgefa.coverage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, default=README, help="the README to write or check")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write-readme", action="store_true", help="write the table between the markers")
    action.add_argument("--check", action="store_true", help="exit 1 when the README's table is stale")
    args = parser.parse_args(argv)
    table = markdown_table()
    if not (args.write_readme or args.check):
        sys.stdout.write(table)
        return 0
    try:
        text = args.readme.read_text()
        expected = with_table(text, table)
    except (OSError, EdgefaError) as exc:
        print(f"edgefa.coverage: error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if text != expected:
            print(f"{args.readme}: the coverage table is stale; run python -m edgefa.coverage --write-readme",
                  file=sys.stderr)
            return 1
        return 0
    if text != expected:
        args.readme.write_text(expected)
    print(f"wrote the coverage table into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
