"""Host mounts for sandboxes: container rootfs overlays and volume binds.

A sandbox's daemon runs in its own mount namespace (``private_namespace``), a
slave of the host's: host mounts still reach it, its mounts never reach the
host, and they all vanish with the namespace when the daemon and its QEMU end,
crash included.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from hako.errors import SandboxError

CLONE_NEWNS = 0x00020000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MNT_DETACH = 0x2

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(err)}")


def private_namespace() -> None:
    """Move this (single-threaded) process into a new mount namespace that is a slave of the host's."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    mount(None, Path("/"), None, MS_REC | MS_SLAVE)


def mount(
    source: str | Path | None, target: Path, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    src = str(source).encode() if source is not None else None
    fs = fstype.encode() if fstype is not None else None
    opts = data.encode() if data is not None else None
    _check(_libc.mount(src, str(target).encode(), fs, flags, opts), f"mount {source} on {target}")


def umount(target: Path) -> None:
    """Detach ``target``; a target that is not mounted is fine (teardown is idempotent)."""
    if _libc.umount2(str(target).encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (22, 2):  # EINVAL: not a mount point; ENOENT: gone already
            raise SandboxError(f"umount {target}: {os.strerror(err)}")


def _escape_lower(path: Path) -> str:
    # overlayfs separates lower dirs with ':' and options with ','; both may appear in paths.
    return str(path).replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def overlay(lower: Path, upper: Path, work: Path, target: Path) -> None:
    """A writable view of ``lower`` at ``target``; writes land in ``upper``. nosuid,nodev on the host."""
    for directory in (upper, work, target):
        directory.mkdir(parents=True, exist_ok=True)
    data = f"lowerdir={_escape_lower(lower)},upperdir={upper},workdir={work}"
    mount("overlay", target, "overlay", MS_NOSUID | MS_NODEV, data)


def bind(source: Path, target: Path, *, readonly: bool = False) -> None:
    """Bind ``source`` (file or directory, recursively) at ``target``, creating the mount point."""
    if source.is_dir():
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch(exist_ok=True)
    mount(source, target, None, MS_BIND | MS_REC)
    if readonly:
        mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
