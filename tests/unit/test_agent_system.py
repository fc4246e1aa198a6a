"""Pure helpers of the guest agent's PID 1 side, its errors, and its child-side path logic."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from hako_agent import log
from hako_agent.errors import FailedPrecondition, exec_message
from hako_agent.reaper import exit_status
from hako_agent.spawn import StatusPipe, secure_join
from hako_agent.system import kernel_done_from, parse_cmdline, parse_kmsg, parse_meminfo


def test_parse_cmdline() -> None:
    got = parse_cmdline("console=ttyS0 quiet panic=-1 hako.channel=vsock hako.debug=1 init=/init\n")
    assert got["hako.channel"] == "vsock" and got["hako.debug"] == "1" and got["quiet"] == ""
    assert got["panic"] == "-1"


def test_parse_kmsg() -> None:
    record = b"6,321,952031,-;Run /init as init process\n SUBSYSTEM=x\n"
    assert parse_kmsg(record) == (0.952031, "Run /init as init process")
    assert parse_kmsg(b"garbage") is None
    assert parse_kmsg(b"6,1;x") is None


def test_kernel_done_in_boottime() -> None:
    records = [
        (0.1, "Linux version 6.1"),
        (2.5, "Run /init as init process"),
        (9.0, "hako-agent: clock sync 1"),
    ]
    # the marker was stamped 9.0 by printk when CLOCK_BOOTTIME read 8.4: printk runs 0.6 s ahead
    assert kernel_done_from(records, "hako-agent: clock sync 1", 8.4) == pytest.approx(1.9)
    assert kernel_done_from(records, "hako-agent: clock sync 2", 8.4) == 2.5  # marker lost: raw stamp
    assert kernel_done_from(records[:1], "x", 1.0) == 0.0  # the line is gone


def test_parse_meminfo() -> None:
    text = "MemTotal:         249696 kB\nMemFree:          200000 kB\nHugePages_Total:       0\n"
    assert parse_meminfo(text) == {"MemTotal": 249696 * 1024, "MemFree": 200000 * 1024, "HugePages_Total": 0}


def test_exit_status() -> None:
    assert exit_status(3 << 8) == 3
    assert exit_status(9) == 137  # killed by SIGKILL
    assert exit_status(15 | 0x80) == 143  # SIGTERM, core dumped


@pytest.mark.parametrize(
    ("err", "path", "message"),
    [
        (errno.ENOENT, "foo", 'exec: "foo": executable file not found in $PATH'),
        (errno.ENOENT, "/foo", 'exec: "/foo": stat /foo: no such file or directory'),
        (errno.EACCES, "/etc/passwd", 'exec: "/etc/passwd": permission denied'),
        (errno.ENOEXEC, "./x", 'exec: "./x": exec format error'),
    ],
)
def test_exec_message(err: int, path: str, message: str) -> None:
    assert exec_message(err, path) == message


def test_secure_join_keeps_symlinks_inside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "escape").symlink_to("/etc")  # absolute: means the rootfs' /etc
    (root / "up").symlink_to("../../../..")
    (root / "rel").symlink_to("etc/escape/sub")
    (root / "loop").symlink_to("loop")
    r = str(root)
    assert secure_join(r, "/etc/escape/passwd") == f"{r}/etc/passwd"
    assert secure_join(r, "/up/tmp") == f"{r}/tmp"
    assert secure_join(r, "/../../x") == f"{r}/x"
    assert secure_join(r, "/rel") == f"{r}/etc/sub"
    assert secure_join(r, "/new/dir/./file") == f"{r}/new/dir/file"
    with pytest.raises(OSError) as info:
        secure_join(r, "/loop/x")
    assert info.value.errno == errno.ELOOP


def test_status_pipe_messages() -> None:
    r, w = os.pipe()
    os.write(w, b"P42\nR\nE2 mounting proc")
    os.close(w)
    status = StatusPipe(r)
    assert status.next() == b"P42"
    assert status.next() == b"R"
    assert status.next() == b"E2 mounting proc"
    assert status.next() == b""
    status.close()


def _pipe_with(data: bytes) -> StatusPipe:
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    return StatusPipe(r, "container setup")


def test_status_pipe_messages_interleave() -> None:
    """B's "R" (and an exec's "X") can overtake A's "P": the order must not matter."""
    pids: list[int] = []
    status = _pipe_with(b"R\nX13\nP42\n")
    status.wait_setup(pids.append)
    assert pids == [42] and status.pid == 42
    assert status.wait_exec() == errno.EACCES
    status.close()

    status = _pipe_with(b"P42\nR\n")
    status.wait_setup(pids.append)
    assert status.wait_exec() == 0  # end of file: the program runs
    status.close()

    status = _pipe_with(b"P7\nE2 mounting proc on /proc: No such file or directory\n")
    with pytest.raises(FailedPrecondition, match="^container setup: mounting proc on /proc: No such file"):
        status.wait_setup(pids.append)
    assert pids[-1] == 7  # tracked before the error, so the caller can kill it
    status.close()

    for data, message in ((b"", "exited without a word"), (b"P9\n", "exited during setup")):
        status = _pipe_with(data)
        with pytest.raises(FailedPrecondition, match=message):
            status.wait_setup(pids.append)
        status.close()


def test_log_lines(tmp_path: Path) -> None:
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        log.configure(fd, debug=False)
        log.info("hello\nworld")
        log.debug("hidden")
        log.configure(fd, kmsg=True, debug=True)
        log.debug("shown")
    finally:
        log.configure(-1)
        os.close(fd)
    lines = path.read_text().splitlines()
    assert lines[0].split(" ", 1)[1] == "I hello"
    assert lines[1] == "    world"
    assert lines[2] == "<7>hako-agent: shown"
