"""One container in the guest: its init process, its execs, its cgroup, its state.

State machine (as youki's)::

    created --start--> running --pause--> paused --resume--> running
       \\                  \\                  \\
        +-------------------+------------------+--> stopped (the init exited)

``stopped`` is not stored: it is whatever state the container was in once its
init has exited, so the reaper's callback never needs the container's lock.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time

from hako_agent import linux, spawn
from hako_agent.errors import AlreadyExists, FailedPrecondition, NotFound, Unsupported
from hako_agent.spec import check_id, parse_exec_process
from hako_agent.stdio import InputStream, OutputStream

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from hako_agent.cgroups import Cgroup
    from hako_agent.reaper import Reaper
    from hako_agent.spec import Process as ProcessSpec
    from hako_agent.spec import Spec

CREATED = "created"
RUNNING = "running"
PAUSED = "paused"
STOPPED = "stopped"

_ALLOWED = {
    "start": (CREATED,),
    "exec": (RUNNING,),
    "pause": (RUNNING,),
    "resume": (PAUSED,),
    "update": (CREATED, RUNNING, PAUSED),
}


class Process:
    """A process the agent started (a container's init or an exec) and its stdio."""

    def __init__(self, exec_id: str, args: list[str]) -> None:
        self.exec_id = exec_id
        self.path = args[0]
        self.pid = 0
        self.stdin: InputStream | None = None
        self.stdout: OutputStream | None = None
        self.stderr: OutputStream | None = None
        self.console_fd = -1  # a dup of the pty master, for TtyWinResize
        self.exit_status = -1
        self.exited_at_ns = 0
        self._exited = threading.Event()

    @property
    def exited(self) -> bool:
        return self._exited.is_set()

    def on_exit(self, status: int) -> None:
        """Called by the reaper (any thread) with the exit code or 128 + signal."""
        self.exit_status = status
        self.exited_at_ns = time.time_ns()
        self._exited.set()

    def wait(self, cancelled: Callable[[], bool] | None = None, timeout: float | None = None) -> bool:
        """Block until the process exited (True), or ``cancelled()`` / ``timeout`` (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            slice_ = 0.25
            if deadline is not None:
                slice_ = min(slice_, deadline - time.monotonic())
                if slice_ <= 0:
                    return self._exited.is_set()
            if self._exited.wait(slice_ if cancelled is not None or deadline is not None else None):
                return True
            if cancelled is not None and cancelled():
                return False

    def attach_stdio(self, terminal: bool, want_stdin: bool) -> tuple[spawn.ChildStdio | None, list[int]]:
        """Make the pipes; returns what the child gets and the child's ends to close after the fork."""
        if terminal:
            return None, []
        child_ends: list[int] = []
        try:
            if want_stdin:
                stdin_r, stdin_w = os.pipe()
                child_ends.append(stdin_r)
                self.stdin = InputStream(stdin_w)
            else:
                stdin_r = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
                child_ends.append(stdin_r)
            out_r, out_w = os.pipe()
            child_ends.append(out_w)
            self.stdout = OutputStream(out_r)
            err_r, err_w = os.pipe()
            child_ends.append(err_w)
            self.stderr = OutputStream(err_r)
        except BaseException:
            for fd in child_ends:
                os.close(fd)
            self.close_streams()
            raise
        return spawn.ChildStdio(stdin_r, out_w, err_w), child_ends

    def attach_pty(self, master: int) -> None:
        """Take over the pty master the child sent: it is stdout, stdin and the resize handle."""
        self.stdout = OutputStream(master)
        self.stdin = InputStream(os.dup(master))
        self.console_fd = os.dup(master)

    def close_streams(self) -> None:
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        if self.console_fd >= 0:
            os.close(self.console_fd)
            self.console_fd = -1

    def resize(self, rows: int, columns: int) -> None:
        if self.console_fd < 0:
            raise FailedPrecondition(f"process {self.exec_id or 'init'} has no terminal")
        winsize = rows.to_bytes(2, "little") + columns.to_bytes(2, "little") + bytes(4)
        fcntl.ioctl(self.console_fd, linux.TIOCSWINSZ, winsize)


class Container:
    def __init__(self, container_id: str, spec: Spec, reaper: Reaper, cgroup: Cgroup | None) -> None:
        self.id = container_id
        self.spec = spec
        self.reaper = reaper
        self.cgroup = cgroup
        self.init = Process("", spec.process.args)
        self.execs: dict[str, Process] = {}
        self.storages: list[str] = []  # guest mount points the agent mounted for this container
        self.lock = threading.RLock()
        self._state = CREATED
        self._spawned: spawn.Spawned | None = None

    # -- state ----------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        return STOPPED if self.init.exited else self._state

    def _require(self, action: str) -> None:
        state = self.state
        if state not in _ALLOWED[action]:
            raise FailedPrecondition(f"container {self.id} is {state}: cannot {action} it")

    # -- lifecycle -------------------------------------------------------------------------------
    def create(self, want_stdin: bool) -> None:
        """Fork the init and set the container up around it; it then waits for :meth:`start`."""
        plan = spawn.InitPlan(self.spec)
        process = self.spec.process
        stdio, child_ends = self.init.attach_stdio(process.terminal, want_stdin)
        cgroup_fd = self.cgroup.open_procs() if self.cgroup is not None else -1
        try:
            spawned = spawn.spawn(
                self.reaper,
                spawn.ProcessPlan(process),
                stdio,
                self.init.on_exit,
                init=plan,
                cgroup_fd=cgroup_fd,
            )
        except BaseException:
            self.init.close_streams()
            raise
        finally:
            for fd in child_ends:
                os.close(fd)
            if cgroup_fd >= 0:
                os.close(cgroup_fd)
        self.init.pid = spawned.pid
        if spawned.pty_master >= 0:
            self.init.attach_pty(spawned.pty_master)
            spawned.pty_master = -1
        self._spawned = spawned

    def start(self) -> int:
        with self.lock:
            self._require("start")
            spawned, self._spawned = self._spawned, None
            if spawned is None:
                raise FailedPrecondition(f"container {self.id} was started already")
            try:
                spawned.start(self.init.path)
            except BaseException:
                self._state = STOPPED  # its init exits (127) when the program cannot be executed
                raise
            finally:
                spawned.close()
            self._state = RUNNING
            return self.init.pid

    def exec(self, exec_id: str, process_json: bytes, want_stdin: bool) -> int:
        check_id(exec_id, "exec_id")
        spec = parse_exec_process(process_json)
        with self.lock:
            self._require("exec")
            if exec_id in self.execs:
                raise AlreadyExists(f"container {self.id} already has an exec {exec_id!r}")
            process = Process(exec_id, spec.args)
            self.execs[exec_id] = process
        try:
            self._spawn_exec(process, spec, want_stdin)
        except BaseException:
            with self.lock:
                self.execs.pop(exec_id, None)
            process.close_streams()
            raise
        return process.pid

    def _spawn_exec(self, process: Process, spec: ProcessSpec, want_stdin: bool) -> None:
        ns_types = [ns.type for ns in self.spec.namespaces]
        try:
            ns_fds = spawn.namespace_fds(self.init.pid, ns_types)
        except OSError as exc:
            raise FailedPrecondition(f"container {self.id}: its init is gone ({exc.strerror})") from None
        cgroup_fd = -1
        child_ends: list[int] = []
        try:
            cgroup_fd = self.cgroup.open_procs() if self.cgroup is not None else -1
            stdio, child_ends = process.attach_stdio(spec.terminal, want_stdin)
            spawned = spawn.spawn(
                self.reaper,
                spawn.ProcessPlan(spec),
                stdio,
                process.on_exit,
                cgroup_fd=cgroup_fd,
                join_fds=ns_fds,
                what="exec setup",
            )
        finally:
            for fd in [*child_ends, *(fd for fd, _ in ns_fds)]:
                os.close(fd)
            if cgroup_fd >= 0:
                os.close(cgroup_fd)
        process.pid = spawned.pid
        try:
            if spawned.pty_master >= 0:
                process.attach_pty(spawned.pty_master)
                spawned.pty_master = -1
            spawned.wait_exec(process.path)
        finally:
            spawned.close()

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        process = self.execs.get(exec_id)
        if process is None:
            raise NotFound(f"container {self.id} has no exec {exec_id!r}")
        return process

    def signal(self, exec_id: str, signum: int, all_processes: bool) -> None:
        """Send ``signum``; a process that is gone already counts as signalled (ESRCH is success)."""
        process = self.process(exec_id)
        if all_processes and not exec_id and self.cgroup is not None:
            if signum == 9 and self.cgroup.kill():
                return
            for pid in self.cgroup.procs():
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass
            return
        self.reaper.kill(process.pid, signum)

    def pause(self) -> None:
        with self.lock:
            self._require("pause")
            self._need_cgroup("pause").freeze(True)
            self._state = PAUSED

    def resume(self) -> None:
        with self.lock:
            self._require("resume")
            self._need_cgroup("resume").freeze(False)
            self._state = RUNNING

    def update(self, files: dict[str, str]) -> None:
        with self.lock:
            self._require("update")
            self._need_cgroup("update").apply(files)

    def _need_cgroup(self, action: str) -> Cgroup:
        if self.cgroup is None:
            raise Unsupported(f"cannot {action} container {self.id}: the guest has no cgroup v2")
        return self.cgroup

    def pids(self) -> list[int]:
        if self.cgroup is not None:
            return self.cgroup.procs()
        return [p.pid for p in (self.init, *self.execs.values()) if p.pid and not p.exited]

    def terminate(self) -> None:
        """SIGTERM the init of a started container (what a graceful stop begins with)."""
        if self._state != CREATED and self.init.pid and not self.init.exited:
            if self._state == PAUSED and self.cgroup is not None:
                try:
                    self.cgroup.freeze(False)  # a frozen init cannot handle SIGTERM
                    self._state = RUNNING
                except (OSError, FailedPrecondition):
                    pass
            self.reaper.kill(self.init.pid, 15)

    def kill_all(self, timeout: float) -> None:
        """SIGTERM the init, SIGKILL everything after ``timeout`` seconds; wait until all are gone."""
        with self.lock:
            if self.init.pid and not self.init.exited:
                if self._state != CREATED and timeout > 0:
                    self.terminate()
                    self.init.wait(timeout=timeout)
                if not self.init.exited:
                    if self.cgroup is None or not self.cgroup.kill():
                        self.reaper.kill(self.init.pid, 9)  # SIGKILL works on frozen tasks too
                    self.init.wait(timeout=10.0)
            # Execs die with the init's PID namespace; without one they need their own SIGKILL.
            for process in self.execs.values():
                if process.pid and not process.exited:
                    self.reaper.kill(process.pid, 9)
                    process.wait(timeout=10.0)
            if self.cgroup is not None:
                deadline = time.monotonic() + 5.0
                while self.cgroup.procs() and time.monotonic() < deadline:
                    self.cgroup.kill()
                    time.sleep(0.01)

    def release(self) -> None:
        """Close what the agent holds for this container (after :meth:`kill_all`)."""
        if self._spawned is not None:
            self._spawned.close()
            self._spawned = None
        for process in (self.init, *self.execs.values()):
            process.close_streams()
