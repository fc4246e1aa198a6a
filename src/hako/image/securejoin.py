"""Resolve paths inside a container rootfs on the host as the container would see them.

A rootfs is untrusted: any component may be a symlink, and an absolute symlink such as
``etc -> /host/etc`` means ``<rootfs>/host/etc`` to the container, never the host's ``/etc``. These
helpers walk a path one component at a time, expanding symlinks against the rootfs (like
``chroot`` would, and like Go's filepath-securejoin), so the result always lies inside the rootfs.
The result is only as good as the moment it was computed: use it where nothing else is changing
the tree (an unpack in a private staging directory, a rootfs no container is running from).
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from collections.abc import Iterable
from pathlib import Path

from hako.errors import ImageError

MAX_SYMLINKS = 40


def _parts(path: str) -> list[str]:
    return [part for part in path.split("/") if part not in ("", ".")]


def resolve_in_root(root: Path, path: str | Iterable[str], *, follow_final: bool = True) -> Path:
    """Return ``root``-joined ``path`` with every symlink component resolved inside ``root``.

    ``..`` never climbs above ``root``. Components that do not exist are kept as written. With
    ``follow_final=False`` the last component is not expanded even if it is a symlink (what you
    want before replacing or removing it).
    """
    pending = deque(_parts(path) if isinstance(path, str) else [p for p in path if p not in ("", ".")])
    current: list[str] = []
    links = 0
    while pending:
        part = pending.popleft()
        if part == "..":
            if current:
                current.pop()
            continue
        if not pending and not follow_final:
            current.append(part)
            break
        candidate = root.joinpath(*current, part)
        try:
            mode = os.lstat(candidate).st_mode
        except (FileNotFoundError, NotADirectoryError):
            current.append(part)
            continue
        if not stat.S_ISLNK(mode):
            current.append(part)
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise ImageError(f"too many levels of symbolic links resolving {path!r} in {root}")
        target = os.readlink(candidate)
        if target.startswith("/"):
            current = []
        pending.extendleft(reversed(_parts(target)))
    return root.joinpath(*current)


def read_file_in_root(root: Path, path: str, *, limit: int = 4 << 20) -> bytes | None:
    """Read a regular file of the rootfs (symlinks resolved inside it); None if it does not exist.

    Anything but a regular file (a FIFO, a device, a directory) is refused rather than read.
    """
    resolved = resolve_in_root(root, path)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(resolved, flags)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ImageError(f"{path} in {root} changed while it was being read") from err
        raise ImageError(f"cannot read {path} in {root}: {err.strerror}") from err
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageError(f"{path} in {root} is not a regular file")
    with os.fdopen(fd, "rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise ImageError(f"{path} in {root} is larger than {limit} bytes")
    return data
