"""Read the files of an image on disk, whether it is a directory or a tar of one.

An image layout tar (skopeo, buildah, ``docker save``) and a docker-archive tar are read in
place, member by member, without unpacking the outer tar. Member names are looked up after
normalisation (``./blobs/x`` and ``blobs/x`` are the same), and links inside the archive (old
``docker save`` links duplicate ``layer.tar`` files) are followed within the archive only.
"""

from __future__ import annotations

import abc
import os
import posixpath
import stat
import tarfile
from pathlib import Path
from typing import IO

from hako.errors import ImageError
from hako.image.layer import member_parts

MAX_JSON = 8 << 20
_MAX_LINK_HOPS = 16


def _normalise(name: str) -> str | None:
    """Archive-relative name without ``.``/empty parts; None if it climbs out with ``..``."""
    try:
        return "/".join(member_parts(name, "archive"))
    except ImageError:
        return None


class ImageSource(abc.ABC):
    """Named files of one image directory or tar; ``description`` is how errors refer to it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = str(path)

    @abc.abstractmethod
    def exists(self, name: str) -> bool: ...

    @abc.abstractmethod
    def open(self, name: str) -> IO[bytes]:
        """Open a regular file by its archive-relative name; ImageError if it is missing."""

    def read(self, name: str, limit: int = MAX_JSON) -> bytes:
        with self.open(name) as file:
            data = file.read(limit + 1)
        if len(data) > limit:
            raise ImageError(f"{self.description}: {name} is larger than {limit} bytes")
        return data

    def close(self) -> None:
        return None

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _missing(self, name: str) -> ImageError:
        return ImageError(f"{self.description}: {name} is missing; the image is incomplete")


class DirSource(ImageSource):
    """An image layout (or unpacked docker-archive) directory."""

    def _path(self, name: str) -> Path | None:
        clean = _normalise(name)
        return None if not clean else self.path / clean

    def exists(self, name: str) -> bool:
        path = self._path(name)
        return path is not None and path.is_file()

    def open(self, name: str) -> IO[bytes]:
        path = self._path(name)
        if path is None:
            raise ImageError(f"{self.description}: invalid file name {name!r} in the image")
        try:
            file = open(path, "rb")  # noqa: SIM115 - returned to the caller
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise self._missing(name) from None
        except OSError as err:
            raise ImageError(f"{self.description}: cannot read {name}: {err.strerror}") from err
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            file.close()
            raise ImageError(f"{self.description}: {name} is not a regular file")
        return file


class TarSource(ImageSource):
    """An image tar, optionally compressed (gzip, bzip2, xz), read in place."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by close()
            members = self._tar.getmembers()
        except (OSError, tarfile.TarError, EOFError) as err:
            raise ImageError(f"{path}: cannot read the image tar: {err}") from err
        self._members: dict[str, tarfile.TarInfo] = {}
        for member in members:
            clean = _normalise(member.name)
            if clean:
                self._members[clean] = member  # a later duplicate wins, as in tar extraction

    def close(self) -> None:
        self._tar.close()

    def _resolve(self, name: str) -> tarfile.TarInfo | None:
        clean = _normalise(name)
        for _ in range(_MAX_LINK_HOPS):
            member = self._members.get(clean) if clean else None
            if member is None or member.isreg():
                return member
            if member.issym():
                clean = _normalise(posixpath.join(posixpath.dirname(clean or ""), member.linkname))
            elif member.islnk():
                clean = _normalise(member.linkname)
            else:
                return None
        raise ImageError(f"{self.description}: too many links resolving {name} in the image tar")

    def exists(self, name: str) -> bool:
        return self._resolve(name) is not None

    def open(self, name: str) -> IO[bytes]:
        member = self._resolve(name)
        if member is None:
            raise self._missing(name)
        try:
            file = self._tar.extractfile(member)
        except (OSError, tarfile.TarError) as err:
            raise ImageError(f"{self.description}: cannot read {name}: {err}") from err
        if file is None:
            raise self._missing(name)
        return file
