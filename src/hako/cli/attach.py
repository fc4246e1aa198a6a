"""Connecting a process in a sandbox to this terminal: stdio, signals, tty.

Output is pulled (one outstanding read per stream, Kata's model) and written
to our stdout and stderr, which stay separate. Stdin is pushed as it arrives,
and closed in the container at EOF. Signals sent to hako are forwarded to the
process (Docker's --sig-proxy); in terminal mode the tty is raw, so Ctrl-C
travels as a byte and the guest's line discipline turns it into SIGINT.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import termios
import threading
import tty
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from hako.errors import HakoError
from hako.runtime.agent import AgentClient

FORWARDED_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
)


class Attachment:
    def __init__(self, agent: AgentClient, container_id: str, exec_id: str, *, stdin: bool, terminal: bool):
        self.agent = agent
        self.container_id = container_id
        self.exec_id = exec_id
        self.stdin = stdin
        self.terminal = terminal
        self._outputs: list[threading.Thread] = []

    def start_output(self) -> None:
        """Begin pulling output (before the process starts, so nothing is missed)."""
        streams: list[tuple[Callable[[str, str], bytes], int]] = [(self._read_stdout, 1)]
        if not self.terminal:
            streams.append((self._read_stderr, 2))
        for read, fd in streams:
            thread = threading.Thread(target=self._pump_out, args=(read, fd), daemon=True)
            thread.start()
            self._outputs.append(thread)

    def _read_stdout(self, container_id: str, exec_id: str) -> bytes:
        return self.agent.read_stdout(container_id, exec_id)

    def _read_stderr(self, container_id: str, exec_id: str) -> bytes:
        return self.agent.read_stderr(container_id, exec_id)

    def _pump_out(self, read: Callable[[str, str], bytes], fd: int) -> None:
        while True:
            try:
                data = read(self.container_id, self.exec_id)
            except HakoError:
                return
            if not data:
                return
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(fd, view) :]
            except OSError:
                return  # our stdout went away (e.g. a closed pipe): stop copying

    def start_input(self) -> None:
        if self.stdin:
            threading.Thread(target=self._pump_in, daemon=True).start()

    def _pump_in(self) -> None:
        try:
            while True:
                data = os.read(0, 65536)
                if not data:
                    break
                self.agent.write_stdin(self.container_id, self.exec_id, data)
            self.agent.close_stdin(self.container_id, self.exec_id)
        except (OSError, HakoError):
            return

    def finish_output(self, timeout: float = 30.0) -> None:
        for thread in self._outputs:
            thread.join(timeout)

    def resize(self) -> None:
        if self.terminal and sys.stdout.isatty():
            size = shutil.get_terminal_size()
            with contextlib.suppress(HakoError):
                self.agent.resize_tty(self.container_id, self.exec_id, size.lines, size.columns)

    @contextlib.contextmanager
    def proxy_signals(self) -> Iterator[None]:
        """Forward signals to the process and, with a tty, follow window size changes."""

        def forward(signum: int, frame: FrameType | None) -> None:
            threading.Thread(target=self._send_signal, args=(signum,), daemon=True).start()

        def winch(signum: int, frame: FrameType | None) -> None:
            threading.Thread(target=self.resize, daemon=True).start()

        previous: dict[int, Any] = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
        previous[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, winch)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _send_signal(self, signum: int) -> None:
        with contextlib.suppress(HakoError):
            self.agent.signal_process(self.container_id, self.exec_id, signum)


@contextlib.contextmanager
def raw_terminal(enabled: bool) -> Iterator[None]:
    """Put our tty in raw mode for the duration (restored however we leave)."""
    if not enabled or not sys.stdin.isatty():
        yield
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
