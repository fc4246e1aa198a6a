"""Forking a sandbox's daemon, which starts the VM before anything else.

The guest needs seconds to boot under emulation; everything else (the daemon's
own imports, the CLI resolving the image and writing the spec) happens while it
does. The daemon reports over a pipe, one JSON object per line:

    {"launched": true}              QEMU is running (or {"error": ..., "exit_code": ...})
    {"serving": true}               its API socket accepts connections
    {"final": {...state...}}        it is about to exit; the VM is gone
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import time
import traceback
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from hako.errors import HakoError
from hako.runtime.config import SandboxConfig
from hako.runtime.state import SandboxState

if TYPE_CHECKING:
    from hako.runtime.sandboxd import SandboxDaemon

POOLED_TIMEOUT = 180.0  # seconds for a pooled sandbox to be restored, set up, warmed up and paused


class Notifications:
    """The daemon's notification pipe, read by the process that forked it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = b""

    def next(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next message; None once the daemon has gone (or after ``timeout`` seconds of silence)."""
        while b"\n" not in self._buffer:
            if timeout is not None and not select.select([self.fd], [], [], timeout)[0]:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message

    def expect(self, key: str) -> dict[str, Any]:
        """The next message, which must carry ``key``; the daemon's error as a HakoError otherwise."""
        message = self.next()
        if message is None or key not in message:
            error = HakoError(
                message["error"] if message and "error" in message else "the sandbox daemon died"
            )
            error.exit_code = int(message.get("exit_code", 125)) if message else 125
            raise error
        return message

    def close(self) -> None:
        os.close(self.fd)


def notify(fd: int, message: Mapping[str, Any]) -> bool:
    """Send ``message``; whether it was sent (False once the reader is gone)."""
    try:
        os.write(fd, json.dumps(message).encode() + b"\n")
    except OSError:
        return False
    return True


def wait_pooled(messages: Notifications, timeout: float = POOLED_TIMEOUT) -> str | None:
    """None once the pooled sandbox whose daemon sends ``messages`` waits in the pool; else why
    it will not."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            message = messages.next(timeout=max(0.0, deadline - time.monotonic()))
        except ValueError:
            return "its daemon sent a malformed message"
        if message is None:
            return "it did not become ready" if time.monotonic() >= deadline else "its daemon ended"
        if "pooled" in message:
            return None
        if "error" in message:
            return str(message["error"])
        if "final" in message:
            return str((message["final"] or {}).get("error") or "its daemon ended")


def preload_daemon(*, shim: bool = False) -> None:
    """Before forking several daemons (a pool fill): import what a daemon runs on, and with
    ``shim`` what it runs on once it becomes a containerd pod's shim (:mod:`hako.shim.pooled`).

    Each forked daemon then shares those pages with its siblings, copy-on-write, instead of
    importing its own copy of protobuf, asyncio and the runtime after the fork. Measured with
    8 pooled sandboxes: 12 -> 9.7 MiB PSS per daemon. (``gc.freeze()`` on top, which keeps a
    child's collections from writing to those objects, measured no difference.)
    """
    from hako.hypervisor import qemu, qmp  # noqa: F401
    from hako.image import disk  # noqa: F401  (a claimed sandbox attaches its rootfs)
    from hako.network import sandbox  # noqa: F401
    from hako.runtime import mounts, sandboxd  # noqa: F401

    if shim:
        from hako.network import wire  # noqa: F401  (pyroute2: moving the tap into a pod's netns)
        from hako.shim import pooled, serve  # noqa: F401


def fork_sandbox(
    state: SandboxState, config: SandboxConfig, *, pooled: bool = False, network: str = "bridge"
) -> tuple[int, Notifications]:
    """Fork the sandbox's daemon, with a ``network`` of that mode (:mod:`hako.network.sandbox`);
    returns its pid and its notifications. The caller has no threads."""
    # What the daemon needs before it can launch QEMU is imported here, before the fork (and not
    # by a `hako run` that takes a pooled VM): in the forked child every page an import writes
    # is first copied, which made these imports take twice as long there. Measured: the daemon's
    # start-up to the QEMU launch fell from 26-32 ms to 7.5 ms (medians of 12-16 runs).
    from hako.hypervisor.qemu import QemuVM  # noqa: F401
    from hako.network.sandbox import SandboxNetwork  # noqa: F401

    def serve(notify_fd: int, forked: float) -> int:
        daemon = start_daemon(state, config, notify_fd, pooled=pooled, network=network, since=forked)
        return daemon.run(notify_fd)

    return fork_detached(serve, config.run_dir / "daemon.log")


def fork_detached(
    child: Callable[[int, float], int], log_path: str | os.PathLike[str] | None = None
) -> tuple[int, Notifications]:
    """Fork a daemon that runs ``child(notify_fd, forked)`` (its exit code) in a session and a
    private mount namespace of its own, its output to ``log_path`` (else nowhere); its pid and
    its notifications. An exception it raises is its last notification."""
    from hako.runtime import mounts  # ctypes

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        return pid, Notifications(read_fd)
    code = 125
    forked = time.monotonic()
    try:
        os.close(read_fd)
        _detach(log_path)
        mounts.private_namespace()
        code = child(write_fd, forked)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            traceback.print_exc()
            message = str(exc) if isinstance(exc, HakoError) else f"internal error: {exc!r}"
            notify(write_fd, {"error": message, "exit_code": 125})
    finally:
        os._exit(code)


def start_daemon(
    state: SandboxState,
    config: SandboxConfig,
    notify_fd: int,
    *,
    pooled: bool = False,
    network: str = "bridge",
    since: float | None = None,
) -> SandboxDaemon:
    """In the process that is to serve the sandbox (its own daemon, or a pool's keeper): its
    network, then QEMU, then the daemon that owns them, ready to :meth:`~SandboxDaemon.run`.
    A failure is reported on ``notify_fd`` too, and leaves nothing behind."""
    from hako.hypervisor.qemu import QemuVM
    from hako.network.sandbox import SandboxNetwork

    since = time.monotonic() if since is None else since
    config.prepare_host()
    sandbox_network = SandboxNetwork.create(state.id, network)
    try:
        config = config.in_network(sandbox_network)
        vm = QemuVM(config.vm_config())
        vm.start()
    except HakoError as exc:
        sandbox_network.close()
        notify(notify_fd, {"error": str(exc), "exit_code": exc.exit_code})
        raise
    notify(notify_fd, {"launched": True})
    # Only now the heavy part (protobuf, ttRPC, the runtime), while the guest boots.
    from hako.runtime.sandboxd import SandboxDaemon

    daemon = SandboxDaemon(state, config, vm, pooled=pooled, network=sandbox_network)
    daemon.sandbox.timing["daemon_launch"] = (vm.launched_at or since) - since
    return daemon


def _detach(log_path: str | os.PathLike[str] | None) -> None:
    """Its own session, no terminal, output to ``log_path`` (else nowhere)."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    devnull = os.open(os.devnull, os.O_RDWR)
    log = devnull if log_path is None else os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(devnull)
    if log != devnull:
        os.close(log)
