"""The per-sandbox daemon behind ``hako run`` (Kata's runtime, shim and proxy in one process).

Forked by :mod:`hako.runtime.launch`, which has already started the VM, it owns
the VM for its whole life, in a private mount namespace so that nothing it
mounts can outlive it. It serves the guest agent's own ttRPC API on
``<run dir>/api.sock``: most calls go to the agent untouched (exec, signals,
stdin, resize, stats, processes), and a few are its own:

    CreateContainer  the spec has HOST paths: share the rootfs and volumes with the
                     guest, then create it there (metadata ``hako-attach: 1`` keeps
                     the output for an attached client, ``hako-image`` names the image)
    StartContainer   start it, and watch the main process from then on
    WaitProcess      main process: from the daemon's record, so a dead VM still
                     yields an exit (137); exec'd processes: the sandbox's wait
    ReadStdout/Err   main process: from the daemon's pump, which also keeps the log
    DestroySandbox   stop the sandbox now

Once the main process has exited, its output is drained and no client is
connected, the daemon stops the VM, reports its final state through the
notification pipe and exits (removing its state with ``--rm``).

A daemon in the warm pool (:mod:`hako.runtime.pool`) waits with its VM paused until a
``hako run`` claims it (the Daemon service's ``Claim``), or, in a pool of network ``none``,
until a containerd shim's ``start`` hands it a pod on ``adopt.sock``: it then becomes that
pod's shim (:mod:`hako.shim.pooled`). The other pools' daemons share a process, their pool's
keeper (:mod:`hako.runtime.keeper`), each on threads of its own.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from google.protobuf.any_pb2 import Any as AnyPb

from hako.errors import ContainerNotFound, ExecNotExecutable, ExecNotFound, HakoError, SandboxError
from hako.hypervisor import Hypervisor
from hako.network.host import PortMapping
from hako.network.sandbox import SandboxNetwork
from hako.runtime.agent import SERVICE_NAME
from hako.runtime.config import SandboxConfig
from hako.runtime.launch import notify
from hako.runtime.output import STDERR, STDOUT, Channel, OutputLog
from hako.runtime.paths import ADOPT_SOCKET, API_SOCKET
from hako.runtime.pool import CLAIMED_MARK, POOLED_MARK, SHIM_NETWORK
from hako.runtime.sandbox import Sandbox
from hako.runtime.sockets import listen_unix
from hako.runtime.state import STATE_FILE, SandboxState, Status, hold_live_lock, process_start_ticks
from hako_api import agent_pb2 as pb
from hako_api import daemon_pb2 as daemon_pb
from hako_ttrpc import CallContext, Server, TtrpcError, codes

if TYPE_CHECKING:
    from hako.shim.pooled import Adoption

DAEMON_SERVICE = daemon_pb.DESCRIPTOR.services_by_name["Daemon"].full_name
ATTACH_KEY = "hako-attach"
IMAGE_KEY = "hako-image"
DISK_KEY = "hako-disk"  # the image as an ext4 disk image: the rootfs goes on a block device
PUBLISH_KEY = "hako-publish"  # host ports to forward to the sandbox: HOST:CTR/PROTO,...
IDLE_TIMEOUT = 300.0  # a sandbox whose container nobody creates or starts is given up after this
REFILL_DELAY = 2.0  # seconds after a containerd pod took a pooled sandbox, the pool refills
# What a paused guest could not answer (its vCPUs are stopped): refused until it is resumed.
REFUSED_WHILE_PAUSED = frozenset(
    {"ExecProcess", "SignalProcess", "StatsContainer", "ListProcesses", "UpdateContainer"}
)


def status_of(exc: HakoError) -> TtrpcError:
    """The status to answer a client with, such that its AgentClient raises the same error again."""
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
        self,
        state: SandboxState,
        config: SandboxConfig,
        vm: Hypervisor,
        *,
        pooled: bool = False,
        network: SandboxNetwork | None = None,
    ) -> None:
        self.state = state
        # In the warm pool: once ready, the VM is paused until a `hako run` claims it.
        self.pooled = pooled
        self.claimed = threading.Event()
        # A containerd pod's, with its socket, once its shim's start handed it over.
        self.adoption: tuple[Adoption, socket.socket, int | None] | None = None
        self.notify_fd = -1
        self.sandbox = Sandbox(
            config, vm, warn=lambda message: self.log(f"warning: {message}"), network=network
        )
        self.container_id = state.id
        self.run_dir = config.run_dir
        self.log_file = (self.run_dir / "daemon.log").open("a", buffering=1)
        self.output = OutputLog(self.run_dir / "containers" / self.container_id / "output.log")
        self.channels: dict[int, Channel] = {}
        self.ready = threading.Event()  # the agent answered (or boot failed: boot_error)
        self.boot_error: HakoError | None = None
        self.created = threading.Event()
        self.started = threading.Event()
        self.exited = threading.Event()
        self.stop_requested = threading.Event()
        self.exit_status = 0
        self.pumps_done = threading.Event()
        self._pumps_running = 2
        self._pumps_lock = threading.Lock()
        self._create_lock = threading.Lock()
        self.paused = threading.Event()  # hako pause: the VM's vCPUs are stopped
        self._pause_lock = threading.Lock()
        self.wake = threading.Event()  # something changed that may let the daemon finish
        self.server = Server(log=self.log)
        self.server.on_disconnect = self.wake.set
        s = self.server
        s.register_method(SERVICE_NAME, "CreateContainer", pb.CreateContainerRequest, self.CreateContainer)
        s.register_method(SERVICE_NAME, "StartContainer", pb.ContainerRequest, self.StartContainer)
        s.register_method(SERVICE_NAME, "WaitProcess", pb.ProcessRequest, self.WaitProcess)
        s.register_method(SERVICE_NAME, "ReadStdout", pb.ReadStreamRequest, self.ReadStdout)
        s.register_method(SERVICE_NAME, "ReadStderr", pb.ReadStreamRequest, self.ReadStderr)
        s.register_method(SERVICE_NAME, "DestroySandbox", pb.DestroySandboxRequest, self.DestroySandbox)
        s.register_method(DAEMON_SERVICE, "Claim", daemon_pb.ClaimRequest, self.Claim)
        s.register_method(DAEMON_SERVICE, "Pause", daemon_pb.PauseRequest, self.Pause)
        s.register_method(DAEMON_SERVICE, "Resume", daemon_pb.PauseRequest, self.Resume)
        s.set_fallback(self._forward)

    def log(self, message: str) -> None:
        self.log_file.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")

    # -- API -----------------------------------------------------------------------------------
    def _forward(self, ctx: CallContext, payload: bytes) -> bytes:
        if ctx.service != SERVICE_NAME:
            raise TtrpcError(codes.UNIMPLEMENTED, f"{ctx.service}: not served here")
        if ctx.method == "CreateSandbox":
            raise TtrpcError(codes.FAILED_PRECONDITION, "the sandbox is created by its daemon")
        if self.paused.is_set() and ctx.method in REFUSED_WHILE_PAUSED:
            raise TtrpcError(codes.FAILED_PRECONDITION, "the container is paused: unpause it first")
        self._need_ready()
        if self.sandbox.agent is None or self.sandbox.dead.is_set():
            raise TtrpcError(codes.UNAVAILABLE, f"the sandbox is dead: {self.sandbox.death_reason}")
        timeout = max(0.0, ctx.deadline - time.monotonic()) if ctx.deadline else None
        return self.sandbox.agent.call_raw(ctx.method, payload, timeout=timeout)

    def _need_ready(self) -> None:
        if not self.ready.wait(self.sandbox.config.boot_timeout + 30):
            raise TtrpcError(codes.UNAVAILABLE, "the sandbox did not become ready")
        if self.boot_error is not None:
            raise status_of(self.boot_error)

    def CreateContainer(self, request: pb.CreateContainerRequest, ctx: CallContext) -> pb.Empty:
        self._check_main(request.container_id)
        # The host's part (rootfs disk, shares, ports) starts once the VM is the one that stays,
        # while the guest sets itself up; the guest's part waits for that (before_create).
        if not self.sandbox.settled.wait(self.sandbox.config.boot_timeout + 30):
            raise TtrpcError(codes.UNAVAILABLE, "the sandbox did not become ready")
        with self._create_lock:
            if self.created.is_set():
                raise TtrpcError(codes.ALREADY_EXISTS, f"container {request.container_id} exists")
            try:
                spec: dict[str, Any] = json.loads(request.oci_spec)
                self._publish(ctx.first(PUBLISH_KEY))
                disk = ctx.first(DISK_KEY)
                self.sandbox.add_container(
                    self.container_id,
                    spec,
                    request.stdin,
                    disk=Path(disk) if disk else None,
                    before_create=self._need_ready,
                )
            except HakoError as exc:
                # A VM that died under the host's part fails its boot too: that is what to report.
                booted = self.ready.wait(self.sandbox.config.boot_timeout + 30)
                error = self.boot_error if booted and self.boot_error is not None else exc
                self.log(f"create failed: {error}")
                raise status_of(error) from exc
            if ctx.first(ATTACH_KEY) == "1":
                self.channels = {STDOUT: Channel(), STDERR: Channel()}
            for stream in (STDOUT, STDERR):
                threading.Thread(
                    target=self._pump, args=(stream,), daemon=True, name=f"pump-{stream}"
                ).start()
            self.state.image = ctx.first(IMAGE_KEY) or self.state.image
            self.state.command = list(spec.get("process", {}).get("args", []))
            self.state.timing = dict(self.sandbox.timing)
            self.state.save()
            self.created.set()
        return pb.Empty()

    def _publish(self, ports: str | None) -> None:
        """Forward the host ports ``ports`` names (``HOST:CTR/PROTO,...``) to the sandbox."""
        mappings = [PortMapping.parse(text) for text in ports.split(",")] if ports else []
        if not mappings:
            return
        if self.sandbox.network is None:
            raise SandboxError("this sandbox has no network to publish ports on")
        self.sandbox.network.publish(mappings)
        self.state.ports = [str(mapping) for mapping in mappings]

    def StartContainer(self, request: pb.ContainerRequest, ctx: CallContext) -> pb.StartContainerResponse:
        self._check_main(request.container_id)
        if not self.created.is_set():
            raise TtrpcError(codes.FAILED_PRECONDITION, f"container {request.container_id} is not created")
        try:
            pid = self.sandbox.start_container(self.container_id)
        except HakoError as exc:
            self.log(f"start failed: {exc}")
            self._finish(exc.exit_code, error=str(exc))
            raise status_of(exc) from exc
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
                raise status_of(exc) from exc
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
            forwarded = CallContext(
                ctx.service, method, ctx.metadata, ctx.deadline, ctx.closed, ctx.stream_id
            )
            return pb.ReadStreamResponse.FromString(self._forward(forwarded, request.SerializeToString()))
        self._check_main(request.container_id)
        channel = self.channels.get(stream)
        if channel is None:
            raise TtrpcError(codes.FAILED_PRECONDITION, "not attached: the output is in the log (hako logs)")
        data = channel.read(request.len or 65536, ctx.closed)
        if data is None:
            raise TtrpcError(codes.CANCELLED, "the client went away")
        return pb.ReadStreamResponse(data=data)

    def DestroySandbox(self, request: pb.DestroySandboxRequest, ctx: CallContext | None) -> pb.Empty:
        self.log("stop requested")
        self.stop_requested.set()
        if self.paused.is_set() or (self.pooled and not self.claimed.is_set()):
            with contextlib.suppress(HakoError):
                self.sandbox.vm.resume()  # a paused guest cannot shut down
            self.paused.clear()
        self._finish(137 if self.started.is_set() else 0, error=None, stopped=True)
        self.wake.set()
        return pb.Empty()

    def Claim(self, request: daemon_pb.ClaimRequest, ctx: CallContext) -> daemon_pb.ClaimResponse:
        took = self._take_from_pool()
        if request.hostname:  # (its network, as the pool set it up, goes with it unchanged)
            try:
                self.sandbox.take_identity(request.hostname)
            except HakoError as exc:
                self._pool_take_failed(exc)
        try:
            fd = os.open(request.notify_path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            self._pool_take_failed(exc)
        os.set_blocking(fd, True)
        old, self.notify_fd = self.notify_fd, fd
        with contextlib.suppress(OSError):
            os.close(old)  # the filler's pipe, long since closed at its end
        self.state.name = request.name
        self.state.auto_remove = request.auto_remove
        self.state.created = request.created
        self.state.status = Status.CREATING
        self.state.timing = dict(self.sandbox.timing)
        self.state.save()
        self.log(f"claimed as {request.name} in {took * 1000:.0f} ms")
        return daemon_pb.ClaimResponse(took=took)

    def Pause(self, request: daemon_pb.PauseRequest, ctx: CallContext) -> daemon_pb.PauseResponse:
        with self._pause_lock:
            if self.paused.is_set():
                raise TtrpcError(codes.FAILED_PRECONDITION, "the container is paused already")
            if not self.started.is_set() or self.exited.is_set():
                raise TtrpcError(codes.FAILED_PRECONDITION, "the container is not running")
            try:
                self.sandbox.vm.pause()
            except HakoError as exc:
                raise status_of(exc) from exc
            self.paused.set()
            self.state.status = Status.PAUSED
            self.state.save()
        self.log("paused")
        return daemon_pb.PauseResponse()

    def Resume(self, request: daemon_pb.PauseRequest, ctx: CallContext) -> daemon_pb.PauseResponse:
        with self._pause_lock:
            if not self.paused.is_set():
                raise TtrpcError(codes.FAILED_PRECONDITION, "the container is not paused")
            # Running again before its vCPUs are: its exit, from then on, is recorded after.
            self.state.status = Status.RUNNING
            self.state.save()
            try:
                self.sandbox.vm.resume()
                self.paused.clear()
                self.sandbox.renew_identity()  # its clock stood still while paused
            except HakoError as exc:
                raise status_of(exc) from exc
        self.log("resumed")
        return daemon_pb.PauseResponse()

    def _take_from_pool(self) -> float:
        """Resume the pooled VM with the host's clock and fresh entropy; seconds it took."""
        with self._create_lock:
            if not self.pooled or self.claimed.is_set() or self.state.status != Status.POOLED:
                raise TtrpcError(codes.FAILED_PRECONDITION, "this sandbox is not waiting in the pool")
            self.claimed.set()
        started = time.monotonic()
        try:
            self.sandbox.vm.resume()
            self.sandbox.renew_identity()
        except HakoError as exc:
            self._pool_take_failed(exc)
        took = time.monotonic() - started
        self.sandbox.timing.clear()  # restore and setup happened long ago, when the pool was filled
        self.sandbox.timing["pool_take"] = took
        return took

    def _pool_take_failed(self, exc: Exception) -> NoReturn:
        self.log(f"taking it from the pool failed: {exc}")
        self._finish(125, error=f"the pooled sandbox failed: {exc}")
        raise TtrpcError(codes.UNAVAILABLE, f"the pooled sandbox failed: {exc}") from exc

    def _on_sigterm(self, signum: int, frame: object) -> None:
        # A handler runs on the main thread between two of its bytecodes, which may be inside a
        # lock that thread holds (an Event's, in its main loop): stopping takes such locks, so
        # it is done on a thread of its own.
        self.stop_soon()

    def _check_main(self, container_id: str) -> None:
        if container_id != self.container_id:
            raise TtrpcError(codes.NOT_FOUND, f"no container {container_id} here")

    # -- work ----------------------------------------------------------------------------------
    def _boot(self) -> None:
        try:
            self.sandbox.wait_ready()
            self.state.qemu_pid = self.sandbox.vm.pid  # another QEMU if a restore fell back to a boot
            self.state.guest_kernel_release = self.sandbox.kernel_release
            self.state.timing = dict(self.sandbox.timing)
            if self.pooled:
                # A VM whose warm-up failed is in a state nobody knows (a disk still mounted in
                # the guest, say): it fails like a boot would, and is never handed out.
                self.sandbox.warm_up()
                self.log(f"warmed up in {self.sandbox.timing['warm_up'] * 1000:.0f} ms")
                self.sandbox.vm.pause()
                self.state.status = Status.POOLED
            self.state.save()
            if self.pooled:  # takers look for the mark, then find the state saved
                (self.run_dir / POOLED_MARK).touch()
                notify(self.notify_fd, {"pooled": True})
        except HakoError as exc:
            self.log(f"boot failed: {exc}")
            self.boot_error = exc
            self._finish(exc.exit_code, error=str(exc))
        except Exception as exc:
            self.log(f"boot crashed:\n{traceback.format_exc()}")
            self.boot_error = HakoError(f"internal error: {exc}")
            self._finish(125, error=str(exc))
        finally:
            self.ready.set()

    def _pump(self, stream: int) -> None:
        assert self.sandbox.agent is not None
        read = self.sandbox.agent.read_stdout if stream == STDOUT else self.sandbox.agent.read_stderr
        channel = self.channels.get(stream)
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
                if channel is not None:
                    channel.put(data)
        finally:
            if channel is not None:
                channel.close()
            with self._pumps_lock:
                self._pumps_running -= 1
                if self._pumps_running == 0:
                    self.pumps_done.set()
                    self.wake.set()

    def _wait_main(self) -> None:
        started = time.monotonic()
        status = self.sandbox.wait(self.container_id)
        self.sandbox.timing["container_run"] = time.monotonic() - started
        dead = self.sandbox.dead.is_set()
        self._finish(status, error=(self.sandbox.death_reason or None) if dead else None)
        if dead:  # no more output will come
            for channel in self.channels.values():
                channel.close()
            self.pumps_done.set()

    def _finish(self, status: int, error: str | None, stopped: bool = False) -> None:
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
        """Serve the sandbox until it is done; the process's exit code. In a process of its own,
        on its main thread; in a pool's keeper (:mod:`hako.runtime.keeper`), on a thread of its
        own, the keeper handling signals."""
        live = hold_live_lock(self.run_dir) if self.state.shared_daemon else None
        try:
            return self._run(notify_fd)
        finally:
            if live is not None:
                os.close(live)

    def _run(self, notify_fd: int) -> int:
        on_main = threading.current_thread() is threading.main_thread()
        self.notify_fd = notify_fd
        listener = listen_unix(self.run_dir / API_SOCKET)
        self.state.daemon_pid = os.getpid()
        self.state.daemon_start_ticks = process_start_ticks(os.getpid())
        self.state.qemu_pid = self.sandbox.vm.pid
        network = self.sandbox.network
        if network is not None:
            self.state.network = network.mode
            self.state.address = str(network.address) if network.address is not None else None
        self.state.save()
        self.sandbox.start()
        self.sandbox.vm.on_exit(self.wake.set)
        threading.Thread(target=self._boot, daemon=True, name="boot").start()
        threading.Thread(target=self.server.serve_listener, args=(listener,), daemon=True).start()
        if on_main:
            signal.signal(signal.SIGTERM, self._on_sigterm)
        if self.pooled and network is not None and network.mode == SHIM_NETWORK:
            adopt = listen_unix(self.run_dir / ADOPT_SOCKET)
            threading.Thread(target=self._await_adoption, args=(adopt,), daemon=True, name="adopt").start()
        notify(self.notify_fd, {"serving": True})
        self._main_loop()
        if self.adoption is not None:
            return self._become_shim(*self.adoption)
        if on_main:  # stopping already: a SIGTERM now (the CLI giving up on us) has nothing to ask
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.server.shutdown()
        self.sandbox.stop(discard=self._discard)
        self.state.timing = dict(self.sandbox.timing)
        self.state.save()
        with contextlib.suppress(OSError):
            (self.run_dir / API_SOCKET).unlink()
        self.log_file.close()
        final = asdict(self.state)
        final["status"] = self.state.status.value
        if self._discard:
            shutil.rmtree(self.run_dir, ignore_errors=True)  # --rm, or nothing was ever created
        notify(self.notify_fd, {"final": final})
        return 0

    def stop_soon(self) -> None:
        """Stop the sandbox, from a thread of its own (a signal handler's way to ask)."""
        threading.Thread(
            target=self.DestroySandbox, args=(pb.DestroySandboxRequest(), None), daemon=True, name="stop"
        ).start()

    @property
    def _discard(self) -> bool:
        """Nothing of this sandbox outlives it (--rm, or no container was ever created)."""
        return self.state.auto_remove or not self.created.is_set()

    def _await_adoption(self, adopt: socket.socket) -> None:
        """Wait for a containerd shim's start to hand this sandbox a pod (:mod:`hako.shim.pooled`):
        the VM resumes, the main loop ends, and this process becomes the pod's shim."""
        with adopt:
            while not self.exited.is_set():
                try:
                    conn, _ = adopt.accept()
                except OSError:
                    return
                with conn:
                    if self._adopt(conn):
                        self.wake.set()
                        return

    def _adopt(self, conn: socket.socket) -> bool:
        """One hand-over: whether the pod on ``conn`` now has this sandbox. A pod that asks for
        another VM (its config gives another template) is refused, and the sandbox stays pooled."""
        from hako.shim import pooled

        try:
            adoption, listener, netns_fd = pooled.receive(conn)
        except (OSError, ValueError, TypeError, HakoError) as exc:
            self.log(f"a bad adoption: {exc}")
            self._back_in_the_pool()
            return False
        try:
            wanted = pooled.template_of(adoption)
        except HakoError as exc:
            wanted = f"none ({exc})"
        error, refused = "", False
        if wanted != self.state.template:
            self._back_in_the_pool()
            self.log(f"refused the containerd pod of {adoption.bundle}: it asks for template {wanted}")
            error, refused = f"the pod asks for template {wanted}", True
        else:
            try:
                took = self._take_from_pool()
            except TtrpcError as exc:  # the VM failed: this daemon is finishing
                error = exc.message
        if error:
            listener.close()
            if netns_fd is not None:
                os.close(netns_fd)
            pooled.answer(conn, error=error, refused=refused)
            return False
        self.adoption = (adoption, listener, netns_fd)
        self.log(f"adopted by the containerd pod of {adoption.bundle} in {took * 1000:.0f} ms")
        pooled.answer(conn, qemu_pid=self.sandbox.vm.pid or 0, took=took)
        return True

    def _back_in_the_pool(self) -> None:
        """The taker that renamed this sandbox's pooled mark gave up on it: it can be taken again
        (unless a `hako run` claimed it meanwhile)."""
        if not self.claimed.is_set():
            with contextlib.suppress(OSError):
                os.rename(self.run_dir / CLAIMED_MARK, self.run_dir / POOLED_MARK)

    def _become_shim(self, adoption: Adoption, listener: socket.socket, netns_fd: int | None) -> int:
        """Hand the sandbox to the containerd shim this process becomes; its state goes (the pod
        is containerd's now, not a `hako run` container), its run dir goes with the pod."""
        from hako.runtime.pool import Shape, refill_in_background
        from hako.shim.pooled import serve_adopted

        self.server.shutdown()
        for name in (API_SOCKET, ADOPT_SOCKET, STATE_FILE, CLAIMED_MARK):
            with contextlib.suppress(OSError):
                (self.run_dir / name).unlink()
        with contextlib.suppress(OSError):
            os.close(self.notify_fd)
        self.log_file.close()
        # The pool's refill, once the pod's first container has had the CPU for a while (or as
        # the pod ends, if that is sooner).
        shape, refilled = Shape.of(self.state), threading.Event()

        def refill_once() -> None:
            if not refilled.is_set():  # (two at once would do no harm: a fill tops up)
                refilled.set()
                refill_in_background(shape)

        timer = threading.Timer(REFILL_DELAY, refill_once)
        timer.daemon = True
        timer.start()
        try:
            return serve_adopted(adoption, listener, netns_fd, self.sandbox, self.run_dir)
        finally:
            timer.cancel()
            refill_once()

    def _main_loop(self) -> None:
        idle_since = time.monotonic()
        give_up_at: float | None = None
        while True:
            self.wake.wait(1.0)
            self.wake.clear()
            if self.adoption is not None:
                return
            if self.exited.is_set():
                # Let attached clients drain the output (unless told to stop: a container that
                # still runs has more to say), then stop once they have left.
                if self.created.is_set() and not self.stop_requested.is_set():
                    self.pumps_done.wait(10)
                if not self.sandbox.dead.is_set():
                    self.sandbox.stop(discard=self._discard)
                if give_up_at is None:
                    give_up_at = time.monotonic() + 600  # a stuck client does not keep us forever
                if self.server.connection_count == 0 or time.monotonic() > give_up_at:
                    return
            elif self.server.connection_count:
                idle_since = time.monotonic()
            elif self.pooled and not self.claimed.is_set():
                idle_since = time.monotonic()  # waiting in the pool is what it is for
                if self.sandbox.dead.is_set() and self.ready.is_set():
                    # Its VM died waiting: it leaves the pool (nobody would take it).
                    self.log(f"the VM died in the pool: {self.sandbox.death_reason}")
                    self._finish(125, error=self.sandbox.death_reason or "the VM died")
            elif not self.started.is_set() and time.monotonic() - idle_since > IDLE_TIMEOUT:
                self.log("nobody created or started the container: giving up")
                self._finish(0, error="never started", stopped=True)
