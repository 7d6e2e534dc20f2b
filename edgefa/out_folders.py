"""`--out DIR`: edgefa writes where it is told and never deletes a file it did not write.

What DIR may hold, checked before any work (one line and exit status 2 otherwise):

    nothing, or an empty folder              written
    edgefa's own output of the same kind     written over: a bundle is replaced whole and
                                             atomically (bundle.replace_folder), the other kinds
                                             rewrite their own files in it (and the folders they
                                             make inside, NESTED, must be edgefa's own too)
    anything else                            refused; with --force it is kept, renamed to
                                             DIR.replaced-<UTC time>/, and DIR is written afresh
                                             (put back if the command fails)

A bundle is edgefa's own when every file in it is one edgefa wrote (bundle.foreign_files): in
state/ only the checkpoints, the lock, temporary files and TensorRT's caches; a user's file there
makes it "anything else". A bundle whose state/ holds device checkpoints counts as "anything else" too: those checkpoints are
fine-tuning that exists nowhere else, and a new export or pull would not carry it. With --force
the whole old bundle is kept beside, state and all, so `edgefa device evaluate` or `deploy` still
take it as it is (a bare state/ folder would mean nothing without its bundle). The current folder,
or one holding it, is never replaced or set aside, --force or not.

Device side: no torch (numpy only to read a checkpoint's step for the message).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Iterator

from . import storage
from .bundle import device_checkpoints, foreign_files, holds_current_folder, is_edgefa_bundle_folder
from .errors import EdgefaError

BUNDLE = "bundle"
# Every other kind of --out folder, by the files that show edgefa wrote it (all of them present).
MARKERS = {
    "run": ("checkpoint.pt", "metrics.json"),          # train, train-preference
    "profile": ("profile.json",),                      # profile run
    "profile-compare": ("compare.json",),              # profile compare
    "audit": ("audit.json",),
    "preference-sweep": ("preference.json",),          # experiment preference
    "fpga-sweep": ("sweep.json",),
    "demo": ("demo_report.json",),
}
KINDS = (BUNDLE, *MARKERS)
# The folders an output of a kind writes inside itself, with their own kind. It is written over
# only where each of them is edgefa's own: a bundle wholly edgefa's files (bundle.check_replaceable:
# the demo's bundles hold the device state the demo itself made, which a re-run makes again), any
# other kind by its markers.
NESTED = {"demo": {"run": "run", "bundle": BUNDLE, "device-bundle": BUNDLE}}


class OutFolderError(EdgefaError):
    """An --out folder edgefa will not write into (one line: what is there, what to do)."""


def is_kind(path: Path, kind: str) -> bool:
    """Whether the folder `path` is edgefa's own output of `kind`."""
    if kind == BUNDLE:
        return is_edgefa_bundle_folder(path)
    return all((path / name).is_file() for name in MARKERS[kind])


def _what_it_holds(path: Path) -> str:
    for kind in KINDS:
        if is_kind(path, kind):
            return f"an edgefa {kind} folder"
    foreign = foreign_files(path)
    if foreign:
        return f"a bundle with files edgefa did not write ({', '.join(foreign)})"
    return "files edgefa did not write"


def _nested_problem(path: Path, kind: str) -> str | None:
    """What in `path` (edgefa's output of `kind`) stops it from being written over: a folder it
    writes (NESTED) that holds something else; None when there is none."""
    for name, nested_kind in NESTED.get(kind, {}).items():
        folder = path / name
        if not os.path.lexists(folder):
            continue
        if not folder.is_dir() or folder.is_symlink():
            return f"an edgefa {kind} folder whose {name} is not a folder"
        if not any(folder.iterdir()) or is_kind(folder, nested_kind):
            continue
        foreign = foreign_files(folder) if nested_kind == BUNDLE else None
        what = (f"files edgefa did not write ({', '.join(foreign)})" if foreign
                else f"something other than an edgefa {nested_kind} folder")
        return f"an edgefa {kind} folder whose {name}/ holds {what}"
    return None


def _checkpoint_step(path: Path) -> str:
    """' (step N)' from the newest device checkpoint, or '' when it cannot be read."""
    try:
        import numpy as np

        with np.load(device_checkpoints(path)[0], allow_pickle=False) as saved:
            return f" (step {int(saved['step'])})"
    except Exception:            # a damaged checkpoint is still kept; the step is only for the message
        return ""


def check_out_folder(path: str | os.PathLike, kind: str, force: bool = False) -> str | None:
    """Whether `kind` may be written to `path`: None when it may as it stands, a line saying what
    --force will keep aside when it may only with `force`; OutFolderError otherwise."""
    path = Path(path)
    if not os.path.lexists(path):
        return None
    if not path.is_dir() or path.is_symlink():
        raise OutFolderError(f"--out {path}: exists and is not a folder")
    if not any(path.iterdir()):
        return None
    if kind == BUNDLE and is_kind(path, BUNDLE):
        if not device_checkpoints(path):
            if holds_current_folder(path):
                raise OutFolderError(f"--out {path}: is the current folder (or holds it); a bundle "
                                     "replaces its folder whole: name a new folder")
            return None
        held = f"a bundle with device state/{_checkpoint_step(path)}: fine-tuning that exists nowhere else"
    elif kind != BUNDLE and is_kind(path, kind):
        held = _nested_problem(path, kind)
        if held is None:
            return None
    else:
        held = _what_it_holds(path)
    if holds_current_folder(path):
        raise OutFolderError(f"--out {path}: is the current folder (or holds it) and holds {held}; "
                             "edgefa will not set it aside: name a new folder")
    if not force:
        raise OutFolderError(f"--out {path}: holds {held}; name another folder, or --force to keep "
                             f"it as {path.name}.replaced-<time>/ and write a new one")
    return f"{path} held {held}"


def _aside_name(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, n = path.with_name(f"{path.name}.replaced-{stamp}"), 1
    while os.path.lexists(target):
        n += 1
        target = path.with_name(f"{path.name}.replaced-{stamp}-{n}")
    return target


@contextlib.contextmanager
def out_folder(path: str | os.PathLike, kind: str, force: bool = False,
               say=lambda line: None) -> Iterator[Path | None]:
    """Check `path` for `kind` (check_out_folder) before the work inside the block. Where only
    --force allows it, what `path` holds is renamed to PATH.replaced-<time>/ (yielded; otherwise
    None) and `say` is told; if the block fails, what it wrote is removed (a folder this command
    created: edgefa's) and the old folder put back."""
    path = Path(path)
    reason = check_out_folder(path, kind, force)
    if reason is None:
        yield None
        return
    aside = _aside_name(path)
    storage.rename(path, aside)
    storage.fsync_dir(path.parent)
    say(f"{reason}; kept it as {aside}")
    try:
        yield aside
    except BaseException:
        storage.remove_tree(path)
        storage.rename(aside, path)
        raise


def check_store_folder(path: str | os.PathLike) -> None:
    """`device serve --store DIR`: the store is a folder the server owns (it deploys bundles into
    it, keeps uploads and a lock there). A bundle folder is refused, before anything is written:
    the server would write its .lock and incoming/ into the bundle and serve nothing from it."""
    path = Path(path)
    if path.is_dir() and foreign_files(path, limit=1) is not None:
        raise OutFolderError(f"--store {path}: that is a bundle; the store is a folder the server owns, "
                             f"e.g. --store {path.parent / 'device-store'}, and the bundle goes into it with "
                             f"`edgefa deploy {path} --device URL`")
