"""``hako ps``, ``exec``, ``kill``, ``stop``, ``pause``, ``unpause``, ``wait``, ``rm``, ``logs`` and
``inspect``: containers that already exist."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hako.cli.attach import Attachment, raw_terminal
from hako.cli.common import print_table, require_root
from hako.cli.options import parse_signal
from hako.errors import ContainerError, HakoError, UsageError
from hako.oci.spec import merge_env, stop_signal
from hako.oci.users import resolve_user
from hako.runtime.client import connect, destroy, set_paused
from hako.runtime.output import STDERR, read_log
from hako.runtime.state import SandboxState, Status, age, all_states, find, kill_vm, remove_dead


def add_parsers(commands: Any) -> None:
    p = commands.add_parser("ps", help="list containers")
    p.add_argument("-a", "--all", action="store_true", help="show all containers (default: running)")
    p.add_argument("-q", "--quiet", action="store_true", help="only ids")
    p.set_defaults(func=ps)

    p = commands.add_parser("exec", help="run a command in a running container")
    p.add_argument("-i", "--interactive", action="store_true", help="keep stdin open")
    p.add_argument("-t", "--tty", action="store_true", help="allocate a terminal")
    p.add_argument(
        "-e", "--env", action="append", default=[], metavar="K=V", help="set an environment variable"
    )
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory")
    p.add_argument("-u", "--user", metavar="UID[:GID]", help="user (name or id)")
    p.add_argument("container")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=exec_)

    p = commands.add_parser("kill", help="send a signal to a container's main process")
    p.add_argument("container")
    p.add_argument("signal", nargs="?", default="KILL")
    p.set_defaults(func=kill)

    p = commands.add_parser("stop", help="stop containers: a signal, then SIGKILL after a grace period")
    p.add_argument("-s", "--signal", help="the first signal (default: the image's STOPSIGNAL, else TERM)")
    p.add_argument(
        "-t", "--time", type=int, default=10, metavar="SECONDS", help="seconds until SIGKILL (default 10)"
    )
    p.add_argument("containers", nargs="+")
    p.set_defaults(func=stop)

    for name, func, text in (
        ("pause", pause, "pause containers: their VMs' vCPUs stop"),
        ("unpause", unpause, "resume paused containers"),
        ("wait", wait, "wait for containers to exit, and print their exit codes"),
        ("inspect", inspect, "a container's state, VM and spec, as JSON"),
    ):
        p = commands.add_parser(name, help=text)
        p.add_argument("containers", nargs="+")
        p.set_defaults(func=func)

    p = commands.add_parser("rm", help="remove containers")
    p.add_argument("-f", "--force", action="store_true", help="stop running containers first")
    p.add_argument("containers", nargs="+")
    p.set_defaults(func=rm)

    p = commands.add_parser("logs", help="print a container's output")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing while it runs")
    p.add_argument("container")
    p.set_defaults(func=logs)


def _status_text(state: SandboxState, status: Status) -> str:
    if status == Status.RUNNING:
        return f"Up {age(time.time() - state.created)}"
    if status == Status.PAUSED:
        return f"Up {age(time.time() - state.created)} (Paused)"
    if status == Status.CREATING:
        return "Created"
    if status == Status.EXITED:
        ago = age(time.time() - (state.finished or state.created))
        return f"Exited ({state.exit_status}) {ago} ago"
    return "Dead"


def _ports_text(state: SandboxState, status: Status) -> str:
    """Its published ports, as Docker shows them (only while it runs: they go with it)."""
    if status not in (Status.RUNNING, Status.PAUSED, Status.CREATING):
        return ""
    return ", ".join(f"0.0.0.0:{port.replace(':', '->', 1)}" for port in state.ports)


def ps(args: argparse.Namespace) -> int:
    require_root("ps")
    rows = []
    for state in all_states():
        status = state.effective_status()
        if state.status == Status.POOLED:
            continue  # not a container yet: `hako pool ls`
        if not args.all and status not in (Status.RUNNING, Status.PAUSED, Status.CREATING):
            continue
        if args.quiet:
            print(state.short_id)
            continue
        command = " ".join(state.command)
        command = command if len(command) <= 20 else command[:19] + "…"
        rows.append(
            (
                state.short_id,
                state.image,
                f'"{command}"',
                f"{age(time.time() - state.created)} ago",
                _status_text(state, status),
                f"{state.kernel}/{state.accel}",
                _ports_text(state, status),
                state.name,
            )
        )
    if not args.quiet:
        header = ("CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "VM", "PORTS", "NAMES")
        print_table(header, rows, gap="   ")
    return 0


def _running(ref: str) -> SandboxState:
    state = find(ref)
    status = _not_paused(state)
    if status != Status.RUNNING:
        raise ContainerError(f"container {state.name} is not running ({_status_text(state, status).lower()})")
    return state


def _not_paused(state: SandboxState) -> Status:
    """``state``'s status, or ContainerError if it is paused (its guest could not answer)."""
    status = state.effective_status()
    if status == Status.PAUSED:
        raise ContainerError(f"container {state.name} is paused: hako unpause {state.name} first")
    return status


