"""The few file operations every atomic replace is made of, through one seam a test can break.

Checkpoints, deploys and reports are replaced atomically: write a temporary file beside the
target, fsync it, rename it over the target, fsync the folder. Each of those steps is one call
here (`write_file`, `fsync_file`, `rename`, `fsync_dir`, `remove`, `remove_tree`, `make_dir`), and
each first asks the active fault plan whether to go on. So a test can do what SQLite does to its
commits: run an operation once to count its I/O points, then run it again crashing at each point
in turn (or with the disk full from that point on), and check that what is on disk is the old
state or the new one, never neither, and that a fresh start recovers:

    with storage.faults() as plan:          # count: no fault, every operation recorded
        save_state(bundle, state)
    for n in range(1, len(plan.ops) + 1):
        with storage.faults(crash_at=n):    # the n-th operation "crashes" the process
            with pytest.raises(storage.InjectedCrash):
                save_state(bundle, state)
        ...                                 # check the disk, then start afresh

A crash is an `InjectedCrash` (a BaseException, so `except Exception` rollback code does not run,
as it would not in a dead process), and every later operation in the plan raises it too without
touching the disk. A crash at a `write` writes the first half of the data first: a torn file.
`disk_full_from=n` makes the n-th and every later write, fsync and mkdir fail with ENOSPC (a
short write for `write`), while renames and removals still work, as they do on a full disk.

The same module holds the advisory lock (`hold_lock`) that keeps two processes off one bundle's
state or one device store. Device side: numpy-free, torch-free.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Union

from .errors import EdgefaError


class InjectedCrash(BaseException):
    """The process 'died' at an injected fault point (tests only)."""


@dataclass
class FaultPlan:
    crash_at: int | None = None          # 1-based index of the operation that crashes
    disk_full_from: int | None = None    # 1-based index from which writes fail with ENOSPC
    ops: list[tuple[str, str]] = field(default_factory=list)   # (operation, path) as attempted
    crashed: bool = False

    def check(self, op: str, path: os.PathLike | str) -> str | None:
        """Record the operation; raise if it crashes; 'enospc' if it must fail for a full disk."""
        if self.crashed:
            raise InjectedCrash(f"{op} {path} after the crash")
        self.ops.append((op, str(path)))
        n = len(self.ops)
        if self.crash_at is not None and n >= self.crash_at:
            self.crashed = True
            return "crash"
        if self.disk_full_from is not None and n >= self.disk_full_from and op in WRITING_OPS:
            return "enospc"
        return None


WRITING_OPS = frozenset({"write", "fsync", "fsync_dir", "mkdir"})
_plan: FaultPlan | None = None


@contextlib.contextmanager
def faults(crash_at: int | None = None, disk_full_from: int | None = None) -> Iterator[FaultPlan]:
    """Run the block under a fault plan (a testing seam; without one every operation just runs).
    With no argument the plan only records the operations, to count an operation's I/O points."""
    global _plan
    previous, _plan = _plan, FaultPlan(crash_at, disk_full_from)
    try:
        yield _plan
    finally:
        _plan = previous


def _fault(op: str, path) -> str | None:
    return _plan.check(op, path) if _plan is not None else None


def _raise(kind: str, op: str, path) -> None:
    if kind == "crash":
        raise InjectedCrash(f"crash at {op} {path}")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


# --- the operations ----------------------------------------------------------------------------

Content = Union[bytes, Callable[[BinaryIO], None]]   # the bytes, or a function that writes them


