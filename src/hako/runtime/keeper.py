"""A pool's keeper: one daemon process that serves every sandbox of a warm pool.

A sandbox of ``hako run`` has a daemon process of its own (:mod:`hako.runtime.launch`). The
sandboxes of a warm pool (:mod:`hako.runtime.pool`) share one instead, forked by the fill: a
Python process's memory is mostly its interpreter's and its imports', and an idle daemon
holds ~8 MiB of its own even when forked from a parent that imported everything (each object
it touches is copied, for its reference count). One keeper serves each of its sandboxes as
its own daemon would (a :class:`~hako.runtime.sandboxd.SandboxDaemon` on threads of its own,
in one private mount namespace), goes on serving those taken from the pool, adds the
sandboxes later fills of its pool ask for (a refill after `hako run` took one: on the
keeper's socket, ``<run root>/keepers/<shape>/<pid>.sock``, its log beside it), and exits
once the last of its sandboxes has finished. Each sandbox's state names the keeper as its daemon, with
``shared_daemon`` set: such a sandbox is served while the keeper holds its ``daemon.lock``,
and is stopped through its API (never by signalling the keeper, which would stop them all).

What sharing costs: the sandboxes of one keeper share a process's fate (a crash of the keeper
ends them all, their VMs with it) and its interpreter lock (a container whose output floods
its daemon slows its siblings' daemons down; their VMs run on). A sandbox for a containerd pod
(a pool of network ``none``) is not kept this way: its daemon becomes the pod's shim
(:mod:`hako.shim.pooled`), one process per pod as containerd expects.

The keeper tells the filler, one JSON object per line (on a pipe from the fill that forked
it, on its socket to a later one):

    {"pooled": "<id>"}                              a sandbox is in the pool
    {"error": "...", "exit_code": N}                adding one failed; no more are added
    {"done": true}                                  no more are added

and adds no more once the filler is gone (an interrupted fill).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from hako.errors import HakoError
from hako.runtime import paths
from hako.runtime.config import SandboxConfig
from hako.runtime.launch import Notifications, fork_detached, notify, start_daemon, wait_pooled
from hako.runtime.sockets import connect_unix, listen_unix
from hako.runtime.state import SandboxState, remove_dead

if TYPE_CHECKING:
    from hako.runtime.sandboxd import SandboxDaemon

JOIN_POLL = 1.0
ASK_TIMEOUT = 5.0  # seconds for a later filler to say what it wants

# The next sandbox to add (made and reserved, in the keeper), or None once the pool is full.
NextSandbox = Callable[[], "tuple[SandboxState, SandboxConfig] | None"]


def _sockets(shape: str) -> Path:
    return paths.run_root() / "keepers" / shape.replace("/", "_")


def socket_path(shape: str, pid: int) -> Path:
    """Where the keeper ``pid`` of the pool of ``shape`` (a :attr:`~hako.runtime.pool.Shape.key`)
    takes later fills. (Its pid names it: a keeper that was stopping when a fill came may
    still be there when the keeper forked instead is, and each removes only its own.)"""
    return _sockets(shape) / f"{pid}.sock"


def fill_by_keeper(shape: str) -> Notifications | None:
    """Ask a running keeper of ``shape``'s pool to fill it; its messages, or None if no keeper
    runs (then the caller forks one). The caller holds the pool's lock."""
    with contextlib.suppress(OSError):
        for path in sorted(_sockets(shape).glob("*.sock")):
            try:
                sock = connect_unix(path)
            except ConnectionRefusedError:
                path.unlink(missing_ok=True)  # a keeper that died without removing it
                continue
            except OSError:
                continue
            with sock:
                sock.sendall(b'{"fill": true}\n')
                return Notifications(sock.detach())
    return None


def fork_keeper(next_sandbox: NextSandbox, shape: str, network: str) -> tuple[int, Notifications]:
    """Fork the keeper of ``shape``'s pool, which adds sandboxes on a ``network`` of that mode
    while ``next_sandbox`` gives one; its pid and its messages. The caller has no threads and
    holds the pool's lock."""

    def keep(notify_fd: int, forked: float) -> int:
        path = socket_path(shape, os.getpid())
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.unlink(missing_ok=True)  # (a keeper of a reused pid, long gone)
        # Its sandboxes log to their own logs; what none of them takes (a warning while one is
        # made, a thread's unexpected exception) goes to the keeper's, kept while it runs (and
        # after a crash).
        log = path.with_suffix(".log")
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        try:
            return Keeper(network).run(next_sandbox, notify_fd, listen_unix(path), path)
        finally:
            log.unlink(missing_ok=True)

    return fork_detached(keep)


