"""Files that survive a crash, and the one folder lock: every command writes through these.

    write_json(run / "summary.json", summary)      # whole or not at all, durable once it returns
    with FolderLock(out, busy="another build is writing {path} right now; ..."):
        ...                                        # no second process holds `out` meanwhile

Atomic: the bytes go to a temporary file beside the target, are fsynced, renamed over it, and the folder
is fsynced (which makes the rename itself durable): a crash leaves the old file or the new one, never half.
The lock is an exclusive flock on the folder, which the kernel drops when its holder dies (even kill -9),
so a crashed process never leaves a stale lock: `FolderLock` holds it for a block (a build), `hold` for as
long as a process works in a folder (a run or sweep folder, which the same process may take again).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any

from read_cache.errors import ReadCacheError


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder (which makes the names in it, e.g. a rename's, durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, value: Any) -> None:
    """`value` as indented JSON (plus a newline), atomically."""
    write_text(path, json.dumps(value, indent=2) + "\n")


def remove(path: Path) -> None:
    """Delete a file, or a folder with everything in it (a link is unlinked, never followed); nothing if absent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None where it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _flock(folder: Path) -> int | None:
    """An open descriptor of `folder` holding its exclusive flock, or None when another holder has it."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class FolderLock:
    """`with FolderLock(path, busy=...)`: hold the folder's flock for the block, else a one-line error.

    Exclusive per holder, even within one process (a second build into the same folder is refused).
    `busy` is the error's text, with `{path}` standing for the folder.
    """

    def __init__(self, path: Path, *, busy: str = "another read-cache process is using {path} right now; wait for it or choose another folder"):
        self.path, self.busy = Path(path), busy
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        self._fd = _flock(self.path)
        if self._fd is None:
            raise ReadCacheError(self.busy.format(path=self.path))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# Folders this process holds for as long as it works in them (run and sweep folders): path -> descriptor.
# A rerun in the same process (a test, a notebook) takes its own folder again instead of blocking on itself.
_held: dict[Path, int] = {}


def hold(folder: Path) -> bool:
    """Take `folder`'s flock for this process until `release`; False when another process holds it."""
    key = Path(folder).resolve()
    if key in _held:
        return True
    fd = _flock(key)
    if fd is None:
        return False
    _held[key] = fd
    return True


def release(folder: Path) -> None:
    """Let a folder `hold` took go (a no-op where this process does not hold it)."""
    fd = _held.pop(Path(folder).resolve(), None)
    if fd is not None:
        os.close(fd)
