"""Small things every command needs."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Sequence

from hako.errors import UsageError
from hako.hypervisor import Accelerator, choose
from hako.runtime import paths


class Interrupted(KeyboardInterrupt):
    """A signal that ends the command as Ctrl-C does (SIGTERM, SIGHUP): its exit code is 128 + it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


INTERRUPTS = (signal.SIGTERM, signal.SIGHUP)  # what ends a command as Ctrl-C (SIGINT) does


def interrupt_on(signums: tuple[int, ...] = INTERRUPTS) -> None:
    """Make ``signums`` raise :class:`Interrupted`, so that the command cleans up as for Ctrl-C."""

    def interrupted(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    for signum in signums:
        signal.signal(signum, interrupted)


def ignore_interrupts() -> None:
    """Ctrl-C and :data:`INTERRUPTS` no longer stop this process (while it cleans up)."""
    for signum in (signal.SIGINT, *INTERRUPTS):
        signal.signal(signum, signal.SIG_IGN)


def require_root(command: str) -> None:
    if os.geteuid() != 0:
        raise UsageError(f"hako {command} must run as root: it manages VMs, mounts and /run/hako")


def accelerator(requested: str) -> Accelerator:
    """Choose the accelerator; say once per host boot when auto falls back to TCG."""
    accel = choose(requested)
    if requested == "auto" and accel.name == "tcg":
        marker = paths.run_root() / "tcg-notice"
        if not marker.exists():
            print(f"hako: using {accel.reason}", file=sys.stderr)
            paths.run_root().mkdir(parents=True, exist_ok=True, mode=0o700)
            marker.touch()
    return accel


def process_age() -> float:
    """Seconds since this process started, interpreter start-up included."""
    with open("/proc/self/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return time.clock_gettime(time.CLOCK_BOOTTIME) - started


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]], gap: str = "  ") -> None:
    """Columns padded to their widest cell, as `docker ps` prints them."""
    lines = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print(gap.join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
