"""containerd's stdio for one process, pumped to and from the guest agent.

containerd creates the FIFOs and opens their far ends before it asks for the
task, so opening ours does not wait long. A path may also be a ``file://`` URI
(output appended to that file). An output stream without a path, or whose
reader went away, is still drained, so that the process never blocks on a full
pipe. Stdin ends, in the container too, when containerd closes its side (EOF)
or calls CloseIO.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable
from urllib.parse import urlparse

from hako.errors import ConfigError, HakoError
from hako.runtime.agent import AgentClient

Log = Callable[[str], None]


def _open_output(uri: str) -> int | None:
    if not uri:
        return None
    parsed = urlparse(uri)
    if parsed.scheme in ("", "fifo"):
        return os.open(parsed.path or uri, os.O_WRONLY | os.O_CLOEXEC)
    if parsed.scheme == "file":
        return os.open(parsed.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    raise ConfigError(f"unsupported stdio URI {uri!r}: hako takes FIFO paths and file:// URIs")


def check_uri(uri: str) -> None:
    """Refuse a stdio URI hako cannot serve, before anything is created."""
    if uri and urlparse(uri).scheme not in ("", "fifo", "file"):
        raise ConfigError(f"unsupported stdio URI {uri!r}: hako takes FIFO paths and file:// URIs")


class ProcessIO:
    def __init__(
        self,
        agent: AgentClient,
        container_id: str,
        exec_id: str,
        *,
        stdin: str,
        stdout: str,
        stderr: str,
        terminal: bool,
        log: Log,
    ) -> None:
        self.agent = agent
        self.container_id = container_id
        self.exec_id = exec_id
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.terminal = terminal
        self._log = log
        self._outputs: list[threading.Thread] = []
        self._stdin_closed = threading.Event()

    def start(self) -> None:
        """Begin pumping: before the process starts, so that nothing it writes is missed."""
        streams = [(self.agent.read_stdout, self.stdout)]
        if not self.terminal:
            streams.append((self.agent.read_stderr, self.stderr))
        for read, uri in streams:
            thread = threading.Thread(target=self._pump_out, args=(read, uri), daemon=True, name="stdio-out")
            thread.start()
            self._outputs.append(thread)
        if self.stdin:
            threading.Thread(target=self._pump_in, daemon=True, name="stdio-in").start()

    def _pump_out(self, read: Callable[[str, str], bytes], uri: str) -> None:
        try:
            fd = _open_output(uri)
        except (OSError, ConfigError) as exc:
            self._log(f"{self._who()}: cannot open {uri}: {exc}; output is dropped")
            fd = None
        try:
            while True:
                try:
                    data = read(self.container_id, self.exec_id)
                except HakoError:
                    return  # the process is gone (or the VM): nothing more will come
                if not data:
                    return
                if fd is not None:
                    try:
                        view = memoryview(data)
                        while view:
                            view = view[os.write(fd, view) :]
                    except OSError as exc:
                        if exc.errno != errno.EPIPE:
                            self._log(f"{self._who()}: writing {uri}: {exc.strerror}; output is dropped")
                        os.close(fd)
                        fd = None
        finally:
            if fd is not None:
                os.close(fd)

    def _pump_in(self) -> None:
        try:
            fd = os.open(urlparse(self.stdin).path or self.stdin, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            self._log(f"{self._who()}: cannot open stdin {self.stdin}: {exc.strerror}")
            return
        try:
            while not self._stdin_closed.is_set():
                data = os.read(fd, 65536)
                if not data:
                    break
                self.agent.write_stdin(self.container_id, self.exec_id, data)
        except (OSError, HakoError) as exc:
            self._log(f"{self._who()}: stdin: {exc}")
        finally:
            os.close(fd)
            self.close_stdin()

    def close_stdin(self) -> None:
        if self._stdin_closed.is_set():
            return
        self._stdin_closed.set()
        with contextlib.suppress(HakoError):
            self.agent.close_stdin(self.container_id, self.exec_id)

    def wait_output(self, timeout: float) -> None:
        """Wait until what the process wrote has been passed on (it exited: streams end soon)."""
        for thread in self._outputs:
            thread.join(timeout)

    def _who(self) -> str:
        return f"{self.container_id}/{self.exec_id}" if self.exec_id else self.container_id
