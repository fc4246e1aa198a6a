"""Unix sockets at paths of any length.

sun_path holds 108 bytes; sandbox directories can be deeper than that (a long
$HAKO_RUN). Longer paths are reached through the directory's descriptor,
``/proc/self/fd/<dirfd>/<name>``, which the kernel resolves like the real path.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

_SUN_PATH_MAX = 107


@contextlib.contextmanager
def _reachable(path: Path) -> Iterator[str]:
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield str(path)
        return
    dirfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{dirfd}/{path.name}"
    finally:
        os.close(dirfd)


def listen_unix(path: Path, backlog: int = 16) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _reachable(path) as address:
            sock.bind(address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def connect_unix(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _reachable(path) as address:
            sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock
