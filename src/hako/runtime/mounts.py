"""Host mounts for sandboxes: container rootfs overlays and volume binds.

A sandbox's daemon runs in its own mount namespace (``private_namespace``), a
slave of the host's: its mounts never reach the host, and they all vanish with
the namespace when the daemon and its QEMU end, crash included.

Host mounts reach it only where the host's ``/`` is shared (as systemd makes
it); where it is private, the namespace keeps the host's mounts as they were
when it was made. That is stale for a daemon that waited in the warm pool and
then serves a Kubernetes pod, whose volumes and /dev/shm were mounted since. So
a volume's source is looked up in the host's namespace as it is now
(``bind(..., from_host=True)``): a short-lived thread enters it, takes a copy
of the mount tree there (``open_tree``) and this namespace attaches the copy
(``move_mount``), as systemd binds a host path into a running container.
"""

from __future__ import annotations

import ctypes
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hako.errors import SandboxError
from hako.threads import in_own_thread

CLONE_FS = 0x00000200
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
# open_tree(2) and move_mount(2) (Linux 5.2): the same numbers on every architecture
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
OPEN_TREE_CLONE = 0x1
AT_RECURSIVE = 0x8000
AT_FDCWD = -100
MOVE_MOUNT_F_EMPTY_PATH = 0x4

_libc = ctypes.CDLL(None, use_errno=True)


class _Host:
    namespace: int | None = None  # the mount namespace private_namespace left (an fd)


T = TypeVar("T")


class SourceMissing(SandboxError):
    """A bind mount's source does not exist."""


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(err)}")


def private_namespace() -> None:
    """Move this (single-threaded) process into a new mount namespace that is a slave of the
    host's; keep a handle on the host's, for :func:`in_host_namespace`."""
    host = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        mount(None, Path("/"), None, MS_REC | MS_SLAVE)
    except BaseException:
        os.close(host)
        raise
    _Host.namespace = host


def in_host_namespace(work: Callable[[], T]) -> T:
    """``work()`` run in the host's mount namespace (the one :func:`private_namespace` left; this
    one if it was never called), by a thread of its own that ends with it. A process the work
    starts starts there too."""
    host = _Host.namespace
    if host is None:
        return work()

    def enter_and_work() -> T:
        # A thread may change its mount namespace only with a root and cwd of its own.
        _check(_libc.unshare(CLONE_FS), "unshare(CLONE_FS)")
        _check(_libc.setns(host, CLONE_NEWNS), "setns(CLONE_NEWNS) into the host's mount namespace")
        return work()

    return in_own_thread(enter_and_work, "host-mounts")


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


def bind(source: Path, target: Path, *, readonly: bool = False, from_host: bool = False) -> None:
    """Bind ``source`` (file or directory, recursively) at ``target``, creating the mount point.
    ``from_host``: ``source`` as the host's mount namespace has it now (see the module's doc).
    SourceMissing if it does not exist."""
    if from_host:
        tree = in_host_namespace(lambda: _open_tree(source))
        try:
            _make_mount_point(target, directory=stat.S_ISDIR(os.fstat(tree).st_mode))
            _move_mount(tree, target)
        finally:
            os.close(tree)
    else:
        if not source.exists():
            raise SourceMissing(f"{source} does not exist")
        _make_mount_point(target, directory=source.is_dir())
        mount(source, target, None, MS_BIND | MS_REC)
    if readonly:
        mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)


def _make_mount_point(target: Path, *, directory: bool) -> None:
    if directory:
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch(exist_ok=True)


def _open_tree(source: Path) -> int:
    """A detached copy of the mount tree at ``source`` (what ``mount --rbind`` would attach)."""
    flags = OPEN_TREE_CLONE | AT_RECURSIVE | os.O_CLOEXEC
    fd = _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, str(source).encode(), ctypes.c_uint(flags))
    if fd < 0:
        err = ctypes.get_errno()
        if err == 2:  # ENOENT
            raise SourceMissing(f"{source} does not exist")
        raise SandboxError(f"open_tree {source}: {os.strerror(err)}")
    return int(fd)


def _move_mount(tree: int, target: Path) -> None:
    result = _libc.syscall(
        SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, str(target).encode(), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)
    )
    _check(result, f"move_mount onto {target}")