def write_file(path: Path, data: Content, sync: bool = True) -> None:
    """Create or truncate `path` and write `data` (bytes, or a function that streams them into the
    open file, e.g. np.savez: no copy in memory); then fsync it, unless `sync` is False."""
    kind = _fault("write", path)
    with open(path, "wb") as f:
        if isinstance(data, (bytes, bytearray, memoryview)):
            f.write(data)
        else:
            data(f)
        if kind:                                 # what a crash or a full disk leaves: a torn file
            f.flush()
            f.truncate(f.tell() // 2)
            _raise(kind, "write", path)
        if sync:
            f.flush()
            fsync_file(f)


def fsync_file(f) -> None:
    kind = _fault("fsync", f.name)
    if kind:
        _raise(kind, "fsync", f.name)
    os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable."""
    kind = _fault("fsync_dir", path)
    if kind:
        _raise(kind, "fsync_dir", path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename(src: Path, dst: Path) -> None:
    """os.replace: atomic within one file system (a folder `dst` must not exist or be empty)."""
    if _fault("rename", f"{src} -> {dst}"):
        _raise("crash", "rename", src)
    os.replace(src, dst)


def remove(path: Path) -> None:
    """Remove a file edgefa wrote, if it is there."""
    if _fault("remove", path):
        _raise("crash", "remove", path)
    Path(path).unlink(missing_ok=True)


def remove_tree(path: Path) -> None:
    """Remove a folder edgefa wrote (a staging or trash folder), if it is there."""
    if not os.path.lexists(path):
        return
    if _fault("remove_tree", path):
        _raise("crash", "remove_tree", path)
    shutil.rmtree(path)


def make_dir(path: Path) -> None:
    """mkdir -p."""
    if Path(path).is_dir():
        return
    kind = _fault("mkdir", path)
    if kind:
        _raise(kind, "mkdir", path)
    Path(path).mkdir(parents=True, exist_ok=True)


def replace_file(path: str | os.PathLike, data: Content, keep_previous: Path | None = None) -> Path:
    """Write `data` to `path` whole or not at all: a temporary `.NAME.PID.tmp` beside it, fsynced,
    renamed over `path`, the folder fsynced. With `keep_previous`, the file `path` held moves there
    first (a second generation to fall back to). On failure the temporary file is removed and a
    moved previous file is put back; after a crash, `path` holds the old data or the new, or (only
    between the two renames) is absent while `keep_previous` holds the old."""
    path = Path(path)
    make_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    rotated = False
    try:
        write_file(tmp, data)
        if keep_previous is not None and path.exists():
            rename(path, keep_previous)
            rotated = True
        rename(tmp, path)
        fsync_dir(path.parent)
    except Exception:
        if rotated and not path.exists():
            rename(keep_previous, path)
        remove(tmp)
        raise
    return path


def quarantine(path: Path, folder: Path) -> Path:
    """Move `path` into `folder` as NAME-<UTC time> (never delete it: someone may want to look)."""
    make_dir(folder)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, n = folder / f"{path.name}-{stamp}", 1
    while os.path.lexists(target):
        n += 1
        target = folder / f"{path.name}-{stamp}-{n}"
    rename(path, target)
    fsync_dir(path.parent)
    fsync_dir(folder)
    return target


# --- the lock --------------------------------------------------------------------------------

class LockHeld(EdgefaError):
    """Another process holds the lock (its pid is in the message)."""


class HeldLock:
    """An exclusive flock on a lock file, held until `release()` or until the process ends (the
    kernel drops it then, so a killed holder never leaves a stale lock). The file holds the
    holder's pid, for the message a second process gets; it is never removed (removing a lock
    file while another process waits on it would let two processes hold 'the' lock)."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    def holds(self, path: Path) -> bool:
        """Whether this is the lock on the file now at `path` (the same file, not just the same
        name: a folder renamed over another brings its own lock file)."""
        try:
            there = os.stat(path)
        except FileNotFoundError:
            return False
        mine = os.fstat(self._fd) if self._fd is not None else None
        return mine is not None and (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)          # closing the descriptor drops the flock
            self._fd = None

    def __del__(self):
        self.release()

    def __enter__(self) -> "HeldLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def hold_lock(path: Path, what: str) -> HeldLock:
    """Take the lock at `path` now, or raise LockHeld at once: '<what> is in use by process PID'."""
    make_dir(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise LockHeld(f"{what} is in use by process {holder} (lock {path}); "
                       "wait for it to finish or stop it, then try again") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return HeldLock(path, fd)
