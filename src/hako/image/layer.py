"""Apply one filesystem layer (a tar stream) onto an unpacked rootfs, safely.

Threat model: a layer is attacker-controlled data unpacked on the host, usually as root. A member
may name ``../x`` (refused), ``/etc/x`` (unpacked as ``<rootfs>/etc/x``, as Docker does), or walk
through a symlink planted by an earlier member or layer (``a -> /etc`` then ``a/passwd``: the
symlink is resolved inside the rootfs, so this writes ``<rootfs>/etc/passwd``). Every parent
directory is checked with ``lstat`` to be a real directory before anything is created in it, files
are created with ``O_NOFOLLOW | O_EXCL``, and hard-link targets are resolved inside the rootfs.
Symlink *targets* are data for the container and are stored exactly as written.

Whiteouts follow the OCI layer spec: ``.wh.NAME`` deletes NAME from lower layers, and
``.wh..wh..opq`` empties its directory of everything lower layers put there while keeping what
this layer adds, wherever the marker appears in the tar.

The caller owns ``root`` exclusively while this runs (a private staging directory), which is what
makes check-then-create safe here.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tarfile
from pathlib import Path

from hako.errors import ImageError
from hako.image.securejoin import resolve_in_root

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_COPY_CHUNK = 1 << 20
# xattrs that would change how an overlay mount built on this rootfs resolves names.
_REFUSED_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
_XATTR_PAX_PREFIX = "SCHILY.xattr."


def member_parts(name: str, what: str) -> list[str]:
    """Split a member name into clean components; refuse names that climb out of the rootfs."""
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise ImageError(f"{what}: member {name!r} points outside the rootfs; refusing to unpack")
            parts.pop()
        else:
            parts.append(part)
    return parts


def apply_layer(tar: tarfile.TarFile, root: Path, *, what: str, privileged: bool | None = None) -> None:
    """Unpack every member of ``tar`` (read in order, stream mode is fine) onto ``root``.

    ``privileged`` (default: running as root) keeps ownership and creates device nodes; without
    it ownership is left to the current user and device nodes are skipped.
    """
    _Unpacker(root, what, os.geteuid() == 0 if privileged is None else privileged).run(tar)


class _Unpacker:
    def __init__(self, root: Path, what: str, privileged: bool) -> None:
        self.root = Path(os.path.realpath(root))
        self.what = what
        self.privileged = privileged
        # Paths this layer created (and their ancestors): what an opaque marker keeps.
        self.written: set[str] = {str(self.root)}
        self.dir_times: list[tuple[Path, tarfile.TarInfo]] = []

    def run(self, tar: tarfile.TarFile) -> None:
        member: tarfile.TarInfo | None = None
        try:
            for member in tar:
                self._member(tar, member)
        except OSError as err:
            name = member.name if member is not None else "?"
            raise ImageError(f"{self.what}: cannot unpack {name!r}: {err.strerror or err}") from err
        # Directory times last: creating entries inside a directory bumps its mtime.
        for path, info in reversed(self.dir_times):
            self._set_mtime(path, info)

    def _member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = member_parts(member.name, self.what)
        if not parts:
            if not member.isdir():
                raise ImageError(f"{self.what}: member {member.name!r} would replace the rootfs itself")
            self._finish(self.root, member, is_dir=True)
            return
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX) and base != OPAQUE_MARKER:
            hidden = base[len(WHITEOUT_PREFIX) :]
            if hidden.startswith(WHITEOUT_PREFIX):
                return  # aufs bookkeeping such as .wh..wh.plnk: nothing to apply
            if hidden in ("", ".", ".."):
                raise ImageError(f"{self.what}: invalid whiteout {member.name!r}")
            # Resolved, not created: deleting from a directory that does not exist is a no-op.
            _remove(resolve_in_root(self.root, parts[:-1]) / hidden)
            return
        parent = self._parent_dir(parts[:-1], member.name)
        if base == OPAQUE_MARKER:
            self._mark_written(parent)
            self._make_opaque(parent)
            return
        target = parent / base
        if member.isdir():
            if not self._clear(target, keep_dir=True):
                os.mkdir(target, 0o700)
            self._mark_written(target)
            self._finish(target, member, is_dir=True)
            return
        self._clear(target, keep_dir=False)
        self._mark_written(target)
        if member.isreg():
            self._write_file(tar, member, target)
        elif member.issym():
            os.symlink(member.linkname, target)
            self._finish(target, member, is_link=True)
        elif member.islnk():
            os.link(self._hardlink_source(member), target, follow_symlinks=False)
        elif member.ischr() or member.isblk():
            if not self.privileged:
                log.debug("%s: skipping device node %s (not running as root)", self.what, member.name)
                return
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(target, 0o600 | kind, os.makedev(member.devmajor, member.devminor))
            self._finish(target, member)
        elif member.isfifo():
            os.mkfifo(target, 0o600)
            self._finish(target, member)
        else:
            log.warning("%s: skipping %s: unsupported tar entry type %r", self.what, member.name, member.type)

    def _parent_dir(self, parts: list[str], name: str) -> Path:
        """Resolve the parent inside the rootfs and make sure each component is a real directory."""
        parent = resolve_in_root(self.root, parts)
        current = self.root
        for component in parent.relative_to(self.root).parts:
            current = current / component
            try:
                mode = os.lstat(current).st_mode
            except FileNotFoundError:
                os.mkdir(current, 0o755)
                continue
            if not stat.S_ISDIR(mode):
                rel = current.relative_to(self.root)
                raise ImageError(f"{self.what}: cannot unpack {name!r}: /{rel} is not a directory")
        return parent

    def _clear(self, target: Path, *, keep_dir: bool) -> bool:
        """Remove what is at ``target``; return True if it is a directory that was kept."""
        try:
            mode = os.lstat(target).st_mode
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(mode):
            if keep_dir:
                return True
            shutil.rmtree(target)
        else:
            os.unlink(target)
        return False

    def _hardlink_source(self, member: tarfile.TarInfo) -> Path:
        parts = member_parts(member.linkname, self.what)
        if not parts:
            raise ImageError(f"{self.what}: hard link {member.name!r} points at the rootfs itself")
        source = resolve_in_root(self.root, parts[:-1]) / parts[-1]
        try:
            mode = os.lstat(source).st_mode
        except (FileNotFoundError, NotADirectoryError):
            raise ImageError(
                f"{self.what}: hard link {member.name!r} -> {member.linkname!r}: target does not exist"
            ) from None
        if stat.S_ISDIR(mode):
            raise ImageError(f"{self.what}: hard link {member.name!r} -> {member.linkname!r} is a directory")
        return source

    def _write_file(self, tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
        source = tar.extractfile(member)
        if source is None:
            raise ImageError(f"{self.what}: cannot read the contents of {member.name!r}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(target, flags, 0o600), "wb") as out:
            shutil.copyfileobj(source, out, _COPY_CHUNK)
        self._finish(target, member)

    def _finish(
        self, path: Path, member: tarfile.TarInfo, *, is_dir: bool = False, is_link: bool = False
    ) -> None:
        """Ownership, then mode (chown clears setuid), then xattrs (chown clears capabilities), then times."""
        if self.privileged:
            os.lchown(path, member.uid, member.gid)
        if not is_link:
            mode = member.mode & 0o7777
            if is_dir and not self.privileged:
                mode |= 0o700  # we must still be able to write into it and remove it
            os.chmod(path, mode)
        self._set_xattrs(path, member)
        if is_dir:
            self.dir_times.append((path, member))
        else:
            self._set_mtime(path, member)

    def _set_xattrs(self, path: Path, member: tarfile.TarInfo) -> None:
        for key, value in member.pax_headers.items():
            if not key.startswith(_XATTR_PAX_PREFIX):
                continue
            name = key[len(_XATTR_PAX_PREFIX) :]
            if name.startswith(_REFUSED_XATTR_PREFIXES):
                log.warning("%s: ignoring xattr %s on %s", self.what, name, member.name)
                continue
            try:
                os.setxattr(path, name, value.encode("utf-8", "surrogateescape"), follow_symlinks=False)
            except OSError as err:
                log.debug("%s: cannot set xattr %s on %s: %s", self.what, name, member.name, err)

    def _set_mtime(self, path: Path, member: tarfile.TarInfo) -> None:
        try:
            ns = int(member.mtime * 1_000_000_000)
            os.utime(path, ns=(ns, ns), follow_symlinks=False)
        except (OSError, OverflowError, ValueError) as err:
            log.debug("%s: cannot set mtime of %s: %s", self.what, member.name, err)

    def _mark_written(self, path: Path) -> None:
        current = str(path)
        while current not in self.written:
            self.written.add(current)
            current = os.path.dirname(current)

    def _make_opaque(self, directory: Path) -> None:
        try:
            if not stat.S_ISDIR(os.lstat(directory).st_mode):
                return
        except FileNotFoundError:
            return
        with os.scandir(directory) as entries:
            children = list(entries)
        for entry in children:
            path = os.path.join(directory, entry.name)
            if path not in self.written:
                _remove(Path(path))
            elif entry.is_dir(follow_symlinks=False):
                self._make_opaque(Path(path))


def _remove(path: Path) -> None:
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)
