"""``hako stats``: what running containers use, as ``docker stats`` shows it, and what their VMs
cost the host.

The container's figures come from its cgroup inside the guest (the agent's StatsContainer):
CPU time, memory in use against its limit (the VM's RAM if it has none), processes. The VM's
cost on the host is the proportional set size (PSS) of its QEMU and its sandbox daemon: pages
shared with other sandboxes (a template's RAM, QEMU's code) are counted in shares.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hako.cli.common import print_table, require_root
from hako.errors import HakoError
from hako.runtime.client import connect
from hako.runtime.state import SandboxState, Status, all_states, find, served_by

INTERVAL = 1.0  # seconds between two readings (CPU % is their difference)
CLEAR = "\x1b[2J\x1b[H"


def add_parsers(commands: Any) -> None:
    p = commands.add_parser("stats", help="what running containers use, and what their VMs cost the host")
    p.add_argument("--no-stream", action="store_true", help="print one table and exit")
    p.add_argument("containers", nargs="*", help="(default: every running container)")
    p.set_defaults(func=stats)


@dataclass(frozen=True)
class Reading:
    at: float  # time.monotonic()
    cpu_usec: int
    memory: int
    memory_limit: int  # bytes; the VM's RAM if the container has no limit of its own
    pids: int
    vm_pss: int | None  # bytes: QEMU's and the daemon's PSS; None if unreadable


def read(state: SandboxState) -> Reading:
    agent = connect(state)
    try:
        response = agent.stats(state.id)
    finally:
        agent.close()
    return Reading(
        at=time.monotonic(),
        cpu_usec=response.cpu.usage_usec,
        memory=response.memory.usage_bytes,
        memory_limit=response.memory.limit_bytes or state.memory_mib << 20,
        pids=response.pids.current,
        vm_pss=vm_pss(state),
    )


def vm_pss(state: SandboxState) -> int | None:
    """Bytes of host memory the sandbox holds: its QEMU's PSS and its daemon's (the sandbox's
    share of it, where a pool's keeper serves several)."""
    qemu, daemon = _pss(state.qemu_pid), _pss(state.daemon_pid)
    if qemu is None or daemon is None:
        return None
    if state.shared_daemon and state.daemon_pid:
        daemon //= served_by(state.daemon_pid)
    return qemu + daemon


def _pss(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) << 10 for line in rollup.splitlines() if line.startswith("Pss:")), 0)


def cpu_percent(before: Reading, after: Reading) -> float:
    """CPU time used between two readings, in % of one CPU (as Docker: 200% is two CPUs busy)."""
    elapsed = after.at - before.at
    return max(0, after.cpu_usec - before.cpu_usec) / 1e6 / elapsed * 100 if elapsed > 0 else 0.0


def human(size: int) -> str:
    """Docker's binary units: 1.5MiB, 256MiB, 2GiB."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" or value >= 100 else f"{value:.3g}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def row(state: SandboxState, before: Reading, after: Reading) -> tuple[str, ...]:
    return (
        state.short_id,
        state.name,
        f"{cpu_percent(before, after):.2f}%",
        f"{human(after.memory)} / {human(after.memory_limit)}",
        f"{after.memory / after.memory_limit * 100:.2f}%",
        str(after.pids),
        human(after.vm_pss) if after.vm_pss is not None else "-",
    )


HEADER = ("CONTAINER ID", "NAME", "CPU %", "MEM USAGE / LIMIT", "MEM %", "PIDS", "VM ON HOST (PSS)")


def _shown(refs: list[str]) -> list[SandboxState]:
    if refs:
        return [find(ref) for ref in refs]
    return [s for s in all_states() if s.status != Status.POOLED and s.effective_status() == Status.RUNNING]


def _readings(states: list[SandboxState]) -> dict[str, Reading]:
    readings = {}
    for state in states:
        try:
            readings[state.id] = read(state)
        except HakoError as exc:
            if state.effective_status() == Status.RUNNING:  # not one that ended meanwhile
                print(f"hako: {state.name}: {exc}", file=sys.stderr)
    return readings


def stats(args: argparse.Namespace) -> int:
    require_root("stats")
    states = _shown(args.containers)
    for state in states:
        if args.containers and state.effective_status() != Status.RUNNING:
            raise HakoError(f"container {state.name} is not running")
    before = _readings(states)
    while True:
        time.sleep(INTERVAL)
        if not args.containers:
            states = _shown([])  # containers come and go while it streams
        after = _readings(states)
        rows = [row(s, before[s.id], after[s.id]) for s in states if s.id in before and s.id in after]
        if not args.no_stream and sys.stdout.isatty():
            sys.stdout.write(CLEAR)
        print_table(HEADER, rows, gap="   ")
        sys.stdout.flush()
        if args.no_stream:
            return 0
        before = after