def exec_(args: argparse.Namespace) -> int:
    require_root("exec")
    if not args.command:
        raise UsageError("hako exec needs a command: hako exec CONTAINER COMMAND [ARG...]")
    state = _running(args.container)
    spec = state.spec()
    base = spec["process"]
    process: dict[str, Any] = {
        "terminal": bool(args.tty),
        "args": list(args.command),
        "env": merge_env(base.get("env", []), args.env),
        "cwd": args.workdir or base.get("cwd", "/"),
        "user": base.get("user", {"uid": 0, "gid": 0}),
        "capabilities": base.get("capabilities", {}),
        "rlimits": base.get("rlimits", []),
        "noNewPrivileges": base.get("noNewPrivileges", False),
    }
    if args.user:
        user = resolve_user(Path(spec["root"]["path"]), args.user)
        process["user"] = {"uid": user.uid, "gid": user.gid, "additionalGids": list(user.additional_gids)}
    exec_id = secrets.token_hex(8)
    agent = connect(state)
    attachment = Attachment(agent, state.id, exec_id, stdin=args.interactive, terminal=args.tty)
    try:
        agent.exec_process(state.id, exec_id, process, stdin=args.interactive)
        attachment.start_output()
        attachment.resize()
        with raw_terminal(args.tty and args.interactive), attachment.proxy_signals():
            attachment.start_input()
            status = agent.wait_process(state.id, exec_id)
            attachment.finish_output()
        return status
    finally:
        agent.close()


def kill(args: argparse.Namespace) -> int:
    require_root("kill")
    signum = parse_signal(args.signal)
    state = _running(args.container)
    agent = connect(state)
    try:
        agent.signal_process(state.id, "", signum)
    finally:
        agent.close()
    print(args.container)
    return 0


KILL_GRACE = 10.0  # seconds a container has to report its exit after SIGKILL


def stop(args: argparse.Namespace) -> int:
    require_root("stop")
    if args.time < 0:
        raise UsageError(f"invalid --time {args.time}: it must be 0 or more seconds")
    signum = parse_signal(args.signal) if args.signal else None
    failed = 0
    for ref in args.containers:
        try:
            stop_container(find(ref), signum, args.time)
            print(ref)
        except HakoError as exc:
            print(f"hako: {exc}", file=sys.stderr)
            failed = exc.exit_code
    return failed


def stop_container(state: SandboxState, signum: int | None, grace: float) -> None:
    """Signal the container's main process (``signum``, else its image's stop signal, else
    SIGTERM), give it ``grace`` seconds to exit, then SIGKILL it, as ``docker stop`` does. One
    that is not running is stopped already."""
    if _not_paused(state) != Status.RUNNING:
        return
    if signum is None:
        spec = state.spec()
        signum = parse_signal(stop_signal(spec) or "TERM")
    for sent, wait in ((signum, grace), (signal.SIGKILL, KILL_GRACE)):
        try:
            agent = connect(state)
            try:
                agent.signal_process(state.id, "", sent)
            finally:
                agent.close()
        except HakoError:
            if _stopped(state):  # it ended meanwhile
                return
            raise
        if _wait_stopped(state, wait):
            return
    raise ContainerError(
        f"container {state.name} did not stop, even after SIGKILL: hako rm -f {state.name} ends its VM"
    )


def _wait_stopped(state: SandboxState, timeout: float | None = None) -> bool:
    """Wait up to ``timeout`` seconds (None: for as long as it takes) for ``state``'s container
    to exit; whether it did."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not _stopped(state):
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _stopped(state: SandboxState) -> bool:
    """Whether ``state``'s container has exited (its daemon records it, or is gone)."""
    if not state.daemon_alive():
        return True
    try:
        status = SandboxState.load(state.dir).status
    except (OSError, ValueError):
        return True  # removed as it ended (--rm)
    return status in (Status.EXITED, Status.DEAD)


def pause(args: argparse.Namespace) -> int:
    return _set_paused(args.containers, paused=True)


