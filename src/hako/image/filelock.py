"""An exclusive ``flock`` on a lock file, between processes and between threads (one open per holder)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive_lock(path: Path, *, remove: bool = False) -> Iterator[None]:
    """Hold the lock ``path``. With ``remove`` the file goes when the lock is released, so that
    locks on names that come and go (one per template key) leave nothing behind: a holder
    unlinks it before it lets go, and whoever was waiting on that file finds it no longer at
    ``path`` and locks the one there instead."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if not remove or _is_at(fd, path):
            break
        os.close(fd)
    try:
        yield
    finally:
        if remove:
            path.unlink(missing_ok=True)
        os.close(fd)  # closing the last descriptor releases the lock


def _is_at(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
