"""Byte streams ttRPC runs over: a connected socket, or a character device fd.

The guest agent speaks over a virtio-serial port (an fd); the host over unix
sockets. Neither class imports :mod:`socket`: the caller made the socket.
"""

from __future__ import annotations

import os
import threading

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs guest boot time

if TYPE_CHECKING:
    # Type-only: `typing` is not imported at run time (guest boot cost).
    import socket
    from typing import Protocol

    class Transport(Protocol):
        def read(self, size: int) -> bytes:
            """Up to ``size`` bytes; b"" at end of stream."""

        def write(self, data: bytes) -> None:
            """All of ``data``, or OSError."""

        def shutdown(self) -> None:
            """Make a blocked read return b"" soon (idempotent)."""

        def close(self) -> None:
            """Release the underlying fd (idempotent); only after reads have stopped."""


class SocketTransport:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._closed = False

    def read(self, size: int) -> bytes:
        return self._sock.recv(size)

    def write(self, data: bytes) -> None:
        self._sock.sendall(data)

    def shutdown(self) -> None:
        try:
            self._sock.shutdown(2)  # SHUT_RDWR
        except OSError:
            pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()


class FdTransport:
    """A file descriptor such as /dev/vport0p1, opened O_RDWR by the caller.

    Reading after the peer went away returns b"" (virtio-serial reports EOF when
    the host closes its end). ``shutdown`` cannot interrupt a blocked read on a
    character device, so the owner of the read loop is the one that closes.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._closed = threading.Event()

    def read(self, size: int) -> bytes:
        if self._closed.is_set():
            return b""
        return os.read(self.fd, size)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]

    def shutdown(self) -> None:
        self._closed.set()

    def close(self) -> None:
        self._closed.set()
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