class Keeper:
    def __init__(self, network: str) -> None:
        self.network = network
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._serving: dict[str, tuple[SandboxDaemon, threading.Thread]] = {}
        self._filling = False
        self._closed = False

    def run(self, next_sandbox: NextSandbox, filler: int, listener: socket.socket, path: Path) -> int:
        """Add sandboxes, take later fills on ``listener``, and serve every sandbox until the
        last has finished; the exit code."""
        signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            self._fill_for(next_sandbox, filler)
        finally:
            os.close(filler)
        later = threading.Thread(
            target=self._take_fills, args=(listener, next_sandbox), daemon=True, name="fills"
        )
        later.start()
        while True:
            with self._lock:
                if not self._serving and not self._filling:
                    # Closed before a later filler is let in: it finds no keeper, and forks one.
                    self._closed = True
                    path.unlink(missing_ok=True)
                    listener.close()
                    return 0
                threads = [thread for _, thread in self._serving.values()]
            for thread in threads or [later]:
                thread.join(JOIN_POLL)  # (the main thread: signals are handled between joins)

    def _take_fills(self, listener: socket.socket, next_sandbox: NextSandbox) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(ASK_TIMEOUT)
                try:
                    asked = json.loads(conn.makefile("rb").readline() or b"null")
                except (OSError, ValueError):
                    continue
                if not isinstance(asked, dict) or not asked.get("fill"):
                    continue
                with self._lock:
                    if self._closed or self.stopping.is_set():
                        continue  # the filler sees the connection end, and forks a keeper
                    self._filling = True
                conn.settimeout(None)
                try:
                    self._fill_for(next_sandbox, conn.fileno())
                finally:
                    with self._lock:
                        self._filling = False

    def _fill_for(self, next_sandbox: NextSandbox, filler: int) -> None:
        try:
            self._fill(next_sandbox, filler)
        finally:
            notify(filler, {"done": True})

    def _fill(self, next_sandbox: NextSandbox, filler: int) -> None:
        while not self.stopping.is_set():
            try:
                made = next_sandbox()
            except HakoError as exc:
                notify(filler, {"error": str(exc), "exit_code": exc.exit_code})
                return
            if made is None:
                return
            state, config = made
            try:
                self._add(state, config)
            except HakoError as exc:
                error = f"a pooled sandbox failed to start: {exc}"
                notify(filler, {"error": error, "exit_code": exc.exit_code})
                return
            if not notify(filler, {"pooled": state.id}):
                return  # the fill was interrupted: add no more

    def _add(self, state: SandboxState, config: SandboxConfig) -> None:
        """Start serving one sandbox and wait until it waits in the pool; HakoError if it will
        not, and then nothing of it is left."""
        state.shared_daemon = True
        state.save()
        read_fd, write_fd = os.pipe()
        messages = Notifications(read_fd)
        try:
            try:
                daemon = start_daemon(state, config, write_fd, pooled=True, network=self.network)
            except BaseException:
                os.close(write_fd)
                remove_dead(state)
                raise
            thread = threading.Thread(
                target=self._serve, args=(daemon, write_fd), daemon=True, name=f"sandbox-{state.short_id}"
            )
            with self._lock:
                self._serving[state.id] = (daemon, thread)
            thread.start()
            reason = wait_pooled(messages)
        finally:
            messages.close()
        if reason is None:
            return
        daemon.stop_soon()
        thread.join(30)
        remove_dead(state)
        raise HakoError(reason)

    def _serve(self, daemon: SandboxDaemon, notify_fd: int) -> None:
        try:
            daemon.run(notify_fd)
        except BaseException:
            # Whatever broke, the VM must not outlive its daemon's interest in it: its state
            # then says dead (nobody holds its lock), and `hako rm` removes it.
            with contextlib.suppress(Exception):
                daemon.log(f"the keeper's thread for this sandbox failed:\n{traceback.format_exc()}")
            with contextlib.suppress(Exception):
                daemon.sandbox.vm.kill()
        finally:
            with contextlib.suppress(OSError):
                os.close(daemon.notify_fd)  # the filler's pipe, or a claimant's FIFO
            with self._lock:
                self._serving.pop(daemon.state.id, None)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        """Stop adding, and stop every sandbox served here (each from a thread of its own)."""
        self.stopping.set()
        with self._lock:
            daemons = [daemon for daemon, _ in self._serving.values()]
        for daemon in daemons:
            daemon.stop_soon()
