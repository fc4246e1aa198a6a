"""The ttRPC service ``hako.agent.v1.Agent``: one thin method per RPC.

Each handler converts its request into plain values, calls the sandbox, and
converts the answer back; :func:`_rpc` maps the agent's errors to ttRPC statuses.
Protobuf stays in this module. The sandbox (and everything containers need:
json, the spawn code, ...) is imported when the first call needs it, or by
:meth:`AgentService.warm_up` right after the agent starts serving.
"""

from __future__ import annotations

import os
import threading
import time

from google.protobuf import any_pb2

from hako_agent import __version__, errors, log, system
from hako_api import agent_pb2
from hako_ttrpc import Code, TtrpcError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import TypeVar

    from hako_agent.network import Interface, Route
    from hako_agent.sandbox import Sandbox, Storage
    from hako_ttrpc import CallContext

    Req = TypeVar("Req")
    Resp = TypeVar("Resp")

_READ_DEFAULT = 32 * 1024
_READ_MAX = 1024 * 1024
_CODES = (
    (errors.NotFound, Code.NOT_FOUND),
    (errors.AlreadyExists, Code.ALREADY_EXISTS),
    (errors.InvalidArgument, Code.INVALID_ARGUMENT),
    (errors.FailedPrecondition, Code.FAILED_PRECONDITION),
    (errors.Unsupported, Code.UNIMPLEMENTED),
)


def to_status(exc: errors.AgentError, deadline: float | None = None) -> TtrpcError:
    """An agent error -> the ttRPC status to answer with."""
    if isinstance(exc, errors.ExecFailed):
        detail = any_pb2.Any()
        detail.Pack(agent_pb2.ExecFailure(errno=exc.errno, path=exc.path, message=exc.message))
        return TtrpcError(Code.FAILED_PRECONDITION, exc.message, details=[detail])
    if isinstance(exc, errors.Cancelled):
        expired = deadline is not None and time.monotonic() >= deadline
        return TtrpcError(Code.DEADLINE_EXCEEDED if expired else Code.CANCELLED, str(exc))
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return TtrpcError(code, str(exc))
    return TtrpcError(Code.INTERNAL, str(exc))


def _rpc(
    method: Callable[[AgentService, Req, CallContext], Resp],
) -> Callable[[AgentService, Req, CallContext], Resp]:
    def handler(self: AgentService, request: Req, ctx: CallContext) -> Resp:
        try:
            return method(self, request, ctx)
        except errors.AgentError as exc:
            log.debug(f"{method.__name__}: {type(exc).__name__}: {exc}")
            raise to_status(exc, ctx.deadline) from None
        except OSError as exc:
            log.error(f"{method.__name__}: {exc}")
            raise TtrpcError(Code.INTERNAL, f"{method.__name__}: {exc}") from None

    handler.__name__ = method.__name__
    handler.__qualname__ = method.__qualname__
    handler.__doc__ = method.__doc__
    return handler


def _cancelled(ctx: CallContext) -> Callable[[], bool]:
    """True once the call's connection dropped or its deadline passed."""
    closed = ctx.closed
    deadline = ctx.deadline
    if deadline is None:
        return closed.is_set
    return lambda: closed.is_set() or time.monotonic() >= deadline


def _storages(storages: object) -> list[Storage]:
    from hako_agent.sandbox import Storage

    return [
        Storage(s.driver, s.source, s.fstype, list(s.options), s.mount_point)
        for s in storages  # type: ignore[attr-defined]
    ]


def _interfaces(interfaces: Iterable[agent_pb2.Interface]) -> list[Interface]:
    from hako_agent.network import Interface, IPAddress

    return [
        Interface(
            i.device, i.name, i.hw_addr, i.mtu, [IPAddress(a.address, a.prefix_len) for a in i.addresses]
        )
        for i in interfaces
    ]


def _routes(routes: Iterable[agent_pb2.Route]) -> list[Route]:
    from hako_agent.network import Route

    return [Route(r.destination, r.gateway, r.device, r.source) for r in routes]


class BootTimes:
    def __init__(self, agent_start: float) -> None:
        self.agent_start = agent_start
        self.agent_ready = 0.0


