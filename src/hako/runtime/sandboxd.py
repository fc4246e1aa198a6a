"""The per-sandbox daemon behind ``hako run`` (Kata's runtime, shim and proxy in one process).

Forked from the CLI, it owns the VM for its whole life, in a private mount
namespace so that nothing it mounts can outlive it. It serves the guest agent's
own ttRPC API on ``<run dir>/api.sock``: most calls are forwarded to the agent
untouched (exec, signals, stdin, resize, stats), and a few are its own:

    StartContainer   waits for boot and container creation, then starts it
    WaitProcess      main process: answered from the daemon's record, so a dead VM
                     still yields an exit (137); exec'd processes: the sandbox's wait
    ReadStdout/Err   main process: from the daemon's pump, which also keeps the log
    DestroySandbox   stop the sandbox now

The daemon stops the VM once the main process has exited, its output is
drained, and no client is connected; then it reports its final state through
the pipe the CLI gave it and exits (removing the state with ``--rm``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from google.protobuf.any_pb2 import Any as AnyPb

from hako.errors import ContainerNotFound, ExecNotExecutable, ExecNotFound, HakoError
from hako.runtime import mounts
from hako.runtime.agent import SERVICE_NAME
from hako.runtime.output import STDERR, STDOUT, Channel, OutputLog
from hako.runtime.sandbox import Sandbox, SandboxConfig
from hako.runtime.sockets import listen_unix
from hako.runtime.state import SandboxState, Status, process_start_ticks
from hako_api import agent_pb2 as pb
from hako_ttrpc import CallContext, Server, TtrpcError, codes

API_SOCKET = "api.sock"
START_TIMEOUT = 300.0  # a created container nobody starts is given up after this long


def exec_failure_status(exc: HakoError) -> TtrpcError:
    """Re-encode an exec failure so the CLI on the other side maps it to 126/127 again."""
    if isinstance(exc, ExecNotFound | ExecNotExecutable):
        detail = pb.ExecFailure(
            errno=errno.ENOENT if isinstance(exc, ExecNotFound) else errno.EACCES, message=str(exc)
        )
        packed = AnyPb()
        packed.Pack(detail)
        return TtrpcError(codes.FAILED_PRECONDITION, str(exc), [packed])
    if isinstance(exc, ContainerNotFound):
        return TtrpcError(codes.NOT_FOUND, str(exc))
    return TtrpcError(getattr(exc, "code", codes.UNKNOWN) or codes.UNKNOWN, str(exc))


class SandboxDaemon:
    def __init__(
        self, state: SandboxState, config: SandboxConfig, spec: Mapping[str, Any], stdin: bool, attach: bool
    ) -> None:
        self.state = state
        self.sandbox = Sandbox(config)
        self.container_id = state.id
        self.spec = spec
        self.stdin = stdin
        self.run_dir = config.run_dir
        self.log_file = (self.run_dir / "daemon.log").open("a", buffering=1)
        self.output = OutputLog(self.run_dir / "containers" / self.container_id / "output.log")
        self.channels = {STDOUT: Channel(), STDERR: Channel()} if attach else {}
        self.created = threading.Event()
        self.create_error: HakoError | None = None
        self.started = threading.Event()
        self.exited = threading.Event()
        self.exit_status = 0
        self.pumps_done = threading.Event()
        self._pumps_running = 2
        self._pumps_lock = threading.Lock()
        self.wake = threading.Event()  # something changed that may let the daemon finish
        self.server = Server(log=self.log)
        self.server.on_disconnect = self.wake.set
        self._register()

    def log(self, message: str) -> None:
        self.log_file.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")

    # -- API -----------------------------------------------------------------------------------
    def _register(self) -> None:
        s = self.server
        s.register_method(SERVICE_NAME, "StartContainer", pb.ContainerRequest, self.StartContainer)
        s.register_method(SERVICE_NAME, "WaitProcess", pb.ProcessRequest, self.WaitProcess)
        s.register_method(SERVICE_NAME, "ReadStdout", pb.ReadStreamRequest, self.ReadStdout)
        s.register_method(SERVICE_NAME, "ReadStderr", pb.ReadStreamRequest, self.ReadStderr)
        s.register_method(SERVICE_NAME, "DestroySandbox", pb.DestroySandboxRequest, self.DestroySandbox)
        s.set_fallback(self._forward)

    def _forward(self, ctx: CallContext, payload: bytes) -> bytes:
        if ctx.service != SERVICE_NAME:
            raise TtrpcError(codes.UNIMPLEMENTED, f"{ctx.service}: not served here")
        if ctx.method in ("CreateContainer", "CreateSandbox"):
            raise TtrpcError(codes.FAILED_PRECONDITION, f"{ctx.method} is the daemon's own business")
        if not self.created.wait(self.sandbox.config.boot_timeout + 30):
            raise TtrpcError(codes.UNAVAILABLE, "the sandbox is not ready")
        if self.sandbox.agent is None or self.sandbox.dead.is_set():
            raise TtrpcError(codes.UNAVAILABLE, f"the sandbox is dead: {self.sandbox.death_reason}")
        timeout = max(0.0, ctx.deadline - time.monotonic()) if ctx.deadline else None
        return self.sandbox.agent.call_raw(ctx.method, payload, timeout=timeout)

    def StartContainer(self, request: pb.ContainerRequest, ctx: CallContext) -> pb.StartContainerResponse:
        self._check_main(request.container_id)
        self.created.wait()
        if self.create_error is not None:
            raise exec_failure_status(self.create_error)
        try:
            pid = self.sandbox.start_container(self.container_id)
        except HakoError as exc:
            self.log(f"start failed: {exc}")
            self._finish_exit(exc.exit_code, error=str(exc))
            raise exec_failure_status(exc) from exc
        self.started.set()
        self.state.status = Status.RUNNING
        self.state.timing = dict(self.sandbox.timing)
        self.state.save()
        threading.Thread(target=self._wait_main, daemon=True, name="wait-main").start()
        return pb.StartContainerResponse(pid=pid)

    def WaitProcess(self, request: pb.ProcessRequest, ctx: CallContext) -> pb.WaitProcessResponse:
        if request.exec_id:
            try:
                status = self.sandbox.wait(request.container_id, request.exec_id)
            except HakoError as exc:
                raise exec_failure_status(exc) from exc
            return pb.WaitProcessResponse(exit_status=status)
        self._check_main(request.container_id)
        while not self.exited.wait(0.2):
            if ctx.closed.is_set():
                raise TtrpcError(codes.CANCELLED, "the client went away")
        return pb.WaitProcessResponse(exit_status=self.exit_status)

    def ReadStdout(self, request: pb.ReadStreamRequest, ctx: CallContext) -> pb.ReadStreamResponse:
        return self._read(STDOUT, request, ctx)

    def ReadStderr(self, request: pb.ReadStreamRequest, ctx: CallContext) -> pb.ReadStreamResponse:
        return self._read(STDERR, request, ctx)

    def _read(self, stream: int, request: pb.ReadStreamRequest, ctx: CallContext) -> pb.ReadStreamResponse:
        if request.exec_id:
            method = "ReadStdout" if stream == STDOUT else "ReadStderr"
            return pb.ReadStreamResponse.FromString(
                self._forward(_as(ctx, method), request.SerializeToString())
            )
        self._check_main(request.container_id)
        channel = self.channels.get(stream)
        if channel is None:
            raise TtrpcError(codes.FAILED_PRECONDITION, "not attached: the output is in the log (hako logs)")
        data = channel.read(request.len or 65536, ctx.closed)
        if data is None:
            raise TtrpcError(codes.CANCELLED, "the client went away")
        return pb.ReadStreamResponse(data=data)

    def DestroySandbox(self, request: pb.DestroySandboxRequest, ctx: CallContext) -> pb.Empty:
        self.log("stop requested")
        if not self.exited.is_set():
            self._finish_exit(137 if self.started.is_set() else 0, error=None, stopped=True)
        self.wake.set()
        return pb.Empty()

    def _check_main(self, container_id: str) -> None:
        if container_id != self.container_id:
            raise TtrpcError(codes.NOT_FOUND, f"no container {container_id} here")

    # -- work ----------------------------------------------------------------------------------
    def _boot_and_create(self) -> None:
        try:
            self.sandbox.wait_ready()
            self.state.guest_kernel_release = self.sandbox.kernel_release
            self.sandbox.add_container(self.container_id, self.spec, self.stdin)
            for stream in (STDOUT, STDERR):
                threading.Thread(
                    target=self._pump, args=(stream,), daemon=True, name=f"pump-{stream}"
                ).start()
            self.state.timing = dict(self.sandbox.timing)
            self.state.save()
        except HakoError as exc:
            self.log(f"boot/create failed: {exc}")
            self.create_error = exc
            self._finish_exit(exc.exit_code, error=str(exc))
            self.pumps_done.set()
        except Exception as exc:
            self.log(f"boot/create crashed:\n{traceback.format_exc()}")
            self.create_error = HakoError(f"internal error: {exc}")
            self._finish_exit(125, error=str(exc))
            self.pumps_done.set()
        finally:
            self.created.set()

    def _pump(self, stream: int) -> None:
        assert self.sandbox.agent is not None
        read = self.sandbox.agent.read_stdout if stream == STDOUT else self.sandbox.agent.read_stderr
        try:
            while True:
                try:
                    data = read(self.container_id)
                except HakoError as exc:
                    if not self.sandbox.dead.is_set():
                        self.log(f"output stream {stream} ended: {exc}")
                    break
                if not data:
                    break
                self.output.append(stream, data)
                channel = self.channels.get(stream)
                if channel is not None:
                    channel.put(data)
        finally:
            channel = self.channels.get(stream)
            if channel is not None:
                channel.close()
            self._pump_finished()

    def _pump_finished(self) -> None:
        with self._pumps_lock:
            self._pumps_running -= 1
            if self._pumps_running == 0:
                self.pumps_done.set()
                self.wake.set()

    def _wait_main(self) -> None:
        started = time.monotonic()
        status = self.sandbox.wait(self.container_id)
        self.sandbox.timing["container_run"] = time.monotonic() - started
        error = (self.sandbox.death_reason or None) if self.sandbox.dead.is_set() else None
        self._finish_exit(status, error=error)
        if self.sandbox.dead.is_set():
            # The VM is gone: no more output will come.
            for channel in self.channels.values():
                channel.close()
            self.pumps_done.set()

    def _finish_exit(self, status: int, error: str | None, stopped: bool = False) -> None:
        if self.exited.is_set():
            return
        self.exit_status = status
        self.state.exit_status = status
        self.state.finished = time.time()
        self.state.error = error
        self.state.status = Status.DEAD if self.sandbox.dead.is_set() and not stopped else Status.EXITED
        self.state.timing = dict(self.sandbox.timing)
        self.exited.set()
        self.state.save()
        self.wake.set()

    # -- main ----------------------------------------------------------------------------------
    def run(self, notify_fd: int) -> int:
        listener = listen_unix(self.run_dir / API_SOCKET)
        self.state.daemon_pid = os.getpid()
        self.state.daemon_start_ticks = process_start_ticks(os.getpid())
        started_run = time.monotonic()
        try:
            self.sandbox.start()
        except HakoError as exc:
            self.log(f"VM start failed: {exc}")
            _notify(notify_fd, {"error": str(exc), "exit_code": exc.exit_code})
            listener.close()
            self._cleanup(remove=True)
            return exc.exit_code
        self.state.qemu_pid = self.sandbox.vm.pid
        self.state.save()
        threading.Thread(target=self.server.serve_listener, args=(listener,), daemon=True).start()
        _notify(notify_fd, {"ok": True})
        self.sandbox.vm.on_exit(self.wake.set)
        threading.Thread(target=self._boot_and_create, daemon=True, name="boot").start()
        signal.signal(signal.SIGTERM, lambda *_: self.DestroySandbox(pb.DestroySandboxRequest(), _NO_CTX))
        self._main_loop(started_run)
        self.server.shutdown()
        self._cleanup(remove=self.state.auto_remove)
        final = asdict(self.state)
        final["status"] = self.state.status.value
        _notify(notify_fd, {"final": final})
        return 0

    def _main_loop(self, started_run: float) -> None:
        stop_at: float | None = None
        while True:
            self.wake.wait(1.0)
            self.wake.clear()
            if self.exited.is_set():
                # Let attached clients drain the output, then stop once they have left.
                self.pumps_done.wait(10)
                if not self.sandbox.dead.is_set() and not self.sandbox._stopping.is_set():
                    self.sandbox.stop()
                    self.state.timing = dict(self.sandbox.timing)
                    self.state.save()
                if stop_at is None:
                    stop_at = time.monotonic() + 600  # do not wait for a stuck client forever
                if self.server.connection_count == 0 or time.monotonic() > stop_at:
                    return
            elif self.sandbox.dead.is_set() and not self.started.is_set() and self.created.is_set():
                return
            elif (
                not self.started.is_set()
                and self.server.connection_count == 0
                and time.monotonic() - started_run > START_TIMEOUT
            ):
                self.log("nobody started the container: giving up")
                self._finish_exit(0, error="never started", stopped=True)

    def _cleanup(self, remove: bool) -> None:
        self.sandbox.stop()
        if self.exited.is_set() or self.state.status != Status.EXITED:
            self.state.save()
        with contextlib.suppress(OSError):
            (self.run_dir / API_SOCKET).unlink()
        self.log_file.close()
        if remove:
            shutil.rmtree(self.run_dir, ignore_errors=True)


class _NoCtx:
    closed = threading.Event()


_NO_CTX: Any = _NoCtx()


def _as(ctx: CallContext, method: str) -> CallContext:
    return CallContext(ctx.service, method, ctx.metadata, ctx.deadline, ctx.closed, ctx.stream_id)


def _notify(fd: int, message: Mapping[str, Any]) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, json.dumps(message).encode() + b"\n")


def daemonize_and_run(
    state: SandboxState, config: SandboxConfig, spec: Mapping[str, Any], stdin: bool, attach: bool
) -> tuple[int, Notifications]:
    """Fork the daemon. Returns its pid and its notification pipe.

    The pipe carries one JSON line once the VM is launched ({"ok": true} or
    {"error": ...}), and a last one with the final state when the daemon ends.
    The caller must not have started threads (we fork).
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        return pid, Notifications(read_fd)
    # The daemon: its own session, its own mount namespace, no terminal.
    code = 125
    try:
        os.close(read_fd)
        os.setsid()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        devnull = os.open(os.devnull, os.O_RDWR)
        log_fd = os.open(config.run_dir / "daemon.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(devnull, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(devnull)
        os.close(log_fd)
        mounts.private_namespace()
        code = SandboxDaemon(state, config, spec, stdin, attach).run(write_fd)
    except BaseException as exc:
        message = str(exc) if isinstance(exc, HakoError) else f"internal error: {exc!r}"
        with contextlib.suppress(Exception):
            traceback.print_exc()
            _notify(write_fd, {"error": message, "exit_code": 125})
    finally:
        os._exit(code)


class Notifications:
    """The daemon's notification pipe, read by the process that forked it: one JSON object per line."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = b""

    def next(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next message; None once the daemon has gone (or after ``timeout`` seconds of silence)."""
        import select

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

    def close(self) -> None:
        os.close(self.fd)


def remove_dead(state: SandboxState) -> None:
    """Clean up after a sandbox whose daemon is gone: kill its QEMU if it survived, drop the state."""
    if state.qemu_pid and not state.daemon_alive():
        cmdline = Path(f"/proc/{state.qemu_pid}/cmdline")
        with contextlib.suppress(OSError):
            if f"hako-{state.id[:12]}".encode() in cmdline.read_bytes():
                os.kill(state.qemu_pid, signal.SIGKILL)
    shutil.rmtree(state.dir, ignore_errors=True)
