"""containerd's stdio FIFOs and file:// URIs, pumped to and from a fake agent (no root, no VM)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hako.errors import AgentError, ConfigError, ContainerNotFound
from hako.shim.stdio import ProcessIO, check_uri
from tests.unit.shim_fakes import FakeAgent, as_agent


@pytest.fixture
def agent() -> FakeAgent:
    return FakeAgent()


@pytest.fixture
def logged() -> list[str]:
    return []


def _io(
    agent: FakeAgent,
    logged: list[str],
    *,
    stdin: str = "",
    stdout: str = "",
    stderr: str = "",
    terminal: bool = False,
    exec_id: str = "",
) -> ProcessIO:
    return ProcessIO(
        as_agent(agent),
        "c1",
        exec_id,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        terminal=terminal,
        log=logged.append,
    )


@pytest.fixture
def fifos(tmp_path: Path) -> Iterator[dict[str, Path]]:
    made = {name: tmp_path / name for name in ("in", "out", "err")}
    for path in made.values():
        os.mkfifo(path)
    yield made


def _read_all(fd: int, timeout: float = 5.0) -> bytes:
    """Everything until EOF from a non-blocking FIFO reader."""
    data = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        if not chunk:
            return bytes(data)
        data.extend(chunk)
    raise AssertionError(f"no EOF after {timeout} s; read {bytes(data)!r}")


@pytest.mark.parametrize(
    "uri", ["", "/run/containerd/fifo/1/c1-stdout", "fifo:///x/y", "file:///var/log/c1.log"]
)
def test_uris_hako_serves(uri: str) -> None:
    check_uri(uri)


@pytest.mark.parametrize("uri", ["binary:///usr/bin/logger?arg=1", "http://host/x", "npipe:////./pipe/x"])
def test_uris_hako_refuses(uri: str) -> None:
    message = re.escape(f"unsupported stdio URI '{uri}': hako takes FIFO paths and file:// URIs")
    with pytest.raises(ConfigError, match=f"^{message}$"):
        check_uri(uri)


def test_stdout_and_stderr_reach_their_fifos_until_the_streams_end(
    agent: FakeAgent, logged: list[str], fifos: dict[str, Path]
) -> None:
    out = os.open(fifos["out"], os.O_RDONLY | os.O_NONBLOCK)  # containerd opens its ends first
    err = os.open(fifos["err"], os.O_RDONLY | os.O_NONBLOCK)
    try:
        io = _io(agent, logged, stdout=str(fifos["out"]), stderr=str(fifos["err"]))
        agent.feed("c1", "", "stdout", b"hello ", b"world\n" * 20000, b"")  # more than a pipe holds
        agent.feed("c1", "", "stderr", b"oops\n", b"")
        io.start()
        assert _read_all(out) == b"hello " + b"world\n" * 20000
        assert _read_all(err) == b"oops\n"
        io.wait_output(5)
    finally:
        os.close(out)
        os.close(err)
    assert logged == []


def test_fifo_uri_scheme_and_file_uri(
    agent: FakeAgent, logged: list[str], fifos: dict[str, Path], tmp_path: Path
) -> None:
    log_file = tmp_path / "c1.log"
    log_file.write_bytes(b"earlier\n")
    out = os.open(fifos["out"], os.O_RDONLY | os.O_NONBLOCK)
    try:
        io = _io(agent, logged, stdout=f"fifo://{fifos['out']}", stderr=f"file://{log_file}")
        agent.feed("c1", "", "stdout", b"to the fifo", b"")
        agent.feed("c1", "", "stderr", b"appended\n", b"")
        io.start()
        assert _read_all(out) == b"to the fifo"
        io.wait_output(5)
    finally:
        os.close(out)
    assert log_file.read_bytes() == b"earlier\nappended\n"  # appended, not truncated
    assert logged == []


def test_a_terminal_has_no_stderr_and_output_without_a_path_is_drained(
    agent: FakeAgent, logged: list[str]
) -> None:
    io = _io(agent, logged, terminal=True)
    agent.feed("c1", "", "stdout", b"x" * 100, b"y" * 100, b"")
    io.start()
    io.wait_output(5)
    assert [read for read in agent.reads if read[2] == "stdout"] == [("c1", "", "stdout")] * 3
    assert not any(read[2] == "stderr" for read in agent.reads)
    assert logged == []


def test_output_is_drained_after_containerd_stops_reading(
    agent: FakeAgent, logged: list[str], fifos: dict[str, Path]
) -> None:
    """A reader that went away (EPIPE) must not leave the process blocked on a full pipe."""
    out = os.open(fifos["out"], os.O_RDONLY | os.O_NONBLOCK)
    io = _io(agent, logged, stdout=str(fifos["out"]), terminal=True)
    agent.feed("c1", "", "stdout", b"first")
    io.start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if os.read(out, 100) == b"first":
                break
        except BlockingIOError:
            time.sleep(0.01)
    os.close(out)
    agent.feed("c1", "", "stdout", b"lost", b"lost too", b"")
    io.wait_output(5)
    assert len(agent.reads) == 4  # every chunk was still read from the agent
    assert logged == []  # EPIPE is ordinary, not worth a log line


def test_an_output_that_cannot_be_opened_is_logged_and_drained(
    agent: FakeAgent, logged: list[str], tmp_path: Path
) -> None:
    io = _io(agent, logged, stdout=f"file://{tmp_path}/no/such/dir/out", terminal=True, exec_id="e1")
    agent.feed("c1", "e1", "stdout", b"data", b"")
    io.start()
    io.wait_output(5)
    assert len(agent.reads) == 2
    assert len(logged) == 1
    assert logged[0].startswith(f"c1/e1: cannot open file://{tmp_path}/no/such/dir/out: ")
    assert logged[0].endswith("; output is dropped")


def test_a_failing_agent_ends_the_pump(agent: FakeAgent, logged: list[str]) -> None:
    io = _io(agent, logged, terminal=True)
    agent.feed("c1", "", "stdout", b"partial", ContainerNotFound("container c1 not found"))
    io.start()
    io.wait_output(5)
    assert len(agent.reads) == 2  # no reads after the error


def test_stdin_is_forwarded_and_closed_at_eof(
    agent: FakeAgent, logged: list[str], fifos: dict[str, Path]
) -> None:
    io = _io(agent, logged, stdin=str(fifos["in"]), terminal=True)
    agent.feed("c1", "", "stdout", b"")
    io.start()  # the pump opens the FIFO's read end: opening the write end waits for it
    writer = os.open(fifos["in"], os.O_WRONLY)
    os.write(writer, b"line 1\n")
    os.write(writer, b"line 2\n")
    os.close(writer)  # containerd closes its side: EOF
    deadline = time.monotonic() + 5
    while not agent.stdin_closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bytes(agent.stdin[("c1", "")]) == b"line 1\nline 2\n"
    assert agent.stdin_closed == [("c1", "")]
    io.close_stdin()  # CloseIO after EOF: the agent is told only once
    assert agent.stdin_closed == [("c1", "")]
    assert logged == []


def test_close_io_ends_stdin_in_the_container(
    agent: FakeAgent, logged: list[str], fifos: dict[str, Path]
) -> None:
    io = _io(agent, logged, stdin=str(fifos["in"]), terminal=True, exec_id="e1")
    agent.feed("c1", "e1", "stdout", b"")
    io.start()
    writer = os.open(fifos["in"], os.O_WRONLY)
    try:
        os.write(writer, b"typed")
        deadline = time.monotonic() + 5
        while ("c1", "e1") not in agent.stdin and time.monotonic() < deadline:
            time.sleep(0.01)
        io.close_stdin()  # containerd's CloseIO, its FIFO still open
        assert agent.stdin_closed == [("c1", "e1")]
    finally:
        os.close(writer)
    time.sleep(0.1)
    assert agent.stdin_closed == [("c1", "e1")]  # the pump's own close did not repeat it
    assert bytes(agent.stdin[("c1", "e1")]) == b"typed"


def test_a_stdin_that_cannot_be_opened_is_logged(agent: FakeAgent, logged: list[str], tmp_path: Path) -> None:
    io = _io(agent, logged, stdin=str(tmp_path / "gone"), terminal=True)
    agent.feed("c1", "", "stdout", b"")
    io.start()
    deadline = time.monotonic() + 5
    while not logged and time.monotonic() < deadline:
        time.sleep(0.01)
    assert logged == [f"c1: cannot open stdin {tmp_path / 'gone'}: No such file or directory"]


def test_close_stdin_survives_a_dead_agent(agent: FakeAgent, logged: list[str]) -> None:
    agent.close_stdin_error = AgentError("close_stdin: lost the connection to the guest agent", 14)
    io = _io(agent, logged)
    io.close_stdin()
    io.close_stdin()
    assert agent.stdin_closed == [("c1", "")]


def test_wait_output_is_bounded(agent: FakeAgent, logged: list[str]) -> None:
    io = _io(agent, logged, terminal=True)
    io.start()  # the agent never ends the stream
    started = time.monotonic()
    io.wait_output(0.2)
    assert 0.15 < time.monotonic() - started < 2
    agent.feed("c1", "", "stdout", b"")  # the stream ends: the pump is done
    io.wait_output(5)
    assert agent.reads == [("c1", "", "stdout")]
    assert not any(thread.is_alive() for thread in io._outputs)
