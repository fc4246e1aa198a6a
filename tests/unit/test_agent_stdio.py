"""Pull-style process I/O in the guest agent: EOF, cancellation, closing under a blocked call."""

from __future__ import annotations

import os
import threading
import time

import pytest

from hako_agent.errors import Cancelled, FailedPrecondition
from hako_agent.stdio import InputStream, OutputStream


def test_read_until_eof() -> None:
    r, w = os.pipe()
    stream = OutputStream(r)
    os.write(w, b"hello")
    assert stream.read(100) == b"hello"
    os.close(w)
    assert stream.read(100) == b""
    assert stream.read(100) == b""  # and it stays at EOF
    assert stream.closed  # released at EOF


def test_close_unblocks_a_reader() -> None:
    r, w = os.pipe()
    stream = OutputStream(r)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(stream.read(10)))
    reader.start()
    time.sleep(0.05)
    stream.close()
    reader.join(2)
    assert got == [b""]
    os.close(w)


def test_cancelled_reader_raises() -> None:
    r, w = os.pipe()
    stream = OutputStream(r)
    gone = threading.Event()
    threading.Timer(0.05, gone.set).start()
    with pytest.raises(Cancelled):
        stream.read(10, gone.is_set)
    stream.close()
    os.close(w)


def test_pty_master_reports_eof() -> None:
    master, slave = os.openpty()
    stream = OutputStream(master)
    os.write(slave, b"x\n")
    assert stream.read(100).replace(b"\r", b"") == b"x\n"
    os.close(slave)
    assert stream.read(100) == b""  # EIO after the slave side closed


def test_write_all_and_close() -> None:
    r, w = os.pipe()
    stream = InputStream(w)
    data = b"z" * 200_000  # more than a pipe holds: needs the reader
    received = bytearray()

    def drain() -> None:
        while chunk := os.read(r, 65536):
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    assert stream.write(data) == len(data)
    stream.close()
    reader.join(2)
    assert bytes(received) == data
    with pytest.raises(FailedPrecondition, match="stdin is closed"):
        stream.write(b"more")
    os.close(r)


def test_write_to_a_gone_reader() -> None:
    r, w = os.pipe()
    stream = InputStream(w)
    os.close(r)
    with pytest.raises(FailedPrecondition, match="no longer reading"):
        stream.write(b"x")
    stream.close()
