"""The agent's log: one ``os.write`` per line to an fd (not :mod:`logging`: boot time).

In the guest the fd is the virtio-serial port named ``hako.log`` (the host keeps
it per sandbox), else /dev/kmsg. Until :func:`open_log` runs, lines are dropped.
Lines look like ``0.812345 I container c1 started`` (guest CLOCK_BOOTTIME).
"""

from __future__ import annotations

import os
import time

_fd = -1
_kmsg = False
_debug = False


def configure(fd: int, *, kmsg: bool = False, debug: bool = False) -> None:
    global _fd, _kmsg, _debug
    _fd, _kmsg, _debug = fd, kmsg, debug


def debug_enabled() -> bool:
    return _debug


def _emit(level: str, message: str) -> None:
    if _fd < 0:
        return
    if _kmsg:  # /dev/kmsg adds its own timestamp; <6> info, <3> error, <7> debug
        prio = {"E": 3, "W": 4, "I": 6}.get(level, 7)
        lines = [f"<{prio}>hako-agent: {line}\n" for line in message.splitlines() or [""]]
    else:
        stamp = f"{time.clock_gettime(time.CLOCK_BOOTTIME):.6f} {level} "
        lines = [stamp + message.replace("\n", "\n    ") + "\n"]
    for line in lines:
        try:
            os.write(_fd, line.encode(errors="replace"))
        except OSError:
            pass  # a log line is never worth failing for (e.g. EAGAIN: host not reading)


def debug(message: str) -> None:
    if _debug:
        _emit("D", message)


def info(message: str) -> None:
    _emit("I", message)


def warning(message: str) -> None:
    _emit("W", message)


def error(message: str) -> None:
    _emit("E", message)


def exception(message: str) -> None:
    import traceback

    _emit("E", f"{message}\n{traceback.format_exc().rstrip()}")
