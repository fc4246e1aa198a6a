"""Content digests ("sha256:<hex>") and a reader that checks one while data streams through."""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from typing import Protocol

from hako.errors import ImageError

_ALGORITHMS = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[0-9a-f]+")
CHUNK = 1 << 20


class Readable(Protocol):
    """Anything with ``read(n) -> bytes``: files, tar members, decompressors."""

    def read(self, size: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class Digest:
    """A validated content digest; ``str()`` gives ``algorithm:hex``."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, value: object) -> Digest:
        """Parse ``algorithm:hex``; only sha256 and sha512 are accepted (the hex names blob files)."""
        if not isinstance(value, str) or ":" not in value:
            raise ImageError(f"invalid digest {value!r}: expected sha256:<64 hex digits>")
        algorithm, _, hexpart = value.partition(":")
        length = _ALGORITHMS.get(algorithm)
        if length is None:
            raise ImageError(
                f"unsupported digest algorithm in {value!r}: only sha256 and sha512 are supported"
            )
        if len(hexpart) != length or not _HEX.fullmatch(hexpart):
            raise ImageError(
                f"invalid digest {value!r}: expected {algorithm}:<{length} lowercase hex digits>"
            )
        return cls(algorithm, hexpart)

    @classmethod
    def of_bytes(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    @property
    def blob_path(self) -> str:
        """Where an OCI image layout keeps this blob, relative to the layout root."""
        return f"blobs/{self.algorithm}/{self.hex}"

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def verify_bytes(data: bytes, expected: Digest, what: str) -> None:
    actual = Digest.of_bytes(data, expected.algorithm)
    if actual != expected:
        raise ImageError(f"{what}: digest mismatch, expected {expected}, got {actual}; the image is corrupt")


class HashingReader(io.RawIOBase):
    """Read-through wrapper that hashes and counts what passes; :meth:`check` compares at the end."""

    def __init__(self, raw: Readable, algorithm: str = "sha256") -> None:
        super().__init__()
        self._raw = raw
        self._hash = hashlib.new(algorithm)
        self.algorithm = algorithm
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        data = self._raw.read(len(view))
        n = len(data)
        view[:n] = data
        self._hash.update(data)
        self.size += n
        return n

    def read(self, size: int = -1, /) -> bytes:
        if size is None or size < 0:
            return self.readall()
        data = bytearray(size)
        n = self.readinto(data)
        return bytes(data[:n])

    def readall(self) -> bytes:
        chunks = []
        while chunk := self.read(CHUNK):
            chunks.append(chunk)
        return b"".join(chunks)

    def digest(self) -> Digest:
        return Digest(self.algorithm, self._hash.hexdigest())

    def check(self, what: str, expected: Digest | None, size: int | None = None) -> None:
        """Raise if what was read does not match the expected digest or size."""
        if size is not None and self.size != size:
            raise ImageError(
                f"{what}: size mismatch, expected {size} bytes, got {self.size}; the image is corrupt"
            )
        if expected is not None and self.digest() != expected:
            raise ImageError(
                f"{what}: digest mismatch, expected {expected}, got {self.digest()}; the image is corrupt"
            )


def exhaust(stream: Readable) -> None:
    """Read a stream to its end so a wrapping :class:`HashingReader` sees every byte."""
    while stream.read(CHUNK):
        pass
