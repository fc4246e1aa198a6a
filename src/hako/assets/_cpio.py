"""A writer of cpio "newc" archives, the initramfs format the kernel unpacks.

Written here rather than by cpio(1) so that the archive can hold device nodes and root-owned
files without the builder being root. Output is deterministic: fixed mtime, uid/gid 0, inode
numbers in write order.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


class CpioWriter:
    """Append entries to a newc archive on ``out``; call :meth:`close` to write the trailer."""

    def __init__(self, out: BinaryIO, mtime: int = 0) -> None:
        self._out = out
        self._mtime = mtime
        self._ino = 0
        self._written = 0
        self._names: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", nlink: int = 1, rdev: tuple[int, int] = (0, 0)
    ) -> None:
        name = name.strip("/") or "."
        if name != TRAILER:
            if name in self._names:
                raise ValueError(f"cpio: duplicate entry {name}")
            self._names.add(name)
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (
            self._ino,
            mode,
            0,
            0,
            nlink,
            self._mtime,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(encoded),
            0,
        )
        header = MAGIC + b"".join(b"%08X" % f for f in fields)
        chunk = header + encoded + _pad4(len(header) + len(encoded)) + data + _pad4(len(data))
        self._out.write(chunk)
        self._written += len(chunk)

    def add_dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def add_file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def add_symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, name: str, major: int, minor: int, perm: int = 0o666) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def add_tree(self, root: Path, prefix: str = "") -> None:
        """Add everything under ``root`` (directories first, sorted), as ``prefix/<relative path>``.

        Only directories, regular files and symlinks are taken; owners become root, permission
        bits are kept.
        """
        for path in sorted(root.rglob("*"), key=lambda p: p.relative_to(root).parts):
            name = f"{prefix}/{path.relative_to(root).as_posix()}".lstrip("/")
            st = path.lstat()
            perm = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                self.add_symlink(name, str(path.readlink()))
            elif stat.S_ISDIR(st.st_mode):
                self.add_dir(name, perm)
            elif stat.S_ISREG(st.st_mode):
                self.add_file(name, path.read_bytes(), perm)
            else:
                raise ValueError(f"cpio: {path} is neither a file, a directory nor a symlink")

    def close(self) -> None:
        """Write the trailer and pad the archive to a multiple of 512 bytes."""
        self._entry(TRAILER, 0, nlink=1)
        self._out.write(b"\0" * (-self._written % 512))
