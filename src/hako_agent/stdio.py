"""A process's stdio as the agent holds it: pull-style output streams and a stdin writer.

Each stream owns one fd (a pipe end or a dup of the pty master), non-blocking,
polled together with an eventfd that :meth:`close` signals, so a reader or
writer blocked in its handler thread returns as soon as the stream is closed
(RemoveContainer) or the call's connection drops (``cancelled``). The fd is
closed only once no call is using it, so it is never reused under a poll.
"""

from __future__ import annotations

import errno
import os
import select
import threading

from hako_agent.errors import Cancelled, FailedPrecondition

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

_POLL_SLICE_MS = 250  # how often a blocked call checks whether its connection is gone


class _Stream:
    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._cancel = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._lock = threading.Lock()
        self._users = 0
        self._closed = False

    def _enter(self) -> int:
        with self._lock:
            if self._closed:
                return -1
            self._users += 1
            return self._fd

    def _leave(self) -> None:
        with self._lock:
            self._users -= 1
            self._release_locked()

    def _release_locked(self) -> None:
        if self._closed and self._users == 0 and self._fd >= 0:
            os.close(self._fd)
            os.close(self._cancel)
            self._fd = self._cancel = -1

    def close(self) -> None:
        """Close the stream; calls blocked on it return (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.eventfd_write(self._cancel, 1)
            self._release_locked()

    @property
    def closed(self) -> bool:
        return self._closed

    def _wait(self, fd: int, events: int, cancelled: Callable[[], bool] | None) -> bool:
        """Wait until ``fd`` has ``events`` (or HUP/ERR): True; False when the stream is closed.
        Raises Cancelled when ``cancelled()`` turns true."""
        poller = select.poll()
        poller.register(fd, events)
        poller.register(self._cancel, select.POLLIN)
        while True:
            if cancelled is not None and cancelled():
                raise Cancelled("gave up waiting for the stream")
            ready = poller.poll(_POLL_SLICE_MS if cancelled is not None else None)
            for ready_fd, _ in ready:
                if ready_fd == self._cancel:
                    return False
            if ready:
                return True


class OutputStream(_Stream):
    """The agent's end of a process's stdout/stderr pipe, or the pty master."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self._eof = False

    def read(self, size: int, cancelled: Callable[[], bool] | None = None) -> bytes:
        """Up to ``size`` bytes once some are available; b"" at end of stream or once closed."""
        if self._eof:
            return b""
        fd = self._enter()
        if fd < 0:
            return b""
        try:
            while self._wait(fd, select.POLLIN, cancelled):
                try:
                    data = os.read(fd, size)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if exc.errno != errno.EIO:  # EIO: the pty's slave side is gone, i.e. EOF
                        raise
                    data = b""
                if not data:
                    self._eof = True
                return data
            return b""
        finally:
            self._leave()
            if self._eof:
                self.close()


class InputStream(_Stream):
    """The agent's end of a process's stdin pipe, or a dup of the pty master."""

    def write(self, data: bytes, cancelled: Callable[[], bool] | None = None) -> int:
        """Write all of ``data``; FailedPrecondition if the reader is gone or stdin was closed."""
        fd = self._enter()
        if fd < 0:
            raise FailedPrecondition("stdin is closed")
        view = memoryview(data)
        written = 0
        try:
            while written < len(data):
                if not self._wait(fd, select.POLLOUT, cancelled):
                    raise FailedPrecondition("stdin is closed")
                try:
                    written += os.write(fd, view[written:])
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if exc.errno in (errno.EPIPE, errno.EIO):
                        raise FailedPrecondition(
                            "stdin is closed: the process is no longer reading it"
                        ) from None
                    raise
            return written
        finally:
            self._leave()
