"""`hako run -it` from a real terminal: raw mode, window size, Ctrl-C as a byte."""

from __future__ import annotations

import fcntl
import os
import select
import struct
import termios
import time

import pytest

from tests.integration.harness import BUSYBOX, Hako

pytestmark = pytest.mark.integration


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"never saw {needle!r}; got {seen!r}")
        try:
            seen += os.read(fd, 4096)
        except OSError:  # EIO: the terminal's other side closed
            break
    return seen


def test_terminal_size_and_ctrl_c(hako: Hako) -> None:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
    script = 'stty size; trap "echo got-INT; exit 7" INT; echo ready; while :; do sleep 0.1; done'
    process = hako.popen(
        "run", "--rm", "-it", BUSYBOX, "sh", "-c", script,
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
    )  # fmt: skip
    os.close(slave)
    try:
        seen = _read_until(master, b"ready", timeout=90)
        assert b"33 111" in seen, seen  # the container's tty has our window size
        os.write(master, b"\x03")  # Ctrl-C: a byte in raw mode, SIGINT from the guest's tty
        seen = _read_until(master, b"got-INT", timeout=30)
        assert process.wait(30) == 7
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