def unpause(args: argparse.Namespace) -> int:
    return _set_paused(args.containers, paused=False)


def _set_paused(refs: list[str], *, paused: bool) -> int:
    """Pause or resume each container's VM, as ``docker pause`` freezes a container (here the
    whole VM stops: its vCPUs, so its guest and its clock stand still until resumed)."""
    require_root("pause" if paused else "unpause")
    failed = 0
    for ref in refs:
        try:
            state = find(ref)
            status = state.effective_status()
            if status != (Status.RUNNING if paused else Status.PAUSED):
                raise ContainerError(f"container {state.name} is not {'running' if paused else 'paused'}")
            agent = connect(state)
            try:
                set_paused(agent, paused)
            finally:
                agent.close()
            print(ref)
        except HakoError as exc:
            print(f"hako: {exc}", file=sys.stderr)
            failed = exc.exit_code
    return failed


def wait(args: argparse.Namespace) -> int:
    require_root("wait")
    states = [find(ref) for ref in args.containers]
    for state in states:
        print(_exit_status(state))
    return 0


def _exit_status(state: SandboxState) -> int:
    """Block until ``state``'s container exits; its exit status. Asked of its daemon while it
    runs (which answers even for a container that goes with its exit, --rm), else recorded."""
    if state.effective_status() == Status.RUNNING:
        with contextlib.suppress(HakoError):
            agent = connect(state)
            try:
                return agent.wait_process(state.id)
            finally:
                agent.close()
        _wait_stopped(state)  # its daemon went away without answering
    try:
        status = SandboxState.load(state.dir).exit_status
    except (OSError, ValueError):
        raise ContainerError(f"container {state.name} is gone: it was removed as it exited (--rm)") from None
    return status if status is not None else 137  # its daemon vanished: killed


def inspect(args: argparse.Namespace) -> int:
    """One JSON array, as `docker inspect` prints: per container its recorded state (status
    corrected to dead if its daemon vanished), its VM and the OCI spec it runs."""
    require_root("inspect")
    found = []
    for ref in args.containers:
        state = find(ref)
        record: dict[str, Any] = asdict(state)
        record["status"] = state.effective_status().value
        record["dir"] = str(state.dir)
        try:
            record["spec"] = state.spec()
        except (OSError, ValueError):
            record["spec"] = None  # not created yet, or a pooled VM
        found.append(record)
    print(json.dumps(found, indent=2, sort_keys=True))
    return 0


def rm(args: argparse.Namespace) -> int:
    require_root("rm")
    failed = 0
    for ref in args.containers:
        try:
            remove_sandbox(find(ref), force=args.force)
            print(ref)
        except HakoError as exc:
            print(f"hako: {exc}", file=sys.stderr)
            failed = exc.exit_code
    return failed


def remove_sandbox(state: SandboxState, *, force: bool) -> None:
    if state.daemon_alive():
        if state.effective_status() in (Status.RUNNING, Status.PAUSED, Status.CREATING) and not force:
            raise ContainerError(
                f"cannot remove running container {state.name}: stop it (hako stop) or use hako rm -f"
            )
        with contextlib.suppress(HakoError):
            destroy(state)
        _wait_gone(state, timeout=20)
    remove_dead(state)
    if state.network == "bridge":
        from hako.network.host import prune

        prune()  # what it held on the bridge, if it died without giving it back


def _wait_gone(state: SandboxState, timeout: float) -> None:
    if _gone_within(state, timeout):
        return
    if state.shared_daemon:
        # A pool's keeper serves other sandboxes too: only this one's VM is killed, and the
        # keeper then finishes with it (as when a VM dies).
        kill_vm(state)
        _gone_within(state, timeout)
    elif state.daemon_pid:
        # Its QEMU goes with it (the kernel kills a VM whose runtime process dies).
        with contextlib.suppress(ProcessLookupError):
            os.kill(state.daemon_pid, signal.SIGKILL)
        _gone_within(state, float("inf"))


def _gone_within(state: SandboxState, timeout: float) -> bool:
    """Whether the sandbox's daemon is done with it, waiting up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while state.daemon_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not state.daemon_alive()


def logs(args: argparse.Namespace) -> int:
    require_root("logs")
    state = find(args.container)
    path = state.dir / "containers" / state.id / "output.log"
    done = 0
    while True:
        records = list(read_log(path))
        for stream, data in records[done:]:
            target = sys.stderr.buffer if stream == STDERR else sys.stdout.buffer
            target.write(data)
            target.flush()
        done = len(records)
        if not args.follow or not state.daemon_alive():
            return 0
        time.sleep(0.2)
