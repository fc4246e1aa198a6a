"""A container's output: kept in a log for ``hako logs``, handed to an attached client.

The log is a sequence of records: stream byte (1 stdout, 2 stderr), length
(u32 big-endian), data. That keeps stdout and stderr apart and in order.
"""

from __future__ import annotations

import struct
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path

STDOUT = 1
STDERR = 2
_RECORD = struct.Struct(">BI")


class OutputLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()

    def append(self, stream: int, data: bytes) -> None:
        with self._lock, self.path.open("ab") as log:
            log.write(_RECORD.pack(stream, len(data)) + data)


def read_log(path: Path) -> Iterator[tuple[int, bytes]]:
    data = path.read_bytes() if path.exists() else b""
    offset = 0
    while offset + _RECORD.size <= len(data):
        stream, length = _RECORD.unpack_from(data, offset)
        offset += _RECORD.size
        yield stream, data[offset : offset + length]
        offset += length


class Channel:
    """Chunks from one stream for one attached reader; ``read`` blocks; b"" means the end."""

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._cond = threading.Condition()
        self._eof = False

    def put(self, data: bytes) -> None:
        with self._cond:
            self._chunks.append(data)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def read(self, size: int, cancelled: threading.Event) -> bytes | None:
        """Up to ``size`` bytes; b"" at the end; None if ``cancelled`` was set while waiting."""
        with self._cond:
            while not self._chunks and not self._eof:
                if cancelled.is_set():
                    return None
                self._cond.wait(0.2)
            if not self._chunks:
                return b""
            chunk = self._chunks.popleft()
            if len(chunk) > size:
                self._chunks.appendleft(chunk[size:])
                chunk = chunk[:size]
            return chunk