class AgentService:
    """Implements every RPC of ``hako.agent.v1.Agent``."""

    def __init__(
        self,
        boot: BootTimes | None = None,
        *,
        sandbox: Sandbox | None = None,
        power_off: Callable[[], None] | None = None,
        cgroup_root: str | None = "/sys/fs/cgroup",
    ) -> None:
        self.boot = boot or BootTimes(0.0)
        self.warm = False  # set by warm_up (a thread started once the agent serves)
        self._sandbox = sandbox
        self._power_off = power_off  # None: DestroySandbox leaves the machine running (tests)
        self._cgroup_root = cgroup_root
        self._lock = threading.Lock()

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            with self._lock:
                if self._sandbox is None:
                    from hako_agent.sandbox import Sandbox

                    self._sandbox = Sandbox(cgroup_root=self._cgroup_root)
        return self._sandbox

    def warm_up(self) -> None:
        """Import what containers need, start the reaper and read the disks' serials (right
        after serving begins)."""
        _ = self.sandbox
        import hako_agent.spawn  # noqa: F401  (json, resource, socket, ...)
        from hako_agent.sandbox import BLOCK_DEVICES

        BLOCK_DEVICES.load()

        self.warm = True

    # -- health ---------------------------------------------------------------------------------
    @_rpc
    def Check(self, request: agent_pb2.CheckRequest, ctx: CallContext) -> agent_pb2.CheckResponse:
        return agent_pb2.CheckResponse(
            agent_version=__version__,
            kernel_release=os.uname().release,
            uptime=system.boottime(),
            boot=agent_pb2.BootTimes(
                kernel_done=system.kernel_done_time(),
                agent_start=self.boot.agent_start,
                agent_ready=self.boot.agent_ready,
            ),
            warm=self.warm,
        )

    @_rpc
    def GetGuestDetails(
        self, request: agent_pb2.GuestDetailsRequest, ctx: CallContext
    ) -> agent_pb2.GuestDetailsResponse:
        return agent_pb2.GuestDetailsResponse(
            agent_version=__version__,
            kernel_release=os.uname().release,
            memory_total_bytes=system.memory_total(),
            online_cpus=len(os.sched_getaffinity(0)),
            cgroup_controllers=system.cgroup_controllers(self._cgroup_root or "/sys/fs/cgroup"),
        )

    # -- sandbox --------------------------------------------------------------------------------
    @_rpc
    def CreateSandbox(self, request: agent_pb2.CreateSandboxRequest, ctx: CallContext) -> agent_pb2.Empty:
        if request.entropy:
            system.reseed_random(request.entropy)  # before anything in the sandbox draws from it
        self.sandbox.setup(
            request.hostname,
            _storages(request.storages),
            list(request.dns),
            request.time_unix_ns,
            _interfaces(request.interfaces),
            _routes(request.routes),
        )
        log.info(f"sandbox {request.sandbox_id} set up")
        return agent_pb2.Empty()

    @_rpc
    def UpdateSandbox(self, request: agent_pb2.UpdateSandboxRequest, ctx: CallContext) -> agent_pb2.Empty:
        self.sandbox.identify(
            request.hostname, list(request.dns), _interfaces(request.interfaces), _routes(request.routes)
        )
        log.info("sandbox updated")
        return agent_pb2.Empty()

    @_rpc
    def DestroySandbox(self, request: agent_pb2.DestroySandboxRequest, ctx: CallContext) -> agent_pb2.Empty:
        self.sandbox.shutdown()
        log.info("sandbox destroyed")
        power_off = self._power_off
        if power_off is not None:
            # Power off once this answer is on its way: ttRPC sends it from this thread.
            caller = threading.current_thread()

            def later() -> None:
                caller.join(2.0)
                time.sleep(0.02)
                power_off()

            threading.Thread(target=later, name="power-off", daemon=True).start()
        return agent_pb2.Empty()

    @_rpc
    def SetGuestDateTime(
        self, request: agent_pb2.SetGuestDateTimeRequest, ctx: CallContext
    ) -> agent_pb2.Empty:
        system.set_clock(request.sec * 1_000_000_000 + request.usec * 1000)
        return agent_pb2.Empty()

    @_rpc
    def ReseedRandomDev(self, request: agent_pb2.ReseedRandomDevRequest, ctx: CallContext) -> agent_pb2.Empty:
        system.reseed_random(request.data)
        return agent_pb2.Empty()

    # -- containers -----------------------------------------------------------------------------
    @_rpc
    def CreateContainer(self, request: agent_pb2.CreateContainerRequest, ctx: CallContext) -> agent_pb2.Empty:
        self.sandbox.create_container(
            request.container_id, request.oci_spec, _storages(request.storages), request.stdin
        )
        return agent_pb2.Empty()

    @_rpc
    def StartContainer(
        self, request: agent_pb2.ContainerRequest, ctx: CallContext
    ) -> agent_pb2.StartContainerResponse:
        return agent_pb2.StartContainerResponse(pid=self.sandbox.start_container(request.container_id))

    @_rpc
    def RemoveContainer(self, request: agent_pb2.RemoveContainerRequest, ctx: CallContext) -> agent_pb2.Empty:
        self.sandbox.remove_container(request.container_id, request.timeout_ms / 1000)
        return agent_pb2.Empty()

    @_rpc
    def ExecProcess(
        self, request: agent_pb2.ExecProcessRequest, ctx: CallContext
    ) -> agent_pb2.ExecProcessResponse:
        pid = self.sandbox.exec_process(request.container_id, request.exec_id, request.process, request.stdin)
        return agent_pb2.ExecProcessResponse(pid=pid)

    @_rpc
    def SignalProcess(self, request: agent_pb2.SignalProcessRequest, ctx: CallContext) -> agent_pb2.Empty:
        self.sandbox.signal_process(request.container_id, request.exec_id, request.signal, request.all)
        return agent_pb2.Empty()

    @_rpc
    def WaitProcess(
        self, request: agent_pb2.ProcessRequest, ctx: CallContext
    ) -> agent_pb2.WaitProcessResponse:
        status, exited_at = self.sandbox.wait_process(request.container_id, request.exec_id, _cancelled(ctx))
        return agent_pb2.WaitProcessResponse(exit_status=status, exited_at_unix_ns=exited_at)

    @_rpc
    def ListProcesses(
        self, request: agent_pb2.ContainerRequest, ctx: CallContext
    ) -> agent_pb2.ListProcessesResponse:
        return agent_pb2.ListProcessesResponse(pids=self.sandbox.list_processes(request.container_id))

    @_rpc
    def StatsContainer(
        self, request: agent_pb2.ContainerRequest, ctx: CallContext
    ) -> agent_pb2.StatsContainerResponse:
        s = self.sandbox.stats(request.container_id)
        return agent_pb2.StatsContainerResponse(
            memory=agent_pb2.MemoryStats(
                usage_bytes=s.memory_usage,
                max_usage_bytes=s.memory_max_usage,
                limit_bytes=s.memory_limit,
                oom_kills=s.oom_kills,
            ),
            cpu=agent_pb2.CpuStats(
                usage_usec=s.cpu_usage_usec,
                user_usec=s.cpu_user_usec,
                system_usec=s.cpu_system_usec,
                nr_throttled=s.nr_throttled,
                throttled_usec=s.throttled_usec,
            ),
            pids=agent_pb2.PidsStats(current=s.pids_current, limit=s.pids_limit),
        )

    @_rpc
    def PauseContainer(self, request: agent_pb2.ContainerRequest, ctx: CallContext) -> agent_pb2.Empty:
        self.sandbox.pause(request.container_id)
        return agent_pb2.Empty()

    @_rpc
    def ResumeContainer(self, request: agent_pb2.ContainerRequest, ctx: CallContext) -> agent_pb2.Empty:
        self.sandbox.resume(request.container_id)
        return agent_pb2.Empty()

    @_rpc
    def UpdateContainer(self, request: agent_pb2.UpdateContainerRequest, ctx: CallContext) -> agent_pb2.Empty:
        self.sandbox.update(request.container_id, request.resources)
        return agent_pb2.Empty()

    # -- process I/O ----------------------------------------------------------------------------
    @_rpc
    def WriteStdin(
        self, request: agent_pb2.WriteStreamRequest, ctx: CallContext
    ) -> agent_pb2.WriteStreamResponse:
        written = self.sandbox.write_stdin(
            request.container_id, request.exec_id, request.data, _cancelled(ctx)
        )
        return agent_pb2.WriteStreamResponse(len=written)

    @_rpc
    def CloseStdin(self, request: agent_pb2.ProcessRequest, ctx: CallContext) -> agent_pb2.Empty:
        self.sandbox.close_stdin(request.container_id, request.exec_id)
        return agent_pb2.Empty()

    @_rpc
    def ReadStdout(
        self, request: agent_pb2.ReadStreamRequest, ctx: CallContext
    ) -> agent_pb2.ReadStreamResponse:
        return self._read(request, ctx, stderr=False)

    @_rpc
    def ReadStderr(
        self, request: agent_pb2.ReadStreamRequest, ctx: CallContext
    ) -> agent_pb2.ReadStreamResponse:
        return self._read(request, ctx, stderr=True)

    def _read(
        self, request: agent_pb2.ReadStreamRequest, ctx: CallContext, *, stderr: bool
    ) -> agent_pb2.ReadStreamResponse:
        size = min(request.len or _READ_DEFAULT, _READ_MAX)
        data = self.sandbox.read_output(request.container_id, request.exec_id, stderr, size, _cancelled(ctx))
        return agent_pb2.ReadStreamResponse(data=data)

    @_rpc
    def TtyWinResize(self, request: agent_pb2.TtyWinResizeRequest, ctx: CallContext) -> agent_pb2.Empty:
        if request.rows > 0xFFFF or request.columns > 0xFFFF:
            raise errors.InvalidArgument("rows/columns: at most 65535")
        self.sandbox.resize(request.container_id, request.exec_id, request.rows, request.columns)
        return agent_pb2.Empty()
